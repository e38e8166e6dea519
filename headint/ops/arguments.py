"""Validation and canonical layout of ``headint.attention``'s arguments: the operand object.

Every backend receives the same :class:`AttentionArgs`: the user's tensors viewed (never copied)
at their full logical shapes, with stride 0 on broadcast dimensions. Kernels read them through
their strides. The same object crosses every boundary of the op: :func:`prepare` returns it, the
fused custom op (:mod:`headint.ops.fused`) flattens it into its schema and rebuilds it on the
other side, and the kernels' launchers (Triton ``headint_kernels.launch``, the C++ glue
:mod:`headint.ops.cpu_backend`) read its fields by name.

The dataclass's field list is the single description of the operands. Each field says whether it
is a tensor operand (optional or not, differentiable or not) or a scalar (with its schema type);
from that list come the custom op's flat signature (:meth:`AttentionArgs.schema_arguments`), its
fake implementation and its autograd (gradients for the differentiable tensor operands), and the
order of the C++ op's operand list (``Tensor?[] operands`` indexed by the same order; the kernel
reports its order through ``headint_cpu::operand_names``, checked against
:meth:`AttentionArgs.operand_names` when the kernel is loaded and by ``tests/ops``).

Adding an operand (say ``bias`` ``[B, Hq]``):

1. here: a field ``bias: torch.Tensor | None = tensor_operand(differentiable=True)`` placed
   among the tensor fields (or ``scalar_operand("float")`` among the scalars), its validation and
   canonical view in :func:`prepare`, and a line in the class docstring;
2. the reference (:mod:`headint.ops.reference`): what it means;
3. the kernels: the Triton launcher (``kernels/launch.py`` reads ``args.bias``, returns
   ``grads["bias"]``) and kernel bodies; the C++ kernel (``csrc/attention_cpu.cpp``: an entry in
   ``enum Operand`` and ``OPERAND_NAMES`` at the field's position, or a scalar parameter in the
   op's schema and signature in field order).

Nothing else changes: the custom op, its fake and autograd, the backend table and the glue are
generic over the fields. A backend that cannot run the new operand says so in its table entry
(``operands`` in :mod:`headint.ops.backends`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .knockout import as_knockout_list, knockout_bits

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor_operand(*, optional: bool = True, differentiable: bool = False):
    """A tensor field of :class:`AttentionArgs` (``None`` when absent, if ``optional``)."""
    return field(metadata={"kind": "tensor", "optional": optional, "differentiable": differentiable})


def scalar_operand(schema_type: str):
    """A scalar field of :class:`AttentionArgs`; ``schema_type`` is its torch schema type."""
    return field(metadata={"kind": "scalar", "schema": schema_type})


@dataclass
class AttentionArgs:
    """Canonical operands of one intervened attention call.

    q ``[B, Hq, Tq, D]``; k ``[B, Hkv, Tk, D]``; v ``[B, Hkv, Tk, Dv]`` (the value head dim ``Dv`` may
    differ from the query/key one ``D``, as in DeepSeek's MLA; outputs are ``[B, Hq, Tq, Dv]``).
    mask: ``None`` or ``[B, Hq, Tq, Tk]`` bool (True = keep) or float (additive), a view.
    q_bits / k_bits: ``None`` or int32 ``[B, Hq, Tq]`` / ``[B, Hq, Tk]`` knockout words.
    head_mask: ``None`` or float32 (float64 for float64 inputs) ``[B, Hq, Tq]``; head_patch: ``None`` (zeros) or ``[B, Hq, Tq, Dv]``.
    score_scale: ``None`` or float32 (float64 for float64 inputs) ``[B, Hq]``.
    sinks: ``None`` or float32 (float64 for float64 inputs) ``[B, Hq]``: a learned logit per head that
    joins every row's softmax denominator and contributes no value (gpt-oss attention sinks).
    scale: the score scale. causal: keys after each query are removed.
    window: ``None`` or the sliding-window size: with ``causal``, keys with ``0 <= i' - j < window``
    are kept; without, keys with ``|i' - j| < window`` (``i'`` the query's position aligned to the
    end of the keys).
    softcap: ``None`` or the logit soft-cap ``c > 0``: scores become ``c * tanh(s / c)`` after the
    scale and score scale, before the masks (Gemma 2).

    Field order is the operand order of the custom op and of the C++ kernel (see the module
    docstring); tensor fields come first, then the scalars.
    """

    q: torch.Tensor = tensor_operand(optional=False, differentiable=True)
    k: torch.Tensor = tensor_operand(optional=False, differentiable=True)
    v: torch.Tensor = tensor_operand(optional=False, differentiable=True)
    mask: torch.Tensor | None = tensor_operand()
    q_bits: torch.Tensor | None = tensor_operand()
    k_bits: torch.Tensor | None = tensor_operand()
    head_mask: torch.Tensor | None = tensor_operand(differentiable=True)
    head_patch: torch.Tensor | None = tensor_operand(differentiable=True)
    score_scale: torch.Tensor | None = tensor_operand(differentiable=True)
    sinks: torch.Tensor | None = tensor_operand(differentiable=True)
    scale: float = scalar_operand("float")
    causal: bool = scalar_operand("bool")
    window: int | None = scalar_operand("int?")
    softcap: float | None = scalar_operand("float?")

    # -- the field list, by kind ------------------------------------------------------------

    @classmethod
    def operand_names(cls) -> tuple[str, ...]:
        """Tensor operands, in field order (the index order of the kernels' operand lists)."""
        return tuple(f.name for f in fields(cls) if f.metadata["kind"] == "tensor")

    @classmethod
    def optional_operand_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata["kind"] == "tensor" and f.metadata["optional"])

    @classmethod
    def optional_names(cls) -> tuple[str, ...]:
        """Every operand a call may leave out (``None``): the optional tensors, then the optional
        scalars (schema type ``T?``), in field order. Backends declare which of these they take."""
        scalars = tuple(f.name for f in fields(cls) if f.metadata["kind"] == "scalar" and f.metadata["schema"].endswith("?"))
        return cls.optional_operand_names() + scalars

    @classmethod
    def differentiable_names(cls) -> tuple[str, ...]:
        """Tensor operands that receive gradients, in field order."""
        return tuple(f.name for f in fields(cls) if f.metadata["kind"] == "tensor" and f.metadata["differentiable"])

    @classmethod
    def scalar_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata["kind"] == "scalar")

    @classmethod
    def schema_arguments(cls) -> str:
        """The flat operator arguments: ``Tensor[] operands, bool[] present, <scalars>``.

        ``operands`` holds the present tensor operands in field order and ``present`` says, for
        every tensor field, whether it is given (autograd cannot see through ``Tensor?[]``).
        """
        scalars = ", ".join(f"{f.metadata['schema']} {f.name}" for f in fields(cls) if f.metadata["kind"] == "scalar")
        return f"Tensor[] operands, bool[] present, {scalars}"

    # -- flattening ---------------------------------------------------------------------------

    def operands(self) -> list[torch.Tensor | None]:
        """The tensor operands in field order (``None`` where absent)."""
        return [getattr(self, n) for n in self.operand_names()]

    def scalars(self) -> list:
        return [getattr(self, n) for n in self.scalar_names()]

    def flatten(self) -> tuple[list[torch.Tensor], list[bool], list]:
        """``(present tensors, presence flags, scalars)``: the custom op's flat arguments."""
        ops = self.operands()
        return [t for t in ops if t is not None], [t is not None for t in ops], self.scalars()

    @classmethod
    def unflatten(cls, tensors, present, scalars) -> "AttentionArgs":
        """Inverse of :meth:`flatten`."""
        names = cls.operand_names()
        if len(present) != len(names) or sum(bool(p) for p in present) != len(tensors):
            raise ValueError(f"operands do not match the fields {names}: present={list(present)}, {len(tensors)} tensors")
        it = iter(tensors)
        kw = {n: (next(it) if p else None) for n, p in zip(names, present)}
        kw.update(zip(cls.scalar_names(), scalars))
        return cls(**kw)

    # -- derived facts --------------------------------------------------------------------------

    @property
    def has_intervention(self) -> bool:
        return any(x is not None for x in (self.q_bits, self.head_mask, self.score_scale))

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """``(B, Hq, Tq, Dv)``: the shape of the output (and of the pre-blend attention)."""
        B, Hq, Tq, _ = self.q.shape
        return (B, Hq, Tq, self.v.shape[-1])

    @property
    def blends(self) -> bool:
        """Whether the output is a blend of the attention with a patch (then the pre-blend
        attention is an extra output the backward needs)."""
        return self.head_mask is not None


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
    softcap: float | None = None,
    sinks=None,
) -> AttentionArgs:
    """Validate the user's arguments and return their canonical views."""
    q = _check_tensor(q, "q", "[B, Hq, Tq, D]")
    k = _check_tensor(k, "k", "[B, Hkv, Tk, D]")
    v = _check_tensor(v, "v", "[B, Hkv, Tk, Dv]")
    if q.dim() != 4:
        raise ValueError(f"q has shape {_shape(q)}; expected 4 dims [B, Hq, Tq, D]")
    if k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"k and v must be 4-dim [B, Hkv, Tk, D] and [B, Hkv, Tk, Dv]; got k {_shape(k)}, v {_shape(v)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must share [B, Hkv, Tk] (k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv]); got k {_shape(k)}, v {_shape(v)}"
        )
    B, Hq, Tq, D = q.shape
    _, Hkv, Tk, Dk = k.shape
    Dv = v.shape[3]
    if D == 0:
        raise ValueError(f"q has shape {_shape(q)}: head dim D = 0; expected [B, Hq, Tq, D] with D >= 1")
    if Dv == 0:
        raise ValueError(f"v has shape {_shape(v)}: value head dim Dv = 0; expected [B, Hkv, Tk, Dv] with Dv >= 1")
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
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a positive float or None, got {type(softcap).__name__} {softcap!r}")
        softcap = float(softcap)
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be a positive finite float (scores become softcap * tanh(s / softcap)), got {softcap}")

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
        head_patch = _check_tensor(head_patch, "head_patch", "broadcastable to [B, Hq, Tq, Dv]")
        if not head_patch.is_floating_point():
            raise TypeError(f"head_patch must be floating, got {head_patch.dtype}")
        if head_patch.device != device:
            raise ValueError(f"head_patch is on {head_patch.device}, q on {device}")
        head_patch = _view_as(
            head_patch.to(q.dtype), "head_patch",
            {2: (1, 3), 3: (1, 2, 3), 4: (0, 1, 2, 3)},
            (B, Hq, Tq, Dv), "[Hq, Dv], [Hq, Tq, Dv] or [B, Hq, Tq, Dv]", ("B", "Hq", "Tq", "Dv"),
        )
    if score_scale is not None:
        score_scale = _as_float(score_scale, "score_scale", device, q.dtype)
        score_scale = _view_as(score_scale, "score_scale", {1: (1,), 2: (0, 1)}, (B, Hq), "[Hq] or [B, Hq]", ("B", "Hq"))
    if sinks is not None:
        sinks = _check_tensor(sinks, "sinks", "[Hq] or [B, Hq]")
        if not sinks.is_floating_point():
            raise TypeError(f"sinks must be a floating tensor [Hq] or [B, Hq] (one logit per head), got {sinks.dtype}")
        sinks = _as_float(sinks, "sinks", device, q.dtype)
        sinks = _view_as(sinks, "sinks", {1: (1,), 2: (0, 1)}, (B, Hq), "[Hq] or [B, Hq]", ("B", "Hq"))

    return AttentionArgs(
        q=q, k=k, v=v, mask=mask, q_bits=q_bits, k_bits=k_bits, head_mask=head_mask, head_patch=head_patch,
        score_scale=score_scale, sinks=sinks, scale=scale, causal=bool(causal), window=window, softcap=softcap,
    )


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
