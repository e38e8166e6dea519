"""Joint effects of head sets next to the sum of their heads' single effects.

A head-set scan (``axes ("head_set",)``, e.g. every pair of heads) says what removing a set
does; whether the heads interact shows only beside what the same heads do alone. Per example
``n``, with ``base[n]`` the metric of the run the interventions were applied to (the result's
``base_per_example``, else the baseline its effects are measured from: the corrupt one for
denoising, else the clean one):

* ``effect[n]      = set[n] - base[n]``
* ``singles_sum[n] = sum over the set's heads (l, h) of (single[l, h, n] - base[n])``
* ``interaction[n] = effect[n] - singles_sum[n]``

and each column is the mean over the examples where all its terms are finite, with the
standard error of that mean (paired: one value per example).
"""

from __future__ import annotations

import torch

from .grid import head_set_name
from .stats import finite_count, finite_mean, finite_stderr

__all__ = ["pair_frame"]


def _base(result) -> torch.Tensor:
    """The per-example base ``[N]`` (float64) of ``result``."""
    if result.base_per_example is not None:
        return result.base_per_example.double()
    if result.reference_baseline is None:
        raise ValueError(f"pair_frame needs effects: a result with base_per_example or a {result.reference}_baseline "
                         f"(its effects are measured from the {result.reference} run)")
    return torch.full((result.n_examples,), float(result.reference_baseline), dtype=torch.float64)


def pair_frame(sets, singles):
    """DataFrame, one row per head set of ``sets``, with columns ``head_set, effect,
    effect_stderr, singles_sum, singles_sum_stderr, interaction, interaction_stderr, n``
    (``n``: examples where every term is finite).

    sets: a head-set ScanResult ``[S, N]``; singles: a ``("layer", "head")`` ScanResult
    ``[L, H, N]`` of the same examples (same N, metric and normalisation) covering every head
    of every set. Raises ValueError naming what does not match.
    """
    import pandas as pd

    if sets.axes != ("head_set",):
        raise ValueError(f"sets must be a head-set scan (axes ('head_set',)), got axes {sets.axes}")
    if singles.axes != ("layer", "head"):
        raise ValueError(f"singles must be a single-head scan (axes ('layer', 'head')), got axes {singles.axes}")
    if singles.n_examples != sets.n_examples:
        raise ValueError(f"singles has {singles.n_examples} examples but sets has {sets.n_examples}; both must scan the same examples")
    if singles.metric_name != sets.metric_name or singles.normalized != sets.normalized:
        raise ValueError(f"singles ({singles.metric_name!r}, normalized={singles.normalized}) and sets ({sets.metric_name!r}, "
                         f"normalized={sets.normalized}) must measure the same metric the same way")
    if singles.reference != sets.reference:
        raise ValueError(f"singles measure effects from the {singles.reference} run and sets from the {sets.reference} run; "
                         "both must be scanned in the same direction")
    L, H = singles.grid_shape
    single = singles.per_example.double() - _base(singles)  # [L, H, N]
    base = _base(sets)
    effect = sets.per_example.double() - base  # [S, N]
    sums = []
    for i, heads in enumerate(sets.labels):
        total = torch.zeros(sets.n_examples, dtype=torch.float64)
        for layer, head in heads:
            if not (0 <= layer < L and 0 <= head < H):
                raise ValueError(f"head set {head_set_name(heads)} (entry {i}) has head L{layer}H{head}, outside singles' "
                                 f"[{L} layers, {H} heads] grid")
            total = total + single[layer, head]
        sums.append(total)
    singles_sum = torch.stack(sums) if sums else torch.zeros(0, sets.n_examples, dtype=torch.float64)
    # use, per column, only the examples where all terms of the row are finite
    ok = torch.isfinite(effect) & torch.isfinite(singles_sum)
    nan = torch.full_like(effect, float("nan"))
    effect, singles_sum = torch.where(ok, effect, nan), torch.where(ok, singles_sum, nan)
    interaction = effect - singles_sum
    cols = {"head_set": [head_set_name(s) for s in sets.labels]}
    for name, x in (("effect", effect), ("singles_sum", singles_sum), ("interaction", interaction)):
        cols[name] = finite_mean(x).numpy()
        cols[name + "_stderr"] = finite_stderr(x).numpy()
    cols["n"] = finite_count(effect).numpy()
    order = ["head_set", "effect", "effect_stderr", "singles_sum", "singles_sum_stderr", "interaction", "interaction_stderr", "n"]
    return pd.DataFrame({k: cols[k] for k in order})
