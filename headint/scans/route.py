"""Attention knockout along a route: a scan over (source, target) position pairs.

:func:`headint.knockout_scan` blocks the edges from *one* target position (default each
example's last token) to each source set. That default shows only what the last token reads,
so only the layers where the answer is moved into the last position stand out: on induction-2l
blocking the last token's attention costs -18.68 logit difference in layer 1 and -0.011 in
layer 0, while the layer-0 edge from the token to copy to its previous token - the
previous-token head's step, one hop earlier on the route - costs -17.47. A route needs several
targets: :func:`route_knockout_scan` takes any number of named ``(sources, target)`` pairs
(positions absolute, negative from each example's last real token, or one column per example),
runs one :func:`~headint.knockout_scan` per distinct target with every pair of that target as a
source set, and returns one :class:`~headint.results.knockout.KnockoutResult` whose source axis
is the pairs (labels ``"name"``), each cell blocking only that pair's edges in each window.
"""

from __future__ import annotations

from typing import Any

import torch

from ..results.knockout import KnockoutResult
from .knockout import knockout_scan

__all__ = ["route_knockout_scan"]


def _target_key(target: Any):
    if isinstance(target, torch.Tensor):
        return ("cols", tuple(int(x) for x in target.flatten().tolist()))
    if isinstance(target, (list, tuple)):
        return ("cols", tuple(int(x) for x in target))
    return ("int", int(target))


def route_knockout_scan(model, inputs, metric, pairs, *, window: int = 1, per_head: bool = False, **kwargs) -> KnockoutResult:
    """The metric with the edges of each ``(sources, target)`` pair blocked, per window of layers.

    Args:
        pairs: a dict ``name -> (sources, target)`` (or a list of such tuples, named
            ``"{sources}->{target}"``): ``sources`` as :func:`~headint.knockout_scan`'s
            ``sources`` (an int, a list of positions, a bool tensor ``[T]`` / ``[N, T]``),
            ``target`` as its ``target_position`` (an int, negative from each example's last
            real token, or one column per example).
        window, per_head, kwargs: as :func:`~headint.knockout_scan` (``batch_size``,
            ``memory_budget``, ``progress``, ``backend``).

    Returns a :class:`~headint.results.knockout.KnockoutResult` with ``per_example``
    ``[W, P, N]`` (``per_head``: ``[W, H, P, N]``) over the ``P`` pairs in the order given;
    ``settings["pairs"]`` records each pair's target. Every cell equals the same pair scanned
    alone with :func:`~headint.knockout_scan`.
    """
    if isinstance(pairs, dict):
        items = list(pairs.items())
    elif isinstance(pairs, (list, tuple)):
        items = [(f"{s}->{t}", (s, t)) for s, t in pairs]
    else:
        raise TypeError(f"route_knockout_scan: pairs must be a dict name -> (sources, target) or a list of "
                        f"(sources, target) tuples, got {type(pairs).__name__}")
    if not items:
        raise ValueError("route_knockout_scan: pairs is empty")
    for name, pair in items:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"route_knockout_scan: pair {name!r} must be a (sources, target) tuple, got {pair!r}")
    names = [str(n) for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"route_knockout_scan: pair names must be distinct, got {names}")
    groups: dict = {}
    for i, (name, (sources, target)) in enumerate(items):
        groups.setdefault(_target_key(target), []).append((i, str(name), sources, target))
    parts: dict[int, torch.Tensor] = {}
    base = settings = None
    for members in groups.values():
        res = knockout_scan(model, inputs, metric, sources={name: s for _, name, s, _ in members},
                            target_position=members[0][3], window=window, per_head=per_head, **kwargs)
        for j, (i, *_rest) in enumerate(members):
            parts[i] = res.per_example[..., j, :]
        base, settings, metric_name = res.base_per_example, res.settings, res.metric_name
    per_example = torch.stack([parts[i] for i in range(len(items))], dim=-2)
    settings = dict(settings, sources=names, target_position=None,
                    pairs={n: _target_key(t)[1] for n, (_s, t) in items}, scans=len(groups))
    return KnockoutResult(per_example, names, window, per_head, base, metric_name, settings)
