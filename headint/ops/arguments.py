"""Validation and canonical layout of ``headint.attention``'s arguments.

Every backend receives the same :class:`AttentionArgs`: the user's tensors viewed
(never copied) at their full logical shapes, with stride 0 on broadcast
dimensions. Kernels read them through their strides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .knockout import as_knockout_list, knockout_bits

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class AttentionArgs:
    """Canonical operands of one intervened attention call.

    q ``[B, Hq, Tq, D]``; k, v ``[B, Hkv, Tk, D]``.
    mask: ``None`` or ``[B, Hq, Tq, Tk]`` bool (True = keep) or float (additive), a view.
    q_bits / k_bits: ``None`` or int32 ``[B, Hq, Tq]`` / ``[B, Hq, Tk]`` knockout words.
    head_mask: ``None`` or float32 (float64 for float64 inputs) ``[B, Hq, Tq]``; head_patch: ``None`` (zeros) or ``[B, Hq, Tq, D]``.
    score_scale: ``None`` or float32 ``[B, Hq]``.
    window: ``None`` or the sliding-window size: with ``causal``, keys with ``0 <= i' - j < window``
    are kept; without, keys with ``|i' - j| < window`` (``i'`` the query's position aligned to the
    end of the keys).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    q_bits: torch.Tensor | None
    k_bits: torch.Tensor | None
    head_mask: torch.Tensor | None
    head_patch: torch.Tensor | None
    score_scale: torch.Tensor | None
    scale: float
    causal: bool
    window: int | None

    @property
    def has_intervention(self) -> bool:
        return any(x is not None for x in (self.q_bits, self.head_mask, self.score_scale))


def _shape(x: torch.Tensor) -> list[int]:
    return list(x.shape)


