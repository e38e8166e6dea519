"""The model's final normalisation (GPT-2's ``ln_f``, Llama's ``norm``): find it, read its
per-token scale in a run, and run it with that scale frozen (in a private replica only).

A final LayerNorm computes ``y = (x - mean(x)) * s(x) * w + b`` and an RMSNorm ``y = x * s(x) * w``
(Gemma-style: ``w + 1``), with the per-token scale ``s(x) = 1 / sqrt(mean(c(x)^2) + eps)`` (``c``:
centring for LayerNorm, none for RMSNorm). Freezing ``s`` at its value in a base run makes the
norm an affine map of its input, so a change of the residual stream reaches the logits linearly:
the convention of TransformerLens's direct logit attribution (the residual stream's components
are divided by the cached ``ln_final`` scale) and what Rushing & Nanda (2024, "Explorations of
Self-Repair in Language Models") isolate when they count the final LayerNorm's rescaling as a
self-repair mechanism (a head whose output is removed shrinks the residual norm, the recomputed
scale grows, and the remaining components are amplified).

Which module is the final norm is observed, not guessed from its name: among the base model's
modules outside the transformer blocks whose class name contains ``Norm``, the one that runs
last, after the last block. Which formula it computes is observed too: the candidates (centred
or not, weight ``w`` or ``1 + w``) are each evaluated on the recorded input, and the one that
reproduces the module's own output to float tolerance is used; a norm that none reproduces is
refused, naming its class.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .adapter import ModelParts
from .blocks import _StandIn
from .replica import require_replica

_EPS_NAMES = ("eps", "variance_epsilon", "epsilon")


class FinalNormError(RuntimeError):
    """The model's final norm cannot be found or frozen; the message names the model or module."""


def final_norm_candidates(parts: ModelParts) -> list[tuple[str, nn.Module]]:
    """``(path in parts.base, module)`` of the base model's norm-like modules outside its blocks."""
    inside = {id(m) for m in parts.blocks.modules()}
    return [(name, m) for name, m in parts.base.named_modules()
            if name and id(m) not in inside and "norm" in type(m).__name__.lower()]


@dataclass(frozen=True)
class NormFormula:
    """How a final norm computes (see the module docstring): ``centred`` (LayerNorm) or not
    (RMSNorm), ``weight_offset`` (0: ``w``, 1: Gemma's ``1 + w``), ``eps``."""

    centred: bool
    weight_offset: float
    eps: float

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token scale ``1 / sqrt(mean(c(x)^2) + eps)`` ``[..., T]`` (fp32)."""
        return torch.rsqrt(self.centre(x).pow(2).mean(-1) + self.eps)

    def apply(self, module: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The norm's output for input ``x`` ``[..., T, d]`` with the per-token ``scale`` ``[..., T]``."""
        y = self.centre(x) * scale[..., None]
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            y = y * (w.float() + self.weight_offset)
        b = getattr(module, "bias", None)
        if isinstance(b, torch.Tensor):
            y = y + b.float()
        return y.to(x.dtype)


def _eps(module: nn.Module) -> float | None:
    for name in _EPS_NAMES:
        v = getattr(module, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def observe_formula(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> NormFormula:
    """The :class:`NormFormula` that reproduces ``y = module(x)`` (``x``, ``y`` ``[N, T, d]``:
    recorded in a run); :class:`FinalNormError` naming the module's class if none does."""
    eps = _eps(module)
    name = type(module).__name__
    if eps is None:
        raise FinalNormError(f"the final norm ({name}) has no epsilon attribute ({', '.join(_EPS_NAMES)}); headint cannot "
                             "freeze its scale")
    want = y.float()
    tol = (1e-4 if y.dtype == torch.float32 else 2e-2) * (1.0 + float(want.abs().max()))
    errors = []
    for centred in (True, False):
        for offset in (0.0, 1.0):
            f = NormFormula(centred, offset, eps)
            err = float((f.apply(module, x, f.scale(x)).float() - want).abs().max())
            if err <= tol:
                return f
            errors.append(err)
    raise FinalNormError(f"the final norm ({name}) computes neither a LayerNorm nor an RMSNorm of its input (closest "
                         f"candidate differs by {min(errors):.3g}, tolerance {tol:.3g}); headint cannot freeze its scale")


@dataclass(frozen=True)
class FinalNorm:
    """A model's final norm as observed in a base run: its ``path`` in the base model, its
    :class:`NormFormula`, and the base run's per-token ``scale`` ``[N, T]`` (fp32)."""

    path: str
    formula: NormFormula
    scale: torch.Tensor


class _FrozenScaleNorm(_StandIn):
    """Stands in for the final norm: the same affine map with the base run's scale of each row's
    example (``scale[ex]``), for the last ``T_in`` positions (rows fed from a later position or
    for the last query only end at the same last position)."""

    def __init__(self, norm: nn.Module, formula: NormFormula, scale: torch.Tensor):
        super().__init__(norm)
        self.formula = formula
        self.rows_scale = scale  # [R, T]

    def forward(self, x, *args, **kwargs):
        s = self.rows_scale
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != s.shape[0] or x.shape[1] > s.shape[1]:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise FinalNormError(f"the final norm's input has shape {shape}; the frozen scale expects [{s.shape[0]}, <= {s.shape[1]}, d]")
        return self.formula.apply(object.__getattribute__(self, "_original"), x, s[:, s.shape[1] - x.shape[1]:].to(x.device))


@contextlib.contextmanager
def frozen_final_norm(parts: ModelParts, norm: FinalNorm, ex: torch.Tensor) -> Iterator[None]:
    """Within the block, the final norm of ``parts`` (a replica's) divides by the base run's
    scale of examples ``ex`` ``[R]`` instead of recomputing it. Put back on exit."""
    require_replica(parts.base, "frozen_final_norm")
    parent_path, _, attr = norm.path.rpartition(".")
    parent = parts.base.get_submodule(parent_path) if parent_path else parts.base
    original = getattr(parent, attr)
    setattr(parent, attr, _FrozenScaleNorm(original, norm.formula, norm.scale[ex.to(norm.scale.device)]))
    try:
        yield
    finally:
        setattr(parent, attr, original)
