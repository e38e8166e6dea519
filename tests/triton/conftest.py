"""Shared setup of the Triton-specific tests (CPU, Triton interpreter; conformance of the Triton
backend itself is in tests/backends/).

These tests run in the Triton interpreter lane: ``TRITON_INTERPRET=1`` is set by
tests/conftest.py before anything imports triton's kernels (``triton.jit`` decides at decoration
time whether to build interpreted functions), and only in a session that runs this lane.

Every test runs with ``headint_kernels.launch.POISON_OUTPUTS`` on: outputs and scratch start
NaN-filled, so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def poisoned_outputs():
    from headint.ops import backends

    reason = backends.unavailable_reason("triton", __import__("torch").device("cpu"))
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    from headint_kernels import config, launch

    if not config.INTERPRET:
        pytest.fail("headint_kernels was imported before TRITON_INTERPRET=1 was set (kernels are not interpreted)")
    old = launch.POISON_OUTPUTS
    launch.POISON_OUTPUTS = True
    try:
        yield launch
    finally:
        launch.POISON_OUTPUTS = old