def _check_tensor(x: Any, name: str, expected: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
    return x


def _view_as(x: torch.Tensor, name: str, rank_layout: dict[int, tuple[int, ...]], full: tuple[int, ...], expected: str,
             dim_names: tuple[str, ...] = ("B", "Hq", "Tq", "D")):
    """View ``x`` at the full shape: its rank decides which full dims it names.

    ``rank_layout[r]`` gives, for an input of rank ``r``, the full-shape dims its
    axes map to; the remaining dims are broadcast (stride 0).
    """
    if x.dim() not in rank_layout:
        raise ValueError(f"{name} has shape {_shape(x)}; expected one of {expected} with {_dims_text(full, dim_names)}")
    dims = rank_layout[x.dim()]
    view_shape = [1] * len(full)
    for axis, d in enumerate(dims):
        view_shape[d] = x.shape[axis]
    for d, n in enumerate(view_shape):
        if n not in (1, full[d]):
            raise ValueError(f"{name} has shape {_shape(x)}; expected one of {expected} with {_dims_text(full, dim_names)}")
    return x.reshape(view_shape).expand(full)


def _dims_text(full: tuple[int, ...], names: tuple[str, ...]) -> str:
    return ", ".join(f"{n}={s}" for n, s in zip(names, full) if n != "1")


def prepare(
    q,
    k,
    v,
    *,
    causal: bool = False,
    attn_mask=None,
    scale: float | None = None,
    head_mask=None,
    head_patch=None,
    knockout=None,
    score_scale=None,
    window: int | None = None,
) -> AttentionArgs:
    """Validate the user's arguments and return their canonical views."""
    q = _check_tensor(q, "q", "[B, Hq, Tq, D]")
    k = _check_tensor(k, "k", "[B, Hkv, Tk, D]")
    v = _check_tensor(v, "v", "[B, Hkv, Tk, D]")
    if q.dim() != 4:
        raise ValueError(f"q has shape {_shape(q)}; expected 4 dims [B, Hq, Tq, D]")
    if k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"k and v must be 4-dim [B, Hkv, Tk, D]; got k {_shape(k)}, v {_shape(v)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, Tk, D]; got k {_shape(k)}, v {_shape(v)}")
    B, Hq, Tq, D = q.shape
    _, Hkv, Tk, Dk = k.shape
    if k.shape[0] != B:
        raise ValueError(f"k has batch size {k.shape[0]} (shape {_shape(k)}) but q has {B} (shape {_shape(q)})")
    if Dk != D:
        raise ValueError(f"k has head dim {Dk} (shape {_shape(k)}) but q has {D} (shape {_shape(q)})")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}, shape {_shape(q)}) must be a multiple of k/v heads ({Hkv}, shape {_shape(k)})")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    device = q.device

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)
    if window is not None:
        window = int(window)
        if window < 1:
            raise ValueError(f"window must be a positive int, got {window}")

    full4 = (B, Hq, Tq, Tk)
    mask = None
    if attn_mask is not None:
        attn_mask = _check_tensor(attn_mask, "attn_mask", "broadcastable to [B, Hq, Tq, Tk]")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = attend) or floating (additive); got {attn_mask.dtype}")
        if attn_mask.device != device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, q on {device}")
        mask = _broadcast(attn_mask, "attn_mask", full4)

    # knockout: compact Knockout objects, or a dense bool mask of removed edges.
    q_bits = k_bits = None
    if isinstance(knockout, torch.Tensor):
        if knockout.dtype != torch.bool:
            raise TypeError(f"a dense knockout must be a bool tensor (True = edge removed), got {knockout.dtype}")
        if knockout.device != device:
            raise ValueError(f"knockout is on {knockout.device}, q on {device}")
        removed = _broadcast(knockout, "knockout", full4)
        if mask is None:
            mask = ~removed
        elif mask.dtype == torch.bool:
            mask = mask & ~removed
        else:
            mask = mask.masked_fill(removed, float("-inf"))
    else:
        kos = as_knockout_list(knockout)
        if kos:
            q_bits, k_bits = knockout_bits(kos, B, Hq, Tq, Tk, device)

    if head_patch is not None and head_mask is None:
        raise ValueError("head_patch was given without head_mask; pass head_mask (0 = use the patch, 1 = keep the head)")
    if head_mask is not None:
        head_mask = _as_float(head_mask, "head_mask", device, q.dtype)
        head_mask = _view_as(
            head_mask, "head_mask",
            {1: (1,), 2: (0, 1), 3: (0, 1, 2), 4: (0, 1, 2, 3)},
            (B, Hq, Tq, 1), "[Hq], [B, Hq], [B, Hq, Tq] or [B, Hq, Tq, 1]", ("B", "Hq", "Tq", "1"),
        )[..., 0]
    if head_patch is not None:
        head_patch = _check_tensor(head_patch, "head_patch", "broadcastable to [B, Hq, Tq, D]")
        if not head_patch.is_floating_point():
            raise TypeError(f"head_patch must be floating, got {head_patch.dtype}")
        if head_patch.device != device:
            raise ValueError(f"head_patch is on {head_patch.device}, q on {device}")
        head_patch = _view_as(
            head_patch.to(q.dtype), "head_patch",
            {2: (1, 3), 3: (1, 2, 3), 4: (0, 1, 2, 3)},
            (B, Hq, Tq, D), "[Hq, D], [Hq, Tq, D] or [B, Hq, Tq, D]",
        )
    if score_scale is not None:
        score_scale = _as_float(score_scale, "score_scale", device, q.dtype)
        score_scale = _view_as(score_scale, "score_scale", {1: (1,), 2: (0, 1)}, (B, Hq), "[Hq] or [B, Hq]", ("B", "Hq"))

    return AttentionArgs(q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, scale, bool(causal), window)


def _as_float(x: Any, name: str, device: torch.device, like: torch.dtype) -> torch.Tensor:
    """``x`` as float32 (float64 when the attention runs in float64)."""
    if isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a tensor (e.g. [Hq]); got a Python number {x!r}")
    x = _check_tensor(x, name, "a tensor")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, q on {device}")
    if not (x.is_floating_point() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be floating or bool, got {x.dtype}")
    return x.to(torch.float64 if like == torch.float64 else torch.float32)


def _broadcast(x: torch.Tensor, name: str, full: tuple[int, ...]) -> torch.Tensor:
    if x.dim() > len(full):
        raise ValueError(f"{name} has shape {_shape(x)}; expected at most {len(full)} dims broadcastable to {list(full)}")
    try:
        return x.expand(full)
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {_shape(x)}, which does not broadcast to {list(full)} ([B, Hq, Tq, Tk])"
        ) from None
