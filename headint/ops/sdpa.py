"""``"sdpa"`` backend: PyTorch's fused ``scaled_dot_product_attention`` plus the head blend.

Covers calls without knockouts, score scales, sinks or soft-capping (those need the score tile, which SDPA does
not expose): plain attention, bool masks, windows, and the head_mask/head_patch blend applied
after the attention (what it supports is declared in its entry of :mod:`headint.ops.backends`).
On CPU, ``"auto"`` uses it for such calls, since it is much faster than the reference and
computes the same function.

SDPA's kernels do not follow headint's NaN semantics (a NaN query gives a zero row, a NaN at
a masked key leaks), so a call with a non-finite q, k, v or scale is computed by the
reference instead (same function, same gradients; the check is one pass over q, k and v).
"""

from __future__ import annotations

import math

import torch

from .arguments import AttentionArgs
from .reference import allowed_edges, reference_attention


def _all_finite(a: AttentionArgs) -> bool:
    if not math.isfinite(a.scale):
        return False
    return bool(torch.stack([torch.isfinite(x).all() for x in (a.q, a.k, a.v)]).all())


def sdpa_attention(a: AttentionArgs) -> torch.Tensor:
    """Same function as :func:`~headint.ops.reference.reference_attention` for supported args
    (no compact knockouts, no score scale, bool masks only)."""
    if not _all_finite(a):
        return reference_attention(a)
    q, k, v = a.q, a.k, a.v
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    mask = a.mask
    is_causal = False
    structural = allowed_edges(Tq, Tk, a.causal, a.window, q.device)
    if structural is not None:
        if mask is None and a.causal and a.window is None and Tq == Tk:
            is_causal = True
        else:
            mask = structural if mask is None else mask & structural
    empty_rows = None
    if mask is not None:
        empty_rows = ~mask.any(dim=-1)  # [B, Hq, Tq] rows with no key: zero output
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=a.scale, enable_gqa=Hq != k.shape[1]
    )
    if empty_rows is not None:
        out = out.masked_fill(empty_rows.expand(B, Hq, Tq)[..., None], 0.0)
    if a.head_mask is not None:
        m = a.head_mask[..., None].to(out.dtype)
        out = m * out if a.head_patch is None else m * out + (1 - m) * a.head_patch.to(out.dtype)
    return out
