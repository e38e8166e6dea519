"""Parametrisation of the conformance suite: every (backend, case) pair, with the cost rule.

The backend list comes from the backend table (:func:`attention_cases.backends_under_test`): a new
backend is tested by adding it there. Whether a backend applies to a case is the backend's own
business (:func:`attention_cases.skip_unless_runs` skips with its reason).

Cost rule: the Triton interpreter (``TRITON_INTERPRET=1``) pays for every ``16 x 16`` tile it
visits, so a (``"triton"``, case) pair whose tile count is above :data:`INTERPRETED_TILE_BUDGET`
is marked ``slow`` (run with ``-m slow``). Every feature keeps small cases under the budget, so
the default run still covers every feature on every backend.
"""

from __future__ import annotations

import math

import pytest

from attention_cases import Case, backends_under_test

INTERPRET_TILE = 16
#: Tile visits (times 3 with gradients) above which an interpreted Triton case is marked slow.
INTERPRETED_TILE_BUDGET = 100


def interpreted_tiles(case: Case, grads: bool) -> int:
    """Query-tile x key-tile visits of an interpreted Triton run of ``case`` (x3 for the backward)."""
    tiles = case.B * case.Hq * max(1, math.ceil(case.Tq / INTERPRET_TILE)) * max(1, math.ceil(case.Tk / INTERPRET_TILE))
    return tiles * (3 if grads else 1)


def backend_params(cases: list[Case], grads: bool = False) -> list:
    """``pytest.param(backend, case)`` for every tested backend and case, slow ones marked."""
    out = []
    for backend in backends_under_test():
        for case in cases:
            marks = []
            if backend == "triton" and interpreted_tiles(case, grads) > INTERPRETED_TILE_BUDGET:
                marks.append(pytest.mark.slow)
            out.append(pytest.param(backend, case, id=f"{backend}-{case.name}", marks=marks))
    return out
