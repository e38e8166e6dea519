"""``headint.attention``: one attention call that carries head interventions."""

from __future__ import annotations

import torch

from . import backends
from .arguments import prepare
from .fused import fused_attention
from .reference import reference_attention
from .sdpa import sdpa_attention


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    head_mask: torch.Tensor | None = None,
    head_patch: torch.Tensor | None = None,
    knockout=None,
    score_scale: torch.Tensor | None = None,
    window: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention with per-head interventions.

    Args:
        q: ``[B, Hq, Tq, D]``. k, v: ``[B, Hkv, Tk, D]`` with ``Hq % Hkv == 0`` (grouped-query
            attention: query head ``h`` reads key/value head ``h // (Hq // Hkv)``).
        causal: mask keys after each query. Queries are aligned to the *end* of the keys
            (query ``i`` is at position ``i + Tk - Tq``), as in decoding with a KV cache; for
            ``Tq == Tk`` this is ordinary causal attention.
        attn_mask: bool (True = attend) or additive float mask broadcastable to ``[B, Hq, Tq, Tk]``.
        scale: score scale, default ``1 / sqrt(D)``.
        head_mask: blend weight ``m`` per head: ``[Hq]``, ``[B, Hq]``, ``[B, Hq, Tq]`` or
            ``[B, Hq, Tq, 1]``; the output is ``m * attn + (1 - m) * head_patch``.
        head_patch: replacement head output broadcastable as ``[Hq, D]``, ``[Hq, Tq, D]`` or
            ``[B, Hq, Tq, D]``; omitted means zeros (zero ablation / scaling by ``m``).
        knockout: a :class:`headint.ops.EdgeKnockout` (or a list: their union) with bool selectors
            broadcastable to ``[B, Hq, Tq]`` and ``[B, Hq, Tk]``, removing edges ``i -> j`` where
            both are true; or a dense bool tensor (True = removed) broadcastable to
            ``[B, Hq, Tq, Tk]``.
        score_scale: multiplies each head's pre-softmax scores, ``[Hq]`` or ``[B, Hq]``.
        window: sliding-window size (keys more than ``window - 1`` positions back are masked).
        backend: ``"auto"``, ``"reference"``, ``"sdpa"`` (PyTorch SDPA + blend; no knockouts or
            score scales), ``"triton"`` or ``"cpu"``; :func:`headint.last_backend` tells which one ran.

    A query row whose every key is masked or knocked out gives a zero attention row (never NaN).

    Returns:
        ``[B, Hq, Tq, D]`` in the dtype of ``q``.
    """
    args = prepare(
        q, k, v, causal=causal, attn_mask=attn_mask, scale=scale, head_mask=head_mask,
        head_patch=head_patch, knockout=knockout, score_scale=score_scale, window=window,
    )
    requires_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad
        for t in (args.q, args.k, args.v, args.head_mask, args.head_patch, args.score_scale)
    )
    name = backends.resolve(backend, q.device, args, requires_grad)
    if name == "reference":
        return reference_attention(args)
    if name == "sdpa":
        return sdpa_attention(args)
    return fused_attention(args, name)
