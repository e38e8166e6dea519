"""Attribution patching: first-order estimates of every head's patching effect from one
forward and one backward pass (Nanda 2023, "attribution patching"; Syed et al. 2023),
and gradient head importance (Michel et al. 2019)."""

from __future__ import annotations

import contextlib

import torch

from ..integration.adapter import model_shape
from ..metrics import as_metric
from ..plan import TensorPlan
from ..results import ScanResult
from .runner import base_runs, eval_mode, paired_batches

ATTRIBUTION_METHODS = ("patch", "mask")


@contextlib.contextmanager
def _frozen_parameters(model):
    """No parameter gradients inside (only the head masks need them); flags restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def attribution_scan(
    model,
    clean,
    corrupt=None,
    metric="logit_diff",
    *,
    method: str = "patch",
    direction: str = "noising",
    per_position: bool = False,
    batch_size: int | None = None,
    backend: str = "auto",
) -> ScanResult:
    """Approximate scan: the first-order change of ``metric`` for every head (and position).

    ``method="patch"`` (attribution patching): with ``z`` the head outputs of the base run and
    ``z'`` those of the other run, the estimate is ``(z' - z) . d metric / d z`` per head (summed
    over positions, or per position). ``direction="noising"`` takes the clean run as base and
    patches corrupt ``z'`` in; ``"denoising"`` the reverse.

    ``method="mask"`` (head importance, Michel et al. 2019): the derivative of the metric with
    respect to a multiplicative head mask ``m`` at ``m = 1`` on the clean run; the estimate of
    zero-ablating a head is ``-dmetric/dm`` (importance is its absolute value).

    Both read the gradient with respect to the blend mask of :func:`headint.attention`
    (``out = m * attn + (1 - m) * patch`` at ``m = 1``): ``dmetric/dm = dO . (attn - patch)``,
    which the fused kernels compute inside their backward pass. Cost: one forward over each
    input set (to record ``z``) and one forward+backward over the base run.

    Returns a :class:`~headint.results.ScanResult` whose per-example values are
    ``base metric + estimate``, directly comparable with :func:`headint.scan`.
    """
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"method must be one of {ATTRIBUTION_METHODS}, got {method!r}")
    if direction not in ("noising", "denoising"):
        raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}")
    if method == "patch" and corrupt is None:
        raise ValueError("method='patch' needs corrupt= inputs")
    metric = as_metric(metric)
    shape = model_shape(model)
    clean_b, corrupt_b = paired_batches(clean, corrupt, "clean")
    N, T = clean_b["input_ids"].shape
    device = next(model.parameters()).device

    with eval_mode(model):
        runs = base_runs(model, clean_b, corrupt_b, metric, backend)
        clean_runner, corrupt_runner = runs.clean, runs.corrupt
        clean_values, corrupt_values = runs.clean_values, runs.corrupt_values
        if method == "patch" and direction == "denoising":
            base, source = corrupt_runner, clean_runner
        else:
            base, source = clean_runner, corrupt_runner
        base_values = base.base_values()

        Tm = T if per_position else 1
        rows = batch_size or N
        estimates = torch.zeros(shape.n_layers, shape.n_heads, Tm, N)
        backward_passes = 0
        with _frozen_parameters(model):
            for s in range(0, N, rows):
                ex = torch.arange(s, min(N, s + rows), device=device)
                masks = {l: torch.ones(len(ex), shape.n_heads, Tm, device=device, requires_grad=True) for l in range(shape.n_layers)}
                spec = {}
                for l, m in masks.items():
                    patch = source.base.z[l][ex].transpose(1, 2) if method == "patch" else None
                    spec[l] = {"head_mask": m, "head_patch": patch}
                with torch.enable_grad():
                    values = base.run_differentiable(ex, TensorPlan(spec))
                    grads = torch.autograd.grad(values.sum(), [masks[l] for l in range(shape.n_layers)])
                backward_passes += 1
                for l, g in enumerate(grads):
                    estimates[l, :, :, ex.cpu()] = -g.detach().float().cpu().permute(1, 2, 0)

    if per_position:
        per_example = estimates + base_values.cpu()[None, None, None, :]
        axes = ("layer", "head", "position")
    else:
        per_example = estimates[:, :, 0] + base_values.cpu()[None, None, :]
        axes = ("layer", "head")
    settings = dict(kind="attribution", method=method, direction=direction if method == "patch" else None,
                    per_position=per_position, metric=repr(metric), model=type(model).__name__, n_examples=N, seq_len=T,
                    base_baseline=float(base_values.mean()), cost={**runs.cost(), "backward_passes": backward_passes})
    return ScanResult(per_example, axes, metric_name=metric.name, clean_baseline=float(clean_values.mean()),
                      corrupt_baseline=None if corrupt_values is None else float(corrupt_values.mean()), settings=settings,
                      base_per_example=base_values)

