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
    "ranks",
    "spearman",
    "bootstrap_means",
    "percentile_interval",
    "rank_agreement",
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


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks ``0 .. n-1`` of a flat tensor's values (ties share their average rank), float64."""
    x = x.flatten().double()
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    if len(values) < len(x):  # ties: each gets the mean rank of its group
        sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, r)
        r = (sums / counts.double())[inverse]
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two tensors of the same number of elements (flattened),
    over the positions where both are finite (average ranks for ties; Pearson correlation of the
    ranks, as ``scipy.stats.spearmanr``). NaN with fewer than 2 such positions or a constant side."""
    a, b = a.flatten().double(), b.flatten().double()
    if a.shape != b.shape:
        raise ValueError(f"spearman: the tensors have {a.numel()} and {b.numel()} elements; expected the same number")
    ok = torch.isfinite(a) & torch.isfinite(b)
    if int(ok.sum()) < 2:
        return float("nan")
    ra, rb = ranks(a[ok]), ranks(b[ok])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def bootstrap_means(x: torch.Tensor, n_boot: int = 1000, seed: int = 0, *, statistic: Callable | None = None) -> torch.Tensor:
    """``[n_boot, *grid]`` bootstrap replicates over the examples (the last dim of ``x``
    ``[*grid, N]``): each replicate draws ``N`` examples with replacement (one draw shared by every
    cell, so differences and ratios between cells keep their pairing) and applies ``statistic``
    (default: the NaN-aware :func:`finite_mean`) to ``x[..., draw]``. Seeded: the same seed gives
    the same replicates."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"bootstrap: n_boot must be a positive int, got {n_boot!r}")
    N = x.shape[-1]
    if N < 1:
        raise ValueError("bootstrap: no examples to resample")
    stat = finite_mean if statistic is None else statistic
    g = torch.Generator().manual_seed(int(seed))
    draws = torch.randint(0, N, (n_boot, N), generator=g)
    return torch.stack([stat(x[..., d]) for d in draws])


def percentile_interval(replicates: torch.Tensor, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` ``[*grid]``: the percentile interval of bootstrap ``replicates``
    ``[n_boot, *grid]`` at confidence ``level`` (e.g. the 2.5th and 97.5th percentiles), over the
    finite replicates of each cell (NaN where none is)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap: level must be in (0, 1), got {level!r}")
    r = replicates.double()
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo_hi = torch.nanquantile(torch.where(torch.isfinite(r), r, torch.full_like(r, float("nan"))), q, dim=0)
    return lo_hi[0], lo_hi[1]


def rank_agreement(a: torch.Tensor, b: torch.Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Spearman rank agreement of two methods' per-component effects, with a bootstrap interval
    over the examples: ``a``, ``b`` ``[*grid, N]`` per-example effects (e.g. a scan's
    ``per_example - base_per_example`` and an attribution scan's), on the same ``N`` examples.
    Each replicate draws the examples once for both, averages each cell over the draw
    (:func:`finite_mean`) and correlates the two grids. Returns ``dict(spearman, lo, hi)``."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"rank_agreement: the two have {a.shape[-1]} and {b.shape[-1]} examples; expected the same")
    point = spearman(finite_mean(a), finite_mean(b))
    N = a.shape[-1]
    g = torch.Generator().manual_seed(int(seed))
    draws = torch.randint(0, N, (n_boot, N), generator=g)
    reps = torch.tensor([spearman(finite_mean(a[..., d]), finite_mean(b[..., d])) for d in draws], dtype=torch.float64)
    lo, hi = percentile_interval(reps[:, None], level)
    return dict(spearman=point, lo=float(lo[0]), hi=float(hi[0]))
