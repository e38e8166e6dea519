"""Attention patterns of chosen heads on a few prompts, for reports.

:func:`head_patterns` runs the model once on one example, without its padding, through
:func:`headint.record` with ``what=("pattern",)``, and returns the ``[T, T]`` attention
probabilities of each requested head (queries down, keys across);
:func:`example_patterns` does so for several examples. :func:`report_heads` picks the heads
whose patterns fit a report's size budget, most important first.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["head_patterns", "example_patterns", "top_heads", "report_heads"]


def top_heads(result, k: int = 4) -> list[tuple[int, int]]:
    """The first ``k`` distinct ``(layer, head)`` of ``result.top()`` (most important first);
    for head-set scans, the heads of the top sets in order."""
    frame = result.top(max(1, min(len(result.to_frame()), 10 * k)))
    heads: list[tuple[int, int]] = []
    if result.axes == ("head_set",):
        labels = {"+".join(f"L{l}H{h}" for l, h in s): s for s in result.labels}
        candidates = [tuple(p) for name in frame["head_set"] for p in labels[name]]
    else:
        candidates = [(int(l), int(h)) for l, h in zip(frame["layer"], frame["head"])]
    for c in candidates:
        if c not in heads:
            heads.append(c)
    return heads[:k]


def head_patterns(model, input_ids, heads: Iterable[tuple[int, int]], *, backend: str = "auto") -> dict[tuple[int, int], torch.Tensor]:
    """``{(layer, head): [T, T] float32 CPU tensor}``: the attention probabilities of each head
    in ``heads`` on ``input_ids`` (``[T]`` token ids of ONE example, without padding; a padded
    row must be stripped first, as padding would shift the pattern). The model is run once,
    with no intervention."""
    import headint

    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"input_ids must be the [T] token ids of one example (T >= 1), got shape {list(ids.shape)}")
    heads = [(int(l), int(h)) for l, h in heads]
    device = next(model.parameters()).device
    cache = headint.record(model, ids[None].to(device), what=("pattern",), backend=backend)
    return {(l, h): cache.get("pattern", l)[0, h].float().cpu() for l, h in heads}


def example_patterns(model, examples: Iterable, heads: Iterable[tuple[int, int]], *, backend: str = "auto") -> list[dict]:
    """:func:`head_patterns` of each example of ``examples`` (``[T]`` token ids each, without
    padding): one ``{(layer, head): [T, T]}`` per example, for a report's pattern panel."""
    heads = list(heads)
    return [head_patterns(model, ids, heads, backend=backend) for ids in examples]


def report_heads(result, lengths: Iterable[int], max_values: int | None = None) -> list[tuple[int, int]]:
    """The heads whose attention patterns on examples of ``lengths`` tokens fit a report:
    every head of ``result`` (for head-set scans, every head of a set) most important first,
    as many as fit ``max_values`` weights (default: the report's
    :data:`headint.results.report_data.PATTERN_VALUES`), at least one."""
    from .results.report_data import PATTERN_VALUES

    budget = PATTERN_VALUES if max_values is None else int(max_values)
    per_head = sum(int(t) * int(t) for t in lengths)
    n_heads = len(result.to_frame()) if result.axes != ("head_set",) else sum(len(s) for s in result.labels)
    ranked = top_heads(result, n_heads)
    return ranked[: max(1, budget // max(1, per_head))]
