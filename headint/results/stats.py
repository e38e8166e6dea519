"""Statistics of per-example scan values ``[*grid, N]``, NaN-aware.

Every aggregate reduces the last dim (the N examples) and uses only the *finite* examples of
each cell: a value that is NaN or +-inf (a metric that failed on that example) is left out, and
:func:`finite_count` says how many examples each cell's aggregates rest on. A cell without any
finite example aggregates to NaN. :func:`non_finite_report` describes what was left out, and
:class:`~headint.results.ScanResult` turns that into a :class:`NaNMetricWarning`.

All functions compute in float64 and return float64 (counts: int64) tensors ``[*grid]``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

__all__ = [
    "NaNMetricWarning",
    "finite_count",
    "finite_mean",
    "finite_stderr",
    "paired_stderr",
    "non_finite_report",
    "listing",
]


class NaNMetricWarning(UserWarning):
    """A scan's metric was NaN or infinite for some examples; aggregates left them out."""


def finite_count(x: torch.Tensor) -> torch.Tensor:
    """Number of finite values along the last dim: int64 ``[*grid]`` for ``x`` ``[*grid, N]``."""
    return torch.isfinite(x).sum(dim=-1)


def finite_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the finite values along the last dim, float64 ``[*grid]``; NaN where none is finite.

    Where every value is finite this is exactly ``x.double().mean(-1)``.
    """
    x = x.double()
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return x.mean(dim=-1)
    n = finite.sum(dim=-1)
    total = torch.where(finite, x, torch.zeros_like(x)).sum(dim=-1)
    return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, float("nan")))


def finite_stderr(x: torch.Tensor) -> torch.Tensor:
    """Standard error of the mean over the finite values along the last dim, float64 ``[*grid]``:
    ``std(ddof=1) / sqrt(n)`` with ``n`` the finite count; 0 where ``n == 1`` (no spread to
    measure, as for a single example), NaN where ``n == 0``.

    Where every value is finite this is exactly ``x.double().std(-1, correction=1) / sqrt(N)``
    (0 when N == 1).
    """
    x = x.double()
    N = x.shape[-1]
    finite = torch.isfinite(x)
    if bool(finite.all()):
        if N == 1:
            return torch.zeros(x.shape[:-1], dtype=torch.float64)
        return x.std(dim=-1, correction=1) / math.sqrt(N)
    n = finite.sum(dim=-1)
    mean = finite_mean(x)
    dev = torch.where(finite, x - mean[..., None], torch.zeros_like(x))
    var = (dev * dev).sum(dim=-1) / (n - 1).clamp_min(1)
    se = (var / n.clamp_min(1)).sqrt()
    se = torch.where(n == 1, torch.zeros_like(se), se)
    return torch.where(n == 0, torch.full_like(se, float("nan")), se)


def paired_stderr(per_example: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Standard error of the per-example change ``per_example - base`` ``[*grid]``
    (``per_example`` ``[*grid, N]``, ``base`` ``[N]``, one dtype; the difference is taken in that
    dtype), over the examples where both are finite."""
    return finite_stderr(per_example - base)


def listing(items: Sequence, limit: int) -> str:
    """``items`` joined by commas, the first ``limit`` of them, then how many in all."""
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def non_finite_report(
    per_example: torch.Tensor,
    base_per_example: torch.Tensor | None,
    baselines: dict[str, float | None],
    metric_name: str,
    cell_name: Callable[[tuple[int, ...]], str],
) -> str | None:
    """A description of the non-finite values that aggregates leave out, or None if nothing is off.

    per_example: ``[*grid, N]``; base_per_example: ``[N]`` or None; baselines: name -> value
    (e.g. ``{"clean_baseline": 1.2}``); cell_name: grid index -> readable name.

    Cells whose every example is non-finite while other cells have finite values are taken as
    cells that were not scanned (scans restricted to some layers or heads leave the others NaN)
    and are not reported; a grid with no finite value at all is.
    """
    finite = torch.isfinite(per_example)
    N = per_example.shape[-1]
    n = finite.sum(dim=-1)
    partial = (n > 0) & (n < N)
    parts = []
    if bool(partial.any()):
        bad = ~finite & partial[..., None]
        cells = [tuple(int(i) for i in idx) for idx in partial.nonzero().tolist()]
        examples = bad.reshape(-1, N).any(dim=0).nonzero().flatten().tolist()
        parts.append(
            f"metric {metric_name!r} is NaN or infinite for {int(bad.sum())} per-example value{'s' if int(bad.sum()) != 1 else ''} in "
            f"{len(cells)} of {n.numel()} cells ({listing([cell_name(c) for c in cells], 5)}), at examples "
            f"[{listing(examples, 10)}] of {N}; the values, stderr and effect of those cells use only "
            "their finite examples (the count per cell is ScanResult.n, column 'n' of to_frame())"
        )
    elif n.numel() > 0 and not bool((n > 0).any()):
        parts.append(f"metric {metric_name!r} has no finite value at all ({N} examples x {n.numel()} cells): every aggregate is NaN")
    if base_per_example is not None:
        base_bad = (~torch.isfinite(base_per_example)).nonzero().flatten().tolist()
        if base_bad:
            parts.append(
                f"the base run's metric (base_per_example) is NaN or infinite at examples [{listing(base_bad, 10)}]; "
                "effect_stderr pairs only the examples where both values are finite"
            )
    for name, value in baselines.items():
        if value is not None and not math.isfinite(value):
            parts.append(f"{name} is {value}, so whatever is computed from it (effect, normalisation) is not finite")
    return "; ".join(parts) if parts else None
