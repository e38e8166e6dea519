"""Python launchers of the attention kernels: an operand object in, fresh output tensors out.

The launchers know tensors and strides only (no models, no autograd, nothing of ``headint``).
They take the operand object (``headint.ops.arguments.AttentionArgs``, or anything with the same
attributes) and read its fields by name: ``q, k, v`` (``v`` may have its own head dim ``Dv``)
and the optional tensor operands ``mask, q_bits, k_bits, head_mask, head_patch, score_scale,
sinks`` (``None`` when absent; broadcast operands may have stride 0 anywhere), and the scalars
``scale, causal, window`` (``None``: no window), ``softcap`` (``None``: no soft-capping).
They run CUDA tensors on the GPU and CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported).

NaN semantics (those of ``headint.attention``): rows that read a non-finite query, key, value,
score or sink get NaN outputs and a NaN lse; removed keys are never read (see ``attention_fwd``).

Testing aid: with ``POISON_OUTPUTS = True`` every output (and internal scratch) is NaN-filled
before the launch, so an element a kernel forgets to write shows up as NaN.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from . import config
from .attention_bwd import attn_bwd_dkdv, attn_bwd_dq, attn_bwd_pre
from .attention_fwd import attn_fwd

#: Testing aid: NaN-fill outputs before launching (see module docstring).
POISON_OUTPUTS = False

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
MAX_HEAD_DIM = 256


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _strides(x: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(x.stride()) if x is not None else (0,) * n


def _mask_operand(mask: torch.Tensor | None):
    """(tensor to hand the kernel, is_bool). Bool masks are reinterpreted as uint8 (same strides)."""
    if mask is None:
        return None, False
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), True
    return mask, False


def _dot_mode(dtype: torch.dtype, device: torch.device):
    """(DOT_FP32, DOT_PRECISION).

    The interpreter's low-precision ``tl.dot`` is wrong, so there every tile goes to fp32 first.
    On a GPU fp16/bf16 tiles use tensor cores with fp32 accumulation, and fp32 inputs get exact
    ("ieee") products to match PyTorch's default fp32 matmul.
    """
    interp = device.type != "cuda"
    return interp, ("ieee" if (interp or dtype == torch.float32) else "tf32")


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports float16/bfloat16/float32 inputs, got {q.dtype}")
    for name, x in (("q", q), ("v", v)):
        D = x.shape[-1]
        if D > MAX_HEAD_DIM or D < 1:
            raise ValueError(f"the triton backend supports head dims up to {MAX_HEAD_DIM}, got {name} of shape {list(x.shape)}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"the triton backend runs cuda tensors (or cpu ones when interpreting), got {q.device}")


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dummy(x: torch.Tensor) -> torch.Tensor:
    """A valid pointer for operands the kernel variant never reads."""
    return x


def attention_forward(args):
    """Run the forward kernel on the operand object ``args``.

    Returns ``(out, lse, attn)``: ``out`` ``[B, Hq, Tq, Dv]`` (post-blend), ``lse`` ``[B, Hq, Tq]``
    fp32, ``attn`` the pre-blend output (None without a head mask).
    """
    with _on_device(args.q):
        return _forward(args)


def attention_backward(args, dout, attn, lse):
    """Run the backward kernels. ``attn`` is the pre-blend output (``out`` without a head mask),
    ``lse`` the forward's.

    Returns ``{name: gradient}`` for the present differentiable operands ``q, k, v, head_mask,
    head_patch, score_scale, sinks``, each at its operand's full (unbroadcast) shape; ``head_mask``,
    ``score_scale`` and ``sinks`` gradients are fp32.
    """
    with _on_device(args.q):
        return _backward(args, dout, attn, lse)


def _forward(a):
    q, k, v, mask, q_bits, k_bits = a.q, a.k, a.v, a.mask, a.q_bits, a.k_bits
    head_mask, head_patch, score_scale, sinks = a.head_mask, a.head_patch, a.score_scale, a.sinks
    scale, causal, window, softcap = a.scale, a.causal, a.window, a.softcap
    check_inputs(q, k, v)
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    if window is not None and window < 0:
        window = None
    out = _alloc((B, H, Tq, Dv), q.dtype, dev)
    lse = _alloc((B, H, Tq), torch.float32, dev)
    attn = _alloc((B, H, Tq, Dv), q.dtype, dev) if head_mask is not None else None
    if B * H * Tq == 0:
        return out.zero_(), lse.fill_(float("-inf")), (attn.zero_() if attn is not None else None)
    mask_t, mask_bool = _mask_operand(mask)
    has_ko = q_bits is not None
    if head_patch is not None and head_patch.dtype != q.dtype:
        head_patch = head_patch.to(q.dtype)
    dot_fp32, precision = _dot_mode(q.dtype, dev)
    d = _dummy(q)

    def grid(meta):
        return (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)

    attn_fwd[grid](
        q, k, v, out, lse, attn if attn is not None else d,
        mask_t if mask_t is not None else d, q_bits if has_ko else d, k_bits if has_ko else d,
        head_mask if head_mask is not None else d, head_patch if head_patch is not None else d,
        score_scale if score_scale is not None else d, sinks if sinks is not None else d,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *_strides(attn, 4),
        *_strides(mask_t, 4), *_strides(q_bits, 3), *_strides(k_bits, 3), *_strides(head_mask, 3),
        *_strides(head_patch, 4), *_strides(score_scale, 2), *_strides(sinks, 2),
        H, H // Hkv, Tq, Tk, float(scale), int(window) if window is not None else 0,
        float(softcap) if softcap is not None else 1.0,
        HEAD_DIM=D, BLOCK_D=config.block_d(D), HEAD_DIM_V=Dv, BLOCK_DV=config.block_d(Dv),
        IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None,
        HAS_MASK=mask_t is not None, MASK_IS_BOOL=mask_bool, HAS_KNOCKOUT=has_ko,
        HAS_SCORE_SCALE=score_scale is not None, HAS_HEAD_MASK=head_mask is not None,
        HAS_PATCH=head_patch is not None, HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None,
        DOT_FP32=dot_fp32, DOT_PRECISION=precision,
    )
    return out, lse, attn


def _sink_gradient(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``dsink[b, h] = -sum_i p_sink[b, h, i] * Delta[b, h, i]``, ``p_sink = exp(sink - lse)`` (fp32 ``[B, H]``).

    The sink's probability in row ``i`` is ``exp(sink - lse_i)`` (lse includes the sink); its logit
    moves every other probability by ``-p_sink * p_j``, hence ``dsink = -sum_i p_sink_i * sum_j p_ij
    dP_ij = -sum_i p_sink_i * Delta_i``. Rows with ``lse = -inf`` (a ``-inf`` sink, nothing kept)
    have no sink probability; NaN rows give NaN.
    """
    s = sinks.float()[..., None]
    p_sink = torch.where(lse == float("-inf"), torch.zeros_like(lse), torch.exp(s - lse))
    return -(p_sink * delta).sum(dim=-1)


