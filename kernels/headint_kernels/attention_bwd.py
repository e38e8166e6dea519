"""Backward of intervened attention, FlashAttention-2 style (probabilities recomputed from lse).

Three kernels:

``_attn_bwd_pre``  grid (query tiles, B * Hq), over the value head dim (launched with ``HEAD_DIM = Dv``)
    ``dA = m * dO`` is the gradient of the pre-blend output ``A``; writes
    ``Delta[b,h,i] = sum_d dA * A`` and ``dHeadMask[b,h,i] = sum_d dO * (A - patch)``.
``_attn_bwd_dq``   grid (query tiles, B * Hq)
    loops over the key tiles a query tile can see; writes ``dQ`` and one partial sum of
    ``dscore_scale`` per program (``sum_ij dS_ij * raw_ij`` over its tile, reduced by the launcher).
``_attn_bwd_dkdv`` grid (key tiles, B * Hkv)
    one program owns a key/value tile of one KV head and loops over the ``GROUP`` query heads that
    read it and over their query tiles, so the grouped-query reduction of dK/dV happens in its
    fp32 registers: no atomics, no scratch, deterministic.

With ``s = cap(raw * score_scale) + additive_mask``, ``raw = q.k * scale``, ``P = softmax(s)`` (a
sink, if any, in the denominator: it is in ``lse``), ``cap`` the soft-cap (identity without):
``dP = dA . v``, ``dS = P * (dP - Delta) * cap'``, ``cap' = 1 - tanh^2``, ``dq = dS . k * scale * ss``,
``dk = dS^T . q * scale * ss``, ``dv = P^T . dA``, ``dscore_scale = sum dS * raw``; the sink's
gradient ``dsink = -sum_i exp(sink - lse_i) * Delta_i`` is reduced by the launcher from ``Delta``.
Keys have head dim ``HEAD_DIM`` (tile ``BLOCK_D``), values ``HEAD_DIM_V`` (tile ``BLOCK_DV``). The head mask is folded into ``P`` / ``dP``
(``dA`` is never rounded to the input dtype). Removed entries have ``P = dS = 0`` exactly hence
zero gradient, also in rows whose lse is NaN (rows that read a NaN: their read entries get NaN
gradients); rows with ``lse = -inf`` (nothing kept) contribute nothing. q, k and v are loaded with
non-finite elements zeroed, as in the forward, so no NaN flows along an edge a row does not read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import config, tuning
from .common import _capped_scores, _finite_or_zero, _key_range, _masked_scores, _query_range


@triton.jit
def _attn_bwd_pre_kernel(
    DO, A, HeadMask, Patch, Delta, DHeadMask,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_ab, stride_ah, stride_am, stride_ad,
    stride_hmb, stride_hmh, stride_hmm,
    stride_pb, stride_ph, stride_pm, stride_pd,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_HEAD_MASK: tl.constexpr, HAS_PATCH: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    io = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=io, other=0.0).to(tl.float32)
    a = tl.load(A + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_am + offs_d[None, :] * stride_ad,
                mask=io, other=0.0).to(tl.float32)
    row = pid_bh.to(tl.int64) * Tq + offs_m
    if HAS_HEAD_MASK:
        hm = tl.load(HeadMask + b * stride_hmb + h * stride_hmh + offs_m * stride_hmm, mask=m_ok, other=0.0)
        hm = hm.to(tl.float32)
        delta = tl.sum(do * a, 1) * hm
        diff = a
        if HAS_PATCH:
            patch = tl.load(
                Patch + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_pm + offs_d[None, :] * stride_pd,
                mask=io, other=0.0).to(tl.float32)
            diff = a - patch
        tl.store(DHeadMask + row, tl.sum(do * diff, 1), mask=m_ok)
    else:
        delta = tl.sum(do * a, 1)
    tl.store(Delta + row, delta, mask=m_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DSSPart,
    Mask, QBits, KBits, HeadMask, ScoreScale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_qbb, stride_qbh, stride_qbm,
    stride_kbb, stride_kbh, stride_kbn,
    stride_hmb, stride_hmh, stride_hmm,
    stride_ssb, stride_ssh,
    H, GROUP, Tq, Tk, scale, window, softcap, n_part,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_KNOCKOUT: tl.constexpr,
    HAS_SCORE_SCALE: tl.constexpr, HAS_HEAD_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
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
    offs_m64 = offs_m.to(tl.int64)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    io = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=io, other=0.0)
    q, _q_bad = _finite_or_zero(q)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m64[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row = pid_bh.to(tl.int64) * Tq + offs_m64
    lse = tl.load(Lse + row, mask=m_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # no kept key: P = exp2(-inf) = 0
    delta = tl.load(Delta + row, mask=m_ok, other=0.0)
    if HAS_HEAD_MASK:
        hm = tl.load(HeadMask + b * stride_hmb + h * stride_hmh + offs_m64 * stride_hmm, mask=m_ok, other=0.0)
        hm = hm.to(tl.float32)

    ss = 1.0
    if HAS_SCORE_SCALE:
        ss = tl.load(ScoreScale + b * stride_ssb + h * stride_ssh).to(tl.float32)
    qk_scale2 = scale * ss * 1.4426950408889634
    cap2 = softcap * 1.4426950408889634
    qb = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_KNOCKOUT:
        qb = tl.load(QBits + b * stride_qbb + h * stride_qbh + offs_m64 * stride_qbm, mask=m_ok, other=0)
    kbits_base = KBits + b * stride_kbb + h * stride_kbh
    mask_base = Mask + b * stride_mb + h * stride_mh
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dss = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, hi = _key_range(start_m, Tq, Tk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Tk
        offs_n64 = offs_n.to(tl.int64)
        k = tl.load(k_base + offs_n64[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n64[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        k, _k_bad = _finite_or_zero(k)
        v, _v_bad = _finite_or_zero(v)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        sc2 = _capped_scores(qk, qk_scale2, cap2, HAS_SOFTCAP)
        s2 = _masked_scores(
            sc2, offs_m, offs_n, Tq, Tk, window,
            mask_base, stride_mm, stride_mn, qb, kbits_base, stride_kbn,
            IS_CAUSAL, HAS_WINDOW, HAS_MASK, MASK_IS_BOOL, HAS_KNOCKOUT,
        )
        read = s2 != float("-inf")
        p = tl.where(read, tl.exp2(s2 - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_HEAD_MASK:
            dp = dp * hm[:, None]
        if HAS_SOFTCAP:  # through the cap: d(c tanh(s / c)) / ds = 1 - tanh^2
            th = sc2 / cap2
            ds = tl.where(read, p * (dp - delta[:, None]) * (1.0 - th * th), 0.0)
        else:
            ds = tl.where(read, p * (dp - delta[:, None]), 0.0)
        if HAS_SCORE_SCALE:
            dss += tl.sum(ds * qk, 1)
        if DOT_FP32:
            dq += tl.dot(ds, k, input_precision=DOT_PRECISION)
        else:
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * (scale * ss)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m64[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=io)
    if HAS_SCORE_SCALE:
        tl.store(DSSPart + pid_bh.to(tl.int64) * n_part + pid_m, tl.sum(dss, 0) * scale)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    Mask, QBits, KBits, HeadMask, ScoreScale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_qbb, stride_qbh, stride_qbm,
    stride_kbb, stride_kbh, stride_kbn,
    stride_hmb, stride_hmh, stride_hmm,
    stride_ssb, stride_ssh,
    H, HKV, GROUP, Tq, Tk, scale, window, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_KNOCKOUT: tl.constexpr,
    HAS_SCORE_SCALE: tl.constexpr, HAS_HEAD_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // HKV).to(tl.int64)
    kvh = (pid_bk % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_n64 = offs_n.to(tl.int64)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Tk
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    kv_mask = n_ok[:, None] & d_ok[None, :]
    vv_mask = n_ok[:, None] & dv_ok[None, :]

    k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n64[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + offs_n64[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=vv_mask, other=0.0)
    k, _k_bad = _finite_or_zero(k)
    v, _v_bad = _finite_or_zero(v)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    cap2 = softcap * 1.4426950408889634
    lo, hi = _query_range(start_n, Tq, Tk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        ss = 1.0
        if HAS_SCORE_SCALE:
            ss = tl.load(ScoreScale + b * stride_ssb + h * stride_ssh).to(tl.float32)
        qk_scale2 = scale * ss * 1.4426950408889634
        kbits_base = KBits + b * stride_kbb + h * stride_kbh
        mask_base = Mask + b * stride_mb + h * stride_mh
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * H + h) * Tq
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            offs_m64 = offs_m.to(tl.int64)
            m_ok = offs_m < Tq
            io = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=io, other=0.0)
            q, _q_bad = _finite_or_zero(q)
            do = tl.load(do_base + offs_m64[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                         mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(Lse + row_base + offs_m64, mask=m_ok, other=0.0) * 1.4426950408889634
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(Delta + row_base + offs_m64, mask=m_ok, other=0.0)
            qb = tl.zeros([BLOCK_M], dtype=tl.int32)
            if HAS_KNOCKOUT:
                qb = tl.load(QBits + b * stride_qbb + h * stride_qbh + offs_m64 * stride_qbm, mask=m_ok, other=0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            sc2 = _capped_scores(qk, qk_scale2, cap2, HAS_SOFTCAP)
            s2 = _masked_scores(
                sc2, offs_m, offs_n, Tq, Tk, window,
                mask_base, stride_mm, stride_mn, qb, kbits_base, stride_kbn,
                IS_CAUSAL, HAS_WINDOW, HAS_MASK, MASK_IS_BOOL, HAS_KNOCKOUT,
            )
            read = s2 != float("-inf")
            p = tl.where(read, tl.exp2(s2 - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            if HAS_HEAD_MASK:
                hm = tl.load(HeadMask + b * stride_hmb + h * stride_hmh + offs_m64 * stride_hmm, mask=m_ok, other=0.0)
                hm = hm.to(tl.float32)[:, None]
                pm = p * hm
                dp = dp * hm
            else:
                pm = p
            if HAS_SOFTCAP:
                th = sc2 / cap2
                ds = tl.where(read, p * (dp - delta[:, None]) * (1.0 - th * th), 0.0)
            else:
                ds = tl.where(read, p * (dp - delta[:, None]), 0.0)
            if HAS_SCORE_SCALE:
                ds = ds * ss
            if DOT_FP32:
                dv += tl.dot(tl.trans(pm), do, input_precision=DOT_PRECISION)
                dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
            else:
                dv += tl.dot(tl.trans(pm.to(do.dtype)), do, input_precision=DOT_PRECISION)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    dk = dk * scale
    tl.store(DK + b * stride_dkb + kvh * stride_dkh + offs_n64[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + kvh * stride_dvh + offs_n64[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=vv_mask)


_KEY = [*tuning.FLAG_KEY, "TQ_BUCKET", "TK_BUCKET"]  # bucketed lengths: see kernels/tuning.py

attn_bwd_pre_kernel = _attn_bwd_pre_kernel
attn_bwd_dq_kernel = _attn_bwd_dq_kernel
attn_bwd_dkdv_kernel = _attn_bwd_dkdv_kernel

attn_bwd_pre = tuning.autotune(configs=config.configs("pre"), key=["HEAD_DIM", "TQ_BUCKET"], buckets={"TQ_BUCKET": "Tq"})(
    _attn_bwd_pre_kernel)
attn_bwd_dq = tuning.autotune(
    configs=config.configs("dq"), key=_KEY, prune_configs_by={"early_config_prune": config.pruner("dq")},
    reset_to_zero=["DSSPart"],  # autotuning runs several BLOCK_M: stale partial sums must not survive
)(_attn_bwd_dq_kernel)
attn_bwd_dkdv = tuning.autotune(
    configs=config.configs("dkdv"), key=_KEY, prune_configs_by={"early_config_prune": config.pruner("dkdv")},
)(_attn_bwd_dkdv_kernel)
