"""Pure PyTorch reference of intervened attention: the ground truth for every kernel.

Written for clarity, not speed: it materialises the ``[B, Hq, Tq, Tk]`` scores.
Everything is differentiable with ordinary autograd.
"""

from __future__ import annotations

import torch

from .arguments import AttentionArgs


def allowed_edges(Tq: int, Tk: int, causal: bool, window: int | None, device) -> torch.Tensor | None:
    """``[Tq, Tk]`` bool of edges kept by causality / sliding window, or None if all are.

    Queries are aligned to the end of the keys (query ``i`` sits at position
    ``i + Tk - Tq``), which is what decoding with a KV cache needs.
    """
    if not causal and window is None:
        return None
    qpos = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    kpos = torch.arange(Tk, device=device)[None, :]
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        keep &= kpos <= qpos
        if window is not None:
            keep &= qpos - kpos < window
    elif window is not None:
        keep &= (qpos - kpos).abs() < window
    return keep


def _finite_or_zero(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with its non-finite elements replaced by 0, and whether each row (last dim) had one."""
    ok = torch.isfinite(x)
    return torch.where(ok, x, torch.zeros((), dtype=x.dtype, device=x.device)), ~ok.all(dim=-1)


def reference_probs(a: AttentionArgs, return_lse: bool = False):
    """Attention probabilities ``[B, Hq, Tq, Tk]`` (float32) with every mask and knockout applied.

    Scores: ``s = q.k * scale * score_scale``, soft-capped (``softcap * tanh(s / softcap)``) when
    ``softcap`` is set, then the additive mask; removed keys are ``-inf``. With ``sinks``, the head's
    sink logit joins each row's softmax denominator: ``p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k))``
    (the probabilities then sum to less than 1; the sink carries no value).

    Rows whose every key is removed are all zeros. With ``return_lse`` also returns the
    log-sum-exp of the kept scores and the sink ``[B, Hq, Tq]`` (``-inf`` for such rows without a
    sink, the sink itself with one).

    NaN semantics (see :func:`headint.attention`): q, k and v enter the products with their
    non-finite elements zeroed; a row that reads a key (kept, with a score above ``-inf``) and
    has a non-finite query, reads a non-finite key or value, or has a NaN / ``+inf`` score at a
    key it reads, gets NaN added to the scores it reads: its probabilities (and lse) are NaN and
    its gradients flow to exactly what it read. Removed entries are exact zeros. Every row reads
    its head's sink: a NaN or ``+inf`` sink makes the row NaN (``-inf`` is no sink).
    """
    q, q_bad = _finite_or_zero(a.q)
    k, k_bad = _finite_or_zero(a.k)
    v_bad = (~torch.isfinite(a.v)).any(dim=-1)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Tk == 0 and a.sinks is None:  # no keys at all: every row is empty
        probs = q.new_zeros(B, Hq, Tq, 0, dtype=torch.promote_types(q.dtype, torch.float32))
        return (probs, probs.new_full((B, Hq, Tq), float("-inf"))) if return_lse else probs
    group = Hq // Hkv
    # Grouped-query attention: query head h reads key/value head h // group.
    kv_bad = k_bad | v_bad
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        kv_bad = kv_bad.repeat_interleave(group, dim=1)

    scores = torch.matmul(q, k.transpose(-1, -2)) * a.scale
    if a.score_scale is not None:
        scores = scores * a.score_scale[:, :, None, None].to(scores.dtype)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # softmax in >= fp32
    if a.softcap is not None:  # logit soft-capping, before the masks
        scores = a.softcap * torch.tanh(scores / a.softcap)

    keep = torch.ones(B, Hq, Tq, Tk, dtype=torch.bool, device=q.device)
    if a.mask is not None:
        if a.mask.dtype == torch.bool:
            keep = keep & a.mask
        else:
            scores = scores + a.mask.to(scores.dtype)
    structural = allowed_edges(Tq, Tk, a.causal, a.window, q.device)
    if structural is not None:
        keep = keep & structural
    if a.q_bits is not None:
        knocked = (a.q_bits[..., :, None] & a.k_bits[..., None, :]) != 0
        keep = keep & ~knocked
    read = keep & (scores != float("-inf"))  # NaN scores are read (and make the row NaN)
    bad_entry = read & (q_bad[..., :, None] | kv_bad[..., None, :] | torch.isnan(scores) | (scores == float("inf")))
    bad_row = bad_entry.any(dim=-1, keepdim=True)
    sink = None
    if a.sinks is not None:  # every row reads its head's sink: NaN / +inf there make the row NaN
        sink = a.sinks[:, :, None, None].to(scores.dtype).expand(B, Hq, Tq, 1)
        bad_row = bad_row | torch.isnan(sink) | (sink == float("inf"))
    nan = torch.full((), float("nan"), dtype=scores.dtype, device=scores.device)
    scores = scores + torch.where(bad_row & read, nan, torch.zeros_like(nan))  # (an addition: gradients flow)
    scores = scores.masked_fill(~read, float("-inf"))

    # Softmax that gives an all-zero row (not NaN) when every key is removed; exact zeros at
    # removed entries even in a NaN row. A sink joins the denominator only.
    if Tk > 0:
        row_max = scores.masked_fill(bad_row, 0.0).amax(dim=-1, keepdim=True)
    else:  # no keys, only the sink
        row_max = scores.new_full((B, Hq, Tq, 1), float("-inf"))
    if sink is not None:
        sink = sink + torch.where(bad_row, nan, torch.zeros_like(nan))
        row_max = torch.maximum(row_max, sink.masked_fill(bad_row, 0.0))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max.detach())  # the shift cancels; no gradient through it
    denom = weights.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - row_max.detach())
    probs = torch.where(read, weights / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.0)
    if return_lse:
        return probs, (row_max + torch.log(denom)).squeeze(-1)
    return probs


def reference_attention(a: AttentionArgs, return_lse: bool = False):
    """Intervened attention, step by step. Returns ``[B, Hq, Tq, Dv]`` (and lse ``[B, Hq, Tq]``)."""
    probs, lse = reference_probs(a, return_lse=True)
    group = a.q.shape[1] // a.v.shape[1]
    v, _ = _finite_or_zero(a.v)  # a row reading a non-finite value already has NaN probabilities
    if group > 1:
        v = v.repeat_interleave(group, dim=1)
    attn = torch.matmul(probs.to(v.dtype), v)
    if a.sinks is not None:  # a row reading a NaN / +inf sink is NaN even if it reads no key
        sink_bad = torch.isnan(a.sinks) | (a.sinks == float("inf"))
        nan = torch.full((), float("nan"), dtype=attn.dtype, device=attn.device)
        attn = attn + torch.where(sink_bad[:, :, None, None], nan, torch.zeros_like(nan))

    if a.head_mask is not None:
        m = a.head_mask[..., None].to(attn.dtype)
        if a.head_patch is None:
            out = m * attn
        else:
            out = m * attn + (1 - m) * a.head_patch.to(attn.dtype)
    else:
        out = attn
    if return_lse:
        return out, lse
    return out
