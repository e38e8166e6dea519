"""The fused attention operator shared by every kernel backend.

One ``torch.library`` operator pair, ``headint::attention_fwd`` and ``headint::attention_bwd``,
whose flat schema is derived from :class:`~headint.ops.arguments.AttentionArgs`'s field list
(:meth:`~headint.ops.arguments.AttentionArgs.schema_arguments`), with autograd registered on the
forward op and a fake (meta) implementation on both, so ``torch.compile`` traces straight
through. Nothing here names an operand: adding one to the dataclass needs no edit in this file.

The implementation of each op rebuilds the :class:`AttentionArgs` and hands it to the kernel of
the backend named by the ``backend`` argument (:func:`headint.ops.backends.kernel`), a
:class:`~headint.ops.backends.Kernel` with

``forward(args) -> (out [B,Hq,Tq,Dv] q.dtype, lse [B,Hq,Tq] float32, attn [B,Hq,Tq,Dv] q.dtype or None)``
    ``attn`` is the head output before the head_mask/head_patch blend, given when ``args.blends``
    (else None: then ``attn == out``). Rows whose every key is removed have ``attn = 0`` and
    ``lse = -inf``; rows that read a NaN have ``lse = NaN`` (see :func:`headint.attention`).

``backward(args, dout, attn, lse) -> {operand name: gradient}``
    ``attn`` is the pre-blend output (``out`` itself when nothing blends). One gradient per
    present differentiable operand (:meth:`AttentionArgs.differentiable_names`), at the operand's
    full (unbroadcast) shape; this module casts it to the operand's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .arguments import AttentionArgs

_LIB = torch.library.Library("headint", "DEF")  # noqa: TOR901 (the schema is generated)
_SCHEMA = AttentionArgs.schema_arguments()
_LIB.define(f"attention_fwd({_SCHEMA}, str backend) -> (Tensor out, Tensor lse, Tensor attn)")
_LIB.define(f"attention_bwd(Tensor dout, Tensor attn, Tensor lse, {_SCHEMA}, str backend) -> Tensor[]")

_DIFFERENTIABLE = AttentionArgs.differentiable_names()


def _args(tensors, present, scalars) -> AttentionArgs:
    return AttentionArgs.unflatten(tensors, present, scalars)


def _split(flat):
    """``(tensors, present, *scalars, backend)`` -> ``(tensors, present, scalars, backend)``."""
    return flat[0], flat[1], list(flat[2:-1]), flat[-1]


def _empty_like_output(a: AttentionArgs) -> tuple[Tensor, Tensor, Tensor]:
    shape = a.output_shape
    out = a.q.new_empty(shape)
    lse = a.q.new_empty(shape[:3], dtype=torch.float32)
    attn = a.q.new_empty(shape) if a.blends else a.q.new_empty(0)
    return out, lse, attn


def _fwd_impl(*flat):
    tensors, present, scalars, backend = _split(flat)
    a = _args(tensors, present, scalars)
    out, lse, attn = backends.kernel(backend).forward(a)
    if attn is None:
        attn = a.q.new_empty(0)
    return out, lse, attn


def _fwd_fake(*flat):
    tensors, present, scalars, _ = _split(flat)
    return _empty_like_output(_args(tensors, present, scalars))


def _grad_slots(a: AttentionArgs) -> list[tuple[str, Tensor | None]]:
    return [(n, getattr(a, n)) for n in _DIFFERENTIABLE]


def _bwd_impl(dout, attn, lse, *flat):
    tensors, present, scalars, backend = _split(flat)
    a = _args(tensors, present, scalars)
    grads = backends.kernel(backend).backward(a, dout, attn, lse)
    result = []
    for name, x in _grad_slots(a):
        if x is None:
            result.append(a.q.new_empty(0))
            continue
        g = grads.get(name)
        if g is None or tuple(g.shape) != tuple(x.shape):
            got = None if g is None else list(g.shape)
            raise RuntimeError(f"backend {backend!r} returned gradient {name} of shape {got}; expected {list(x.shape)}")
        result.append(g.to(x.dtype))
    return result


def _bwd_fake(dout, attn, lse, *flat):
    tensors, present, scalars, _ = _split(flat)
    a = _args(tensors, present, scalars)
    return [a.q.new_empty(0) if x is None else x.new_empty(x.shape) for _, x in _grad_slots(a)]


torch.library.impl("headint::attention_fwd", "CompositeExplicitAutograd", _fwd_impl, lib=_LIB)
torch.library.impl("headint::attention_bwd", "CompositeExplicitAutograd", _bwd_impl, lib=_LIB)
torch.library.register_fake("headint::attention_fwd", _fwd_fake, lib=_LIB)
torch.library.register_fake("headint::attention_bwd", _bwd_fake, lib=_LIB)


def _setup_context(ctx, inputs, output):
    tensors, present, scalars, backend = _split(inputs)
    out, lse, attn = output
    ctx.save_for_backward(*tensors, out, lse, attn)
    ctx.n_tensors, ctx.present, ctx.scalars, ctx.backend = len(tensors), list(present), scalars, backend


def _backward(ctx, dout, _dlse, _dattn):
    saved = ctx.saved_tensors
    tensors, (out, lse, attn) = list(saved[: ctx.n_tensors]), saved[ctx.n_tensors:]
    a = _args(tensors, ctx.present, ctx.scalars)
    pre_blend = attn if a.blends else out
    grads = dict(zip(_DIFFERENTIABLE, torch.ops.headint.attention_bwd(
        dout.contiguous(), pre_blend, lse, tensors, ctx.present, *ctx.scalars, ctx.backend,
    )))
    tensor_grads = [grads.get(n) for n, x in zip(AttentionArgs.operand_names(), a.operands()) if x is not None]
    return (tensor_grads, None, *([None] * len(ctx.scalars)), None)


torch.library.register_autograd("headint::attention_fwd", _backward, setup_context=_setup_context, lib=_LIB)


def fused_forward(a: AttentionArgs, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Run the forward op: ``(out, lse, attn)`` (``attn`` empty unless ``a.blends``)."""
    tensors, present, scalars = a.flatten()
    return torch.ops.headint.attention_fwd(tensors, present, *scalars, backend)


def fused_attention(a: AttentionArgs, backend: str) -> Tensor:
    """Run the fused operator on canonical :class:`AttentionArgs`; returns ``[B, Hq, Tq, Dv]``."""
    return fused_forward(a, backend)[0]
