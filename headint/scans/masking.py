"""Running a model under per-head masks: what learned gates and pruning curves share.

A *head mask* here is one number per (row, layer, head): ``1`` keeps the head, ``0`` replaces
its output by the ablation value (zeros, or its mean over the inputs), values in between blend
the two (``out = m * attn + (1 - m) * patch``, the blend of :func:`headint.attention`). The
masks travel as a :class:`~headint.plan.TensorPlan` ``head_mask`` ``[R, H, 1]`` per layer, so
the fused kernels apply them and, in a differentiable run, return ``d metric / d mask`` from
their backward pass (no hooks).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..metrics import Metric
from ..interventions import CallPlan
from ..plan import TensorPlan
from ..results.stats import NaNMetricWarning, listing
from ..shape import ModelShape
from ..vocabulary import ABLATIONS, check_choice
from .runner import VariantRunner


def metric_direction(metric: Metric, maximize: Any, who: str) -> bool:
    """Whether ``metric`` is to be maximised: ``maximize`` when given (a bool), else the direction
    the metric carries (:attr:`Metric.maximize <headint.metrics.Metric.maximize>`: the built-ins
    know theirs). A metric without a direction is an error naming it, whatever its name: a
    function called ``loss`` is not taken to be minimised."""
    if maximize is not None:
        if not isinstance(maximize, bool):
            raise TypeError(f"{who}: maximize must be True, False or None (the metric's own direction), got {maximize!r}")
        return maximize
    if isinstance(metric.maximize, bool):
        return metric.maximize
    raise ValueError(
        f"{who}: metric {metric.name!r} ({type(metric).__name__}) carries no direction; pass maximize=True (higher is "
        "better, e.g. an accuracy or logit difference) or maximize=False (lower is better, e.g. a loss), or build it "
        "as CallableMetric(fn, maximize=...)"
    )


def finite_or_refuse(values: torch.Tensor, metric: Metric, who: str, what: str, examples: torch.Tensor | None = None) -> torch.Tensor:
    """The finite mask ``[R]`` of per-row metric values ``[R]``; ``ValueError`` when no row is
    finite (nothing to aggregate or to differentiate), naming ``what`` ran and the examples.
    ``examples`` ``[R]``: the example index of each row (default ``0..R-1``)."""
    ok = torch.isfinite(values)
    if not bool(ok.any()):
        ex = (torch.arange(len(values)) if examples is None else examples).tolist()
        raise ValueError(f"{who}: metric {metric.name!r} is NaN or infinite for every example {what} (examples "
                         f"[{listing(ex, 10)}]), so no value remains to aggregate; fix the metric or the inputs")
    return ok


class NonFinite:
    """Tally of the non-finite metric values a method left out, by kind, for one
    :class:`~headint.NaNMetricWarning` at the end (how many, at which steps, which examples)."""

    def __init__(self, metric: Metric, who: str):
        self.metric, self.who = metric, who
        self.kinds: dict[str, dict] = {}

    def note(self, values: torch.Tensor, kind: str, steps=(), examples: torch.Tensor | None = None, how: str = "") -> None:
        """Record the non-finite entries of ``values`` ``[..., N]`` under ``kind`` (e.g. "in the
        curve"), at ``steps``; ``examples``: the example index of the last dim's entries
        (default ``0..N-1``); ``how``: what was done about them."""
        bad = ~torch.isfinite(values)
        if not bool(bad.any()):
            return
        ex = torch.arange(values.shape[-1]) if examples is None else examples.cpu()
        e = self.kinds.setdefault(kind, dict(n=0, steps=[], examples=set(), how=how))
        e["n"] += int(bad.sum())
        e["steps"] += [s for s in steps if s not in e["steps"]]
        e["examples"] |= {int(i) for i in ex[bad.reshape(-1, values.shape[-1]).any(0).cpu()]}

    def warn(self) -> None:
        parts = []
        for kind, e in self.kinds.items():
            at = f" at steps [{listing(e['steps'], 10)}]" if e["steps"] else ""
            parts.append(f"{e['n']} value{'s' if e['n'] != 1 else ''} {kind}{at} (examples [{listing(sorted(e['examples']), 10)}])"
                         + (f": {e['how']}" if e["how"] else ""))
        if parts:
            warnings.warn(f"{self.who}: metric {self.metric.name!r} is NaN or infinite for " + "; ".join(parts),
                          NaNMetricWarning, stacklevel=3)


def check_ablation(ablation: Any, who: str) -> str:
    return check_choice(ablation, ABLATIONS, "ablation", who)


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
