"""The fused attention operator shared by every kernel backend.

One ``torch.library`` custom operator pair, ``headint::attention_fwd`` and
``headint::attention_bwd``, with per-backend implementations (Triton kernels on
CUDA or in the Triton interpreter, the native CPU kernel from ``csrc/``).
Autograd is registered on the forward op and a fake (meta) implementation on
both, so ``torch.compile`` traces straight through.

A backend implementation is an object with two functions of this signature
(all operands are the canonical views of :class:`~headint.ops.arguments.AttentionArgs`;
optional ones may be ``None``):

``forward(q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, scale, causal, window)
-> (out [B,Hq,Tq,D] q.dtype, lse [B,Hq,Tq] float32, attn [B,Hq,Tq,D] q.dtype or empty)``
    ``attn`` is the head output before the head_mask/head_patch blend; backends return an
    empty tensor for it when ``head_mask`` is None (then ``attn == out``). ``window`` is -1 for none.
    Rows whose every key is removed have ``out = 0`` (before the blend) and ``lse = -inf``.

``backward(dout, q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, scale, causal, window, attn, lse)
-> (dq [B,Hq,Tq,D], dk [B,Hkv,Tk,D], dv [B,Hkv,Tk,D], dhead_mask [B,Hq,Tq] float32 or empty,
    dscore_scale [B,Hq] float32 or empty)``
    ``attn`` is the pre-blend output (``out`` itself when there is no head_mask).
    ``dhead_mask[b,h,i] = sum_d dout * (attn - patch)``; the patch gradient ``(1 - m) * dout``
    is formed by the caller.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor


class FusedImpl(Protocol):
    def forward(self, *args): ...

    def backward(self, *args): ...


_IMPLS: dict[str, FusedImpl] = {}


def register_impl(backend: str, impl: FusedImpl) -> None:
    """Make ``impl`` the implementation used when ``backend`` is asked for."""
    _IMPLS[backend] = impl


def _impl(backend: str) -> FusedImpl:
    try:
        return _IMPLS[backend]
    except KeyError:
        raise RuntimeError(f"no fused implementation registered for backend {backend!r}") from None


@torch.library.custom_op("headint::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    q_bits: Optional[Tensor],
    k_bits: Optional[Tensor],
    head_mask: Optional[Tensor],
    head_patch: Optional[Tensor],
    score_scale: Optional[Tensor],
    scale: float,
    causal: bool,
    window: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    out, lse, attn = _impl(backend).forward(
        q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, scale, causal, window
    )
    if attn is None:
        attn = q.new_empty(0)
    return out, lse, attn


@attention_fwd.register_fake
def _(q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, scale, causal, window, backend):
    B, H, T, D = q.shape
    out = q.new_empty(B, H, T, D)
    lse = q.new_empty(B, H, T, dtype=torch.float32)
    attn = q.new_empty(B, H, T, D) if head_mask is not None else q.new_empty(0)
    return out, lse, attn


@torch.library.custom_op("headint::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    q_bits: Optional[Tensor],
    k_bits: Optional[Tensor],
    head_mask: Optional[Tensor],
    head_patch: Optional[Tensor],
    score_scale: Optional[Tensor],
    scale: float,
    causal: bool,
    window: int,
    attn: Tensor,
    lse: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dm, dss = _impl(backend).backward(
        dout, q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, scale, causal, window, attn, lse
    )
    if dm is None:
        dm = q.new_empty(0, dtype=torch.float32)
    if dss is None:
        dss = q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dm, dss


@attention_bwd.register_fake
def _(dout, q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, scale, causal, window, attn, lse, backend):
    B, H, T, _ = q.shape
    dm = q.new_empty(B, H, T, dtype=torch.float32) if head_mask is not None else q.new_empty(0, dtype=torch.float32)
    dss = q.new_empty(B, H, dtype=torch.float32) if score_scale is not None else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dm, dss


def _setup_context(ctx, inputs, output):
    q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, scale, causal, window, backend = inputs
    out, lse, attn = output
    ctx.save_for_backward(q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, out, lse, attn)
    ctx.scale, ctx.causal, ctx.window, ctx.backend = scale, causal, window, backend


def _backward(ctx, dout, _dlse, _dattn):
    q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, out, lse, attn = ctx.saved_tensors
    pre_blend = attn if head_mask is not None else out
    dq, dk, dv, dm, dss = attention_bwd(
        dout.contiguous(), q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale,
        ctx.scale, ctx.causal, ctx.window, pre_blend, lse, ctx.backend,
    )
    dpatch = None
    if head_patch is not None and ctx.needs_input_grad[7]:
        dpatch = ((1 - head_mask[..., None]) * dout).to(head_patch.dtype)
    return (
        dq, dk, dv, None, None, None,
        dm if head_mask is not None else None,
        dpatch,
        dss if score_scale is not None else None,
        None, None, None, None,
    )


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_attention(a, backend: str) -> Tensor:
    """Run the fused operator on canonical :class:`AttentionArgs`; returns ``[B, Hq, Tq, D]``."""
    window = -1 if a.window is None else a.window
    out, _, _ = attention_fwd(
        a.q, a.k, a.v, a.mask, a.q_bits, a.k_bits, a.head_mask, a.head_patch, a.score_scale,
        a.scale, a.causal, window, backend,
    )
    return out
