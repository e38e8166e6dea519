"""Forward intervened attention: one program per (query tile, batch * query head).

FlashAttention-style: the program keeps its ``[BLOCK_M, D]`` query tile resident, streams the
key/value tiles of its KV head (``h // GROUP``: grouped-query attention without repeating k/v),
and folds each ``[BLOCK_M, BLOCK_N]`` score tile into an online softmax; the ``Tq x Tk`` matrix
never exists. Every operand is read through explicit strides (0 on broadcast dims). All
interventions are behind constexpr flags, so the plain variant compiles to plain attention.
Keys have head dim ``HEAD_DIM`` (tile ``BLOCK_D``), values and outputs ``HEAD_DIM_V`` (tile
``BLOCK_DV``). Soft-capping (``HAS_SOFTCAP``) caps each score tile before the masks; a sink
(``HAS_SINKS``, one logit per (b, h)) is folded into the running max / sum after the last key
tile: it joins the denominator and adds nothing to the accumulator.

Outputs: ``Out`` (post-blend), ``Lse`` (natural-log log-sum-exp of the kept scores and the sink,
fp32, ``-inf`` for rows with no kept key and no sink) and, with a head mask, ``Attn`` (the
pre-blend head output the backward needs). Fully removed rows get ``attn = 0``. Rows that read a non-finite query, key, value, score or
sink (NaN / +inf) get NaN ``attn`` / ``Out`` and a NaN ``Lse`` (:func:`.common._nan_reads`); removed
keys are never read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import config, tuning
from .common import _capped_scores, _finite_or_zero, _key_range, _masked_scores, _nan_reads


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Attn,
    Mask, QBits, KBits, HeadMask, Patch, ScoreScale, Sinks,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_ab, stride_ah, stride_am, stride_ad,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_qbb, stride_qbh, stride_qbm,
    stride_kbb, stride_kbh, stride_kbn,
    stride_hmb, stride_hmh, stride_hmm,
    stride_pb, stride_ph, stride_pm, stride_pd,
    stride_ssb, stride_ssh,
    stride_skb, stride_skh,
    H, GROUP, Tq, Tk, scale, window, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_KNOCKOUT: tl.constexpr,
    HAS_SCORE_SCALE: tl.constexpr, HAS_HEAD_MASK: tl.constexpr, HAS_PATCH: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    offs_m64 = offs_m.to(tl.int64)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    q, q_bad = _finite_or_zero(q)
    if DOT_FP32:
        q = q.to(tl.float32)

    qk_scale2 = scale * 1.4426950408889634
    if HAS_SCORE_SCALE:
        qk_scale2 = qk_scale2 * tl.load(ScoreScale + b * stride_ssb + h * stride_ssh).to(tl.float32)
    cap2 = softcap * 1.4426950408889634

    qb = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_KNOCKOUT:
        qb = tl.load(QBits + b * stride_qbb + h * stride_qbh + offs_m64 * stride_qbm, mask=m_ok, other=0)
    kbits_base = KBits + b * stride_kbb + h * stride_kbh
    mask_base = Mask + b * stride_mb + h * stride_mh

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    row_bad = tl.zeros([BLOCK_M], dtype=tl.int32)

    lo, hi = _key_range(start_m, Tq, Tk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Tk
        offs_n64 = offs_n.to(tl.int64)
        k = tl.load(k_base + offs_n64[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n64[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        k, k_bad = _finite_or_zero(k)
        v, v_bad = _finite_or_zero(v)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s2 = _masked_scores(
            _capped_scores(qk, qk_scale2, cap2, HAS_SOFTCAP), offs_m, offs_n, Tq, Tk, window,
            mask_base, stride_mm, stride_mn, qb, kbits_base, stride_kbn,
            IS_CAUSAL, HAS_WINDOW, HAS_MASK, MASK_IS_BOOL, HAS_KNOCKOUT,
        )
        s2, row_bad = _nan_reads(s2, q_bad, k_bad | v_bad, row_bad)
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        # A row with nothing kept so far has m_new = -inf: shift by 0 instead (exp2(-inf) = 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s2 - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DOT_FP32:
            acc += tl.dot(p, v, input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if HAS_SINKS:  # the sink joins the denominator (and the running max), adds no value
        sk = tl.load(Sinks + b * stride_skb + h * stride_skh).to(tl.float32) * 1.4426950408889634
        sink_bad = (sk != sk) | (sk == float("inf"))  # a NaN / +inf sink makes every row NaN
        row_bad = tl.where(sink_bad, 1, row_bad)
        sk = tl.where(sink_bad, float("-inf"), sk)
        m_new = tl.maximum(m_i, sk)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.exp2(sk - m_safe)
        acc = acc * alpha[:, None]
        m_i = m_new

    alive = l_i > 0.0
    bad = row_bad != 0
    attn = acc / tl.where(alive, l_i, 1.0)[:, None]
    attn = tl.where(bad[:, None], float("nan"), attn)
    m_safe = tl.where(alive, m_i, 0.0)
    lse = tl.where(alive, (m_safe + tl.log2(tl.where(alive, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    lse = tl.where(bad, float("nan"), lse)
    tl.store(Lse + pid_bh.to(tl.int64) * Tq + offs_m64, lse, mask=m_ok)

    io_mask = m_ok[:, None] & dv_ok[None, :]
    if HAS_HEAD_MASK:
        a_ptrs = Attn + b * stride_ab + h * stride_ah + offs_m64[:, None] * stride_am + offs_dv[None, :] * stride_ad
        tl.store(a_ptrs, attn.to(Attn.dtype.element_ty), mask=io_mask)
        hm = tl.load(HeadMask + b * stride_hmb + h * stride_hmh + offs_m64 * stride_hmm, mask=m_ok, other=0.0)
        hm = hm.to(tl.float32)[:, None]
        out = hm * attn
        if HAS_PATCH:
            p_ptrs = Patch + b * stride_pb + h * stride_ph + offs_m64[:, None] * stride_pm + offs_dv[None, :] * stride_pd
            patch = tl.load(p_ptrs, mask=io_mask, other=0.0).to(tl.float32)
            out = out + (1.0 - hm) * patch
    else:
        out = attn
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m64[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=io_mask)


_AUTOTUNE_KEY = [*tuning.FLAG_KEY, "TQ_BUCKET", "TK_BUCKET"]

#: The raw kernel (a JITFunction, or the interpreter's InterpretedFunction).
attn_fwd_kernel = _attn_fwd_kernel
#: The autotuned launcher (a single config under the interpreter), keyed on bucketed lengths.
attn_fwd = tuning.autotune(
    configs=config.configs("fwd"), key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": config.pruner("fwd")},
)(_attn_fwd_kernel)
