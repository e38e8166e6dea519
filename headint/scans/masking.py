"""Running a model under per-head masks: what learned gates and pruning curves share.

A *head mask* here is one number per (row, layer, head): ``1`` keeps the head, ``0`` replaces
its output by the ablation value (zeros, or its mean over the inputs), values in between blend
the two (``out = m * attn + (1 - m) * patch``, the blend of :func:`headint.attention`). The
masks travel as a :class:`~headint.plan.TensorPlan` ``head_mask`` ``[R, H, 1]`` per layer, so
the fused kernels apply them and, in a differentiable run, return ``d metric / d mask`` from
their backward pass (no hooks).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..metrics import Metric
from ..interventions import CallPlan
from ..plan import TensorPlan
from ..shape import ModelShape
from .runner import VariantRunner


@contextlib.contextmanager
def frozen_parameters(model):
    """Every parameter's ``requires_grad`` False inside; each flag restored on exit (also on error)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)

ABLATIONS = ("zero", "mean")

# Direction of the built-in metrics: True = higher is better.
_HIGHER_IS_BETTER = {"logit_diff": True, "logprob": True, "prob": True, "loss": False, "kl": False}


def metric_direction(metric: Metric, maximize: Any, who: str) -> bool:
    """Whether ``metric`` is to be maximised: ``maximize`` when given (a bool), else the known
    direction of a built-in metric (``logit_diff``/``logprob``/``prob`` up, ``loss``/``kl``
    down); a custom metric without ``maximize`` is an error naming both."""
    if maximize is not None:
        if not isinstance(maximize, bool):
            raise TypeError(f"{who}: maximize must be True, False or None (the metric's known direction), got {maximize!r}")
        return maximize
    if metric.name in _HIGHER_IS_BETTER:
        return _HIGHER_IS_BETTER[metric.name]
    raise ValueError(
        f"{who}: metric {metric.name!r} has no known direction; pass maximize=True (higher is better, e.g. an "
        "accuracy or logit difference) or maximize=False (lower is better, e.g. a loss)"
    )


def check_ablation(ablation: Any, who: str) -> str:
    if ablation not in ABLATIONS:
        raise ValueError(f"{who}: ablation must be one of {ABLATIONS}, got {ablation!r}")
    return ablation


def ablation_patches(runner: VariantRunner, ablation: str) -> dict[int, torch.Tensor | None]:
    """``{layer: patch}``: what a masked head is replaced by. ``"zero"``: None (zeros);
    ``"mean"``: each head's output averaged over the runner's examples, per position, padding
    left out, as ``[1, H, T, D]`` (head-major)."""
    L = runner.parts.shape.n_layers
    if ablation == "zero":
        return {l: None for l in range(L)}
    w = runner.batch["attention_mask"].float()
    out = {}
    for l in range(L):
        z = runner.base.z[l]  # [N, T, H, D]
        mean = (z.float() * w[..., None, None]).sum(0) / w.sum(0).clamp_min(1)[:, None, None]  # [T, H, D]
        out[l] = mean.transpose(0, 1)[None].to(z.dtype)
    return out


def mask_plan(masks: list[torch.Tensor], patches: dict[int, torch.Tensor | None]) -> TensorPlan:
    """A plan applying ``masks[l]`` ``[R, H]`` at every layer ``l`` (broadcast over positions),
    masked heads replaced by ``patches[l]`` (see :func:`ablation_patches`)."""
    return TensorPlan({l: CallPlan(head_mask=m[:, :, None], head_patch=patches[l]) for l, m in enumerate(masks)})


def removed_masks(shape: ModelShape, removed: list[list[tuple[int, int]]], device) -> torch.Tensor:
    """``[R, L, H]`` float masks: row ``r`` has 0 at each head of ``removed[r]``, 1 elsewhere."""
    m = torch.ones(len(removed), shape.n_layers, shape.n_heads, device=device)
    for r, heads in enumerate(removed):
        for l, h in heads:
            m[r, l, h] = 0.0
    return m


def check_head(x: Any, shape: ModelShape, what: str) -> tuple[int, int]:
    """``x`` as a ``(layer, head)`` pair of ints inside the model, or an error naming ``what``."""
    try:
        l, h = x
        l, h = int(l), int(h)
        if isinstance(x[0], bool) or isinstance(x[1], bool) or l != x[0] or h != x[1]:
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a (layer, head) pair of ints, got {x!r}") from None
    if not (0 <= l < shape.n_layers and 0 <= h < shape.n_heads):
        raise ValueError(f"{what} {(l, h)} out of range: the model has {shape.n_layers} layers of {shape.n_heads} heads")
    return l, h
