"""Pruning curves: remove heads one at a time and record the metric after each removal.

Orders:

- ``"importance"`` (Michel et al. 2019): greedy; before each removal, every remaining head's
  importance ``mean_i |d metric_i / d m_h|`` is re-estimated at the current mask (one
  forward + backward; the gradient is the fused kernels' ``d head_mask``), and the least
  important head goes. The same run gives the metric at that step.
- ``"exact"``: greedy; every remaining head is removed in turn (one batched exact scan of the
  remaining heads) and the head whose removal leaves the best metric goes.
- a :class:`~headint.results.gates.GateResult`: the heads in ascending order of their learned
  gate parameter; or an explicit list of ``(layer, head)`` pairs.

A removed head's output is replaced by zeros or by its mean over the inputs (``ablation``);
every recorded value is an exact forward of the model with the removed heads ablated.

NaN or infinite metric values follow the scans' rule: every aggregate uses each cell's finite
examples (a step's metric and stderr; ``"exact"``: each candidate's mean; ``"importance"``: the
gradient over the examples whose value and gradient are finite), one
:class:`~headint.NaNMetricWarning` says how many were left out and where, and where no finite
value remains (the intact model, every candidate of a step) the call is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ..results.gates import GateResult
from ..results.prune import PruneCurve
from ..results.stats import finite_mean
from .batching import auto_rows, check_batch_size, run_in_halves
from .masking import NonFinite, ablation_patches, check_ablation, check_head, finite_or_refuse, mask_plan, metric_direction
from .masking import removed_masks
from ..vocabulary import PRUNE_ORDERS, Ablation
from ..integration.modes import require_autograd
from .setup import prepare_scan


def _given_order(order: Any, shape) -> tuple[list[tuple[int, int]], list | None, str]:
    """A fixed removal order from a gates result or a list of heads; ``(heads, scores, name)``."""
    if isinstance(order, GateResult):
        if tuple(order.params.shape) != (shape.n_layers, shape.n_heads):
            raise ValueError(f"prune_curve: order is a GateResult for {list(order.params.shape)} heads; "
                             f"the model has [{shape.n_layers}, {shape.n_heads}] (layers, heads)")
        heads = order.order()
        return heads, [float(order.params[h]) for h in heads], "gates"
    if isinstance(order, str) or not hasattr(order, "__iter__"):
        raise ValueError(f"prune_curve: order must be 'importance', 'exact', a GateResult or a list of (layer, head) pairs; got {order!r}")
    heads = [check_head(x, shape, f"prune_curve: order[{i}]") for i, x in enumerate(order)]
    if not heads:
        raise ValueError("prune_curve: order is an empty list of heads")
    seen = set()
    for h in heads:
        if h in seen:
            raise ValueError(f"prune_curve: order names head {h} twice")
        seen.add(h)
    return heads, None, "given"


def prune_curve(
    model,
    inputs,
    metric,
    order="importance",
    *,
    maximize: bool | None = None,
    ablation: Ablation = "zero",
    max_steps: int | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    progress: bool = True,
    backend: str = "auto",
) -> PruneCurve:
    """The metric as heads are removed one at a time.

    Args:
        inputs: ``[N, T]`` token ids or a dict (see :func:`headint.scan`).
        metric: a metric name, :class:`~headint.metrics.Metric` or callable; ``order="importance"``
            needs one with a gradient (a loss, logit difference, log-prob; not an accuracy).
        order: ``"importance"``, ``"exact"``, a :class:`~headint.results.gates.GateResult` (from
            :func:`headint.learn_gates`) or a list of ``(layer, head)`` pairs.
        maximize: the metric's direction (``"exact"`` removes the head whose removal leaves the
            best metric); built-in metrics know theirs, a custom metric with ``order="exact"``
            needs it.
        ablation: ``"zero"`` or ``"mean"`` (a removed head's output becomes its mean over the
            inputs, per position, padding left out).
        max_steps: stop after this many removals (default: every head, or the given list).
        batch_size: rows (variant x example) per forward; None sizes them from ``memory_budget``.

    Returns a :class:`~headint.results.prune.PruneCurve` (``to_frame()``: step, removed head,
    fraction removed, metric, stderr; ``plot()``).
    """
    batch_size = check_batch_size(batch_size)
    check_ablation(ablation, "prune_curve")
    setup = prepare_scan(model, inputs, None, metric, kind="prune", backend=backend)
    shape, N, device = setup.shape, setup.N, setup.device
    L, H = shape.n_layers, shape.n_heads
    greedy = isinstance(order, str) and order in PRUNE_ORDERS
    if isinstance(order, str) and order == "importance":
        require_autograd("headint.prune_curve(order='importance')")
    if isinstance(order, str) and not greedy:
        raise ValueError(f"prune_curve: order must be one of {PRUNE_ORDERS}, a GateResult or a list of (layer, head) pairs; got {order!r}")
    fixed, fixed_scores, order_name = (None, None, order) if greedy else _given_order(order, shape)
    up = metric_direction(setup.metric, maximize, "prune_curve") if (order == "exact" or maximize is not None) else setup.metric.maximize
    total = L * H if greedy else len(fixed)
    if max_steps is not None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"prune_curve: max_steps must be a positive int or None, got {max_steps!r}")
        total = min(total, max_steps)

    # (the scan's replica holds the weights detached: no gradient reaches them, their flags stay as they are)
    with setup.base_runs() as runs:
        base = runs.clean
        patches = ablation_patches(base, ablation)
        if batch_size is None:
            geometry = setup.row_geometry(base, patched_layers=L, keeps_graph=order == "importance")
            batch_size = auto_rows(geometry, setup.memory_budget(memory_budget))

        def evaluate(removed_sets: list[list[tuple[int, int]]]) -> torch.Tensor:
            """``[len(removed_sets), N]``: the metric with each set of heads ablated (no graph)."""
            var = torch.arange(len(removed_sets)).repeat_interleave(N)
            ex = torch.arange(N).repeat(len(removed_sets))
            masks = removed_masks(shape, removed_sets, device)

            def run(rows: torch.Tensor) -> torch.Tensor:
                m = masks[var[rows].to(device)]
                return base.run(ex[rows].to(device), mask_plan([m[:, l] for l in range(L)], patches)).float().cpu()

            parts = [run_in_halves(run, torch.arange(s, min(len(var), s + batch_size)), device, "headint.prune_curve")
                     for s in range(0, len(var), batch_size)]
            return torch.cat(parts).view(len(removed_sets), N)

        nan = NonFinite(setup.metric, "prune_curve")

        def importance(removed: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
            """Metric values ``[N]`` with ``removed`` ablated and ``mean_i |d metric_i / d m|`` ``[L, H]``
            over the examples whose value and gradient are finite (each row's mask is its own leaf,
            so a NaN row cannot reach another row's gradient)."""
            values, grads, used = [], torch.zeros(L, H), torch.zeros(N, dtype=torch.bool)
            for s in range(0, N, batch_size):
                ex = torch.arange(s, min(N, s + batch_size), device=device)
                m = removed_masks(shape, [removed], device).expand(len(ex), L, H).clone().requires_grad_(True)
                with torch.enable_grad():
                    v = base.run_differentiable(ex, mask_plan([m[:, l] for l in range(L)], patches))
                    ok = torch.isfinite(v.detach())
                    (g,) = torch.autograd.grad(v[ok].sum(), m) if bool(ok.any()) else (torch.zeros_like(m),)
                good = (ok & torch.isfinite(g).flatten(1).all(1)).cpu()
                values.append(v.detach().float().cpu())
                grads += g.detach()[good.to(g.device)].abs().sum(0).float().cpu()
                used[ex.cpu()] = good
            nan.note(torch.where(used, 0.0, float("nan")), "(value or gradient) in the importance estimates", steps=[len(removed)],
                     how="those examples are left out of that step's importance")
            if not bool(used.any()):
                raise ValueError(f"prune_curve: the metric {setup.metric.name!r} or its gradient is NaN or infinite for every "
                                 f"example with {len(removed)} heads removed, so no head importance can be estimated; fix the "
                                 "metric or the inputs")
            return torch.cat(values), grads / int(used.sum())

        removed: list[tuple[int, int]] = []
        scores: list = []
        rows = [base.base_values().float().cpu()]
        finite_or_refuse(rows[0], setup.metric, "prune_curve", "with no head removed")
        bar = tqdm(range(total), desc="headint.prune_curve", disable=not progress, unit="head")
        if not greedy:
            prefixes = [fixed[: s + 1] for s in range(total)]
            values = evaluate(prefixes)
            removed, scores = fixed[:total], fixed_scores[:total] if fixed_scores else [None] * total
            rows += list(values)
            bar.update(total)
        else:
            for _ in bar:
                remaining = [(l, h) for l in range(L) for h in range(H) if (l, h) not in removed]
                if order == "importance":
                    if removed:
                        values, imp = importance(removed)
                        rows[-1] = values  # the run at this mask also gives the metric (same numbers as a plain forward)
                    else:
                        _, imp = importance(removed)
                    pick = min(remaining, key=lambda x: (float(imp[x]), x))
                    scores.append(float(imp[pick]))
                    removed.append(pick)
                    rows.append(None)
                else:
                    after = evaluate([removed + [c] for c in remaining])  # [C, N]
                    means = finite_mean(after)  # each candidate over its finite examples; NaN where none is
                    if not bool(torch.isfinite(means).any()):
                        raise ValueError(f"prune_curve: at step {len(removed) + 1}, removing any of the {len(remaining)} remaining heads leaves the "
                                         f"metric {setup.metric.name!r} NaN or infinite for every example, so no head can be "
                                         "chosen; fix the metric, or pass max_steps to stop before this step")
                    nan.note(after, "among the candidate removals", steps=[len(removed) + 1],
                             how="each candidate's mean is over its finite examples (candidates with none are never chosen)")
                    ranked = torch.where(torch.isfinite(means), means, torch.tensor(float("-inf") if up else float("inf"),
                                                                                    dtype=means.dtype))
                    best = int(torch.argmax(ranked) if up else torch.argmin(ranked))  # first best: lowest (layer, head)
                    scores.append(float(means[best]))
                    removed.append(remaining[best])
                    rows.append(after[best])
            if order == "importance":
                rows[-1] = evaluate([removed])[0]
        bar.close()
        curve_values = torch.stack(rows)  # [S + 1, N]
        steps = (~torch.isfinite(curve_values)).any(1).nonzero().flatten().tolist()
        nan.note(curve_values, "in the curve", steps=steps,
                 how="each step's metric and stderr use only its finite examples (PruneCurve.n per step)")
        nan.warn()

    settings = dict(setup.settings, order=order_name, ablation=ablation, max_steps=max_steps, batch_rows=batch_size, maximize=up)
    return PruneCurve(list(removed), curve_values, scores, L * H, setup.metric.name, up, order_name, settings)