def _backward(a, dout, attn, lse):
    q, k, v, mask, q_bits, k_bits = a.q, a.k, a.v, a.mask, a.q_bits, a.k_bits
    head_mask, head_patch, score_scale, sinks = a.head_mask, a.head_patch, a.score_scale, a.sinks
    scale, causal, window, softcap = a.scale, a.causal, a.window, a.softcap
    dout = dout.contiguous()
    check_inputs(q, k, v)
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    if window is not None and window < 0:
        window = None
    dq = _alloc((B, H, Tq, D), q.dtype, dev)
    dk = _alloc((B, Hkv, Tk, D), k.dtype, dev)
    dv = _alloc((B, Hkv, Tk, Dv), v.dtype, dev)
    dhm = _alloc((B, H, Tq), torch.float32, dev) if head_mask is not None else None
    dss = dsink = None

    def result():
        grads = {"q": dq, "k": dk, "v": dv}
        if head_mask is not None:
            grads["head_mask"] = dhm
        if head_patch is not None:  # out = m * attn + (1 - m) * patch
            grads["head_patch"] = ((1 - head_mask[..., None].float()) * dout.float()).to(head_patch.dtype)
        if score_scale is not None:
            grads["score_scale"] = dss
        if sinks is not None:
            grads["sinks"] = dsink
        return grads

    if B * H * Tq == 0:  # no query rows: nothing flows back
        for t in (dq, dk, dv, dhm):
            if t is not None:
                t.zero_()
        if score_scale is not None:
            dss = torch.zeros(B, H, dtype=torch.float32, device=dev)
        if sinks is not None:
            dsink = torch.zeros(B, H, dtype=torch.float32, device=dev)
        return result()
    # (Tk == 0 runs on: the preprocess still gives dhead_mask = -sum dO * patch, dQ loops over no key)
    lse = lse.contiguous()
    delta = _alloc((B, H, Tq), torch.float32, dev)
    mask_t, mask_bool = _mask_operand(mask)
    has_ko = q_bits is not None
    if head_patch is not None and head_patch.dtype != q.dtype:
        head_patch = head_patch.to(q.dtype)
    dot_fp32, precision = _dot_mode(q.dtype, dev)
    d = _dummy(q)
    BD, BDV = config.block_d(D), config.block_d(Dv)
    win = int(window) if window is not None else 0
    cap = float(softcap) if softcap is not None else 1.0

    attn_bwd_pre[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)](
        dout, attn, head_mask if head_mask is not None else d, head_patch if head_patch is not None else d,
        delta, dhm if dhm is not None else delta,
        *dout.stride(), *attn.stride(), *_strides(head_mask, 3), *_strides(head_patch, 4),
        H, Tq,
        HEAD_DIM=Dv, BLOCK_D=BDV, HAS_HEAD_MASK=head_mask is not None, HAS_PATCH=head_patch is not None,
    )

    flags = dict(
        HEAD_DIM=D, BLOCK_D=BD, HEAD_DIM_V=Dv, BLOCK_DV=BDV, IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None,
        HAS_MASK=mask_t is not None, MASK_IS_BOOL=mask_bool, HAS_KNOCKOUT=has_ko,
        HAS_SCORE_SCALE=score_scale is not None, HAS_HEAD_MASK=head_mask is not None,
        HAS_SOFTCAP=softcap is not None, DOT_FP32=dot_fp32, DOT_PRECISION=precision,
    )
    common_ptrs = (
        mask_t if mask_t is not None else d, q_bits if has_ko else d, k_bits if has_ko else d,
        head_mask if head_mask is not None else d, score_scale if score_scale is not None else d,
    )
    common_strides = (
        *_strides(mask_t, 4), *_strides(q_bits, 3), *_strides(k_bits, 3), *_strides(head_mask, 3),
        *_strides(score_scale, 2),
    )

    # Partial sums of dscore_scale, one per (b, h, query tile); sized for the smallest BLOCK_M any
    # config may pick, zero-filled so tiles a larger BLOCK_M never writes add nothing.
    n_part = triton.cdiv(Tq, config.min_block("dq", "BLOCK_M"))
    if score_scale is not None:
        part = torch.zeros(B * H, n_part, dtype=torch.float32, device=dev)
    else:
        part = torch.zeros(1, dtype=torch.float32, device=dev)  # never written: HAS_SCORE_SCALE is off
    attn_bwd_dq[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, part, *common_ptrs,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *common_strides,
        H, H // Hkv, Tq, Tk, float(scale), win, cap, n_part,
        **flags,
    )
    if Tk > 0:
        attn_bwd_dkdv[lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, dout, lse, delta, dk, dv, *common_ptrs,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), *common_strides,
            H, Hkv, H // Hkv, Tq, Tk, float(scale), win, cap,
            **flags,
        )
    if score_scale is not None:
        dss = part.sum(dim=1).view(B, H)
    if sinks is not None:
        dsink = _sink_gradient(sinks, lse, delta)
    return result()
