"""``headint.attention``: one attention call that carries head interventions."""

from __future__ import annotations

import torch

from . import backends
from .arguments import AttentionArgs, prepare
from .fused import fused_attention


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
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention with per-head interventions.

    Args:
        q: ``[B, Hq, Tq, D]``. k: ``[B, Hkv, Tk, D]``, v: ``[B, Hkv, Tk, Dv]`` with ``Hq % Hkv == 0``
            (grouped-query attention: query head ``h`` reads key/value head ``h // (Hq // Hkv)``);
            the value head dim ``Dv`` may differ from ``D`` (MLA); outputs are ``[.., Dv]``.
        causal: mask keys after each query. Queries are aligned to the *end* of the keys
            (query ``i`` is at position ``i + Tk - Tq``), as in decoding with a KV cache; for
            ``Tq == Tk`` this is ordinary causal attention.
        attn_mask: bool (True = attend) or additive float mask broadcastable to ``[B, Hq, Tq, Tk]``.
        scale: score scale, default ``1 / sqrt(D)``.
        head_mask: blend weight ``m`` per head: ``[Hq]``, ``[B, Hq]``, ``[B, Hq, Tq]`` or
            ``[B, Hq, Tq, 1]``; the output is ``m * attn + (1 - m) * head_patch``.
        head_patch: replacement head output broadcastable as ``[Hq, Dv]``, ``[Hq, Tq, Dv]`` or
            ``[B, Hq, Tq, Dv]``; omitted means zeros (zero ablation / scaling by ``m``).
        knockout: a :class:`headint.ops.EdgeKnockout` (or a list: their union) with bool selectors
            broadcastable to ``[B, Hq, Tq]`` and ``[B, Hq, Tk]``, removing edges ``i -> j`` where
            both are true; or a dense bool tensor (True = removed) broadcastable to
            ``[B, Hq, Tq, Tk]``.
        score_scale: multiplies each head's pre-softmax scores, ``[Hq]`` or ``[B, Hq]``.
        window: sliding-window size (keys more than ``window - 1`` positions back are masked).
        softcap: logit soft-capping (Gemma 2): the scores ``s = q.k * scale * score_scale``
            become ``softcap * tanh(s / softcap)`` before the masks are applied; a positive float.
        sinks: attention sinks (gpt-oss): one logit per head, ``[Hq]`` or ``[B, Hq]``, that joins
            every row's softmax denominator and contributes no value:
            ``p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k))``. Differentiable.
        backend: ``"auto"``, ``"reference"``, ``"sdpa"`` (PyTorch SDPA + blend; no knockouts,
            score scales, sinks or soft-capping), ``"triton"`` or ``"cpu"``;
            :func:`headint.last_backend` tells which one ran.

    Removed keys and empty rows: a key removed from a query row by ``attn_mask`` (False, or an
    additive ``-inf``), causality, the window or a knockout is never read by that row. A query
    row whose every key is removed gives a zero attention row (before the head blend; never NaN),
    with or without a sink (the sink has no value; such a row's probabilities all go to the sink).

    NaN (the same on every backend, forward and backward): a NaN in anything a row reads - its
    query, the keys and values it keeps, ``scale``, its head's ``score_scale``, the additive mask
    at its kept keys, its head's sink - makes that row's attention output NaN (the whole row);
    ``+inf`` scores (e.g. an additive ``+inf``), a ``+inf`` sink and non-finite values in kept
    keys/values count as NaN, while a ``-inf`` score removes the key (a ``-inf`` sink: no sink). A NaN at a removed key never leaks into any row's
    output, nor into any gradient. The head blend ``m * attn + (1 - m) * head_patch`` is then
    computed elementwise (a NaN ``m`` gives a NaN row, a NaN in ``head_patch`` a NaN element).
    In the backward, a row made NaN by its query, keys, values or scores sends NaN gradients
    along the edges it read (and to its head's sink, which every row reads) and nothing along
    the others (a NaN head mask scales the row's
    upstream gradient itself, so it reaches every value gradient of its key/value head).

    Returns:
        ``[B, Hq, Tq, Dv]`` in the dtype of ``q``.
    """
    args = prepare(
        q, k, v, causal=causal, attn_mask=attn_mask, scale=scale, head_mask=head_mask,
        head_patch=head_patch, knockout=knockout, score_scale=score_scale, window=window,
        softcap=softcap, sinks=sinks,
    )
    requires_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad
        for t in (getattr(args, n) for n in AttentionArgs.differentiable_names())
    )
    chosen = backends.resolve(backend, q.device, args, requires_grad)
    return _run(chosen, args)


def _run(b: backends.Backend, args: AttentionArgs) -> torch.Tensor:
    """Whole-call backends run themselves; kernel backends run through the fused op."""
    if b.run is not None:
        return b.run(args)
    return fused_attention(args, b.name)
