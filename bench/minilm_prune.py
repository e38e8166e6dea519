"""Pruning curve and gradient-vs-exact importance on the real all-MiniLM-L6-v2 weights
(needs the optional extra ``minilm``).

On the paraphrase task (:mod:`headint.tasks.paraphrase`; metric: the paraphrase margin, higher is
better, the 72 heads mean-ablated):

- the greedy pruning curve by gradient importance (:func:`headint.prune_curve`,
  ``order="importance"``): the margin after each removal;
- the Spearman rank agreement between gradient importance ``mean_i |d margin_i / d m_h|`` at the
  intact model and the size of the exact single-head mean-ablation effect (:func:`headint.scan`).

Run: ``python bench/minilm_prune.py``. Prints a JSON summary; nothing is asserted.
"""

from __future__ import annotations

import json
import time

import torch
from scipy.stats import spearmanr

import headint
from headint.models.minilm import load_minilm
from headint.tasks.paraphrase import PARAPHRASE_TRIPLES, paraphrase_batch, paraphrase_margin_metric


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    batch = paraphrase_batch(model, tokenizer, PARAPHRASE_TRIPLES)
    metric = paraphrase_margin_metric()
    t = time.perf_counter()
    exact = headint.scan(model, batch, metric, method="mean", progress=False)
    t_exact = time.perf_counter() - t
    t = time.perf_counter()
    curve = headint.prune_curve(model, batch, metric, order="importance", ablation="mean", maximize=True, progress=False)
    t_curve = time.perf_counter() - t
    # gradient importance at the intact model = the first step's estimate; recompute it for every head
    grad = headint.attribution_scan(model, batch, None, metric, method="mask")  # zero-ablation derivative
    first = headint.prune_curve(model, batch, metric, order="importance", ablation="mean", max_steps=1, maximize=True, progress=False)
    L, H = exact.values.shape
    rho_mask = spearmanr(grad.effect.abs().flatten().numpy(), exact.effect.abs().flatten().numpy()).statistic
    # mean-ablation gradient importance for every head: d margin / d m with the mean as patch
    from headint.scans.masking import ablation_patches, mask_plan
    from headint.scans.setup import prepare_scan

    setup = prepare_scan(model, batch, None, metric, kind="bench", backend="auto")
    with setup.base_runs() as runs:
        m = torch.ones(setup.N, L, H, requires_grad=True)
        with torch.enable_grad():
            v = runs.clean.run_differentiable(torch.arange(setup.N), mask_plan([m[:, l] for l in range(L)], ablation_patches(runs.clean, "mean")))
            (g,) = torch.autograd.grad(v.sum(), m)
    importance = g.abs().mean(0)
    rho = spearmanr(importance.flatten().numpy(), exact.effect.abs().flatten().numpy()).statistic
    pick = [0, 6, 12, 18, 24, 36, 48, 60, 72]
    print(json.dumps(dict(
        n_examples=setup.N, heads=L * H,
        intact_margin=float(curve.metric[0]),
        curve={f"{s / (L * H):.3f}": round(float(curve.metric[s]), 4) for s in pick},
        first_removed=[f"L{l}H{h}" for l, h in curve.removed[:10]],
        spearman_gradient_vs_exact_mean_ablation=round(float(rho), 3),
        spearman_zero_mask_gradient_vs_exact_mean_ablation=round(float(rho_mask), 3),
        first_step_check=first.removed == curve.removed[:1],
        seconds=dict(exact_scan=round(t_exact, 1), prune_curve=round(t_curve, 1)),
    ), indent=1))


if __name__ == "__main__":
    main()
