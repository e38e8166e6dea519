"""Helpers shared by the forward and backward attention kernels.

Scores are kept in the log2 domain (``s2 = s * log2(e)``) so the softmax uses ``exp2``;
``s = cap(q.k * scale * score_scale) + additive_mask`` is the natural-log score of the reference,
``cap(x) = softcap * tanh(x / softcap)`` with soft-capping, the identity without.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .config import INTERPRET

# Device functions. Under the interpreter a nested ``@triton.jit`` call re-patches triton.language on
# every call (a large fixed cost per key tile), so there they stay plain Python functions: the
# calling kernel has already patched the language, and the helpers use no construct the
# interpreter's source rewriting is needed for (no chained comparisons).
device_fn = (lambda fn: fn) if INTERPRET else triton.jit

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@device_fn
def _key_range(start_m, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[lo, hi) of the key positions a query tile can see (lo aligned down to BLOCK_N).

    Query ``i`` sits at position ``i + Tk - Tq``; tiles fully masked by causality or the
    sliding window are skipped.
    """
    shift = Tk - Tq
    q_lo = start_m + shift  # smallest query position of the tile
    q_hi = tl.minimum(start_m + BLOCK_M, Tq) - 1 + shift  # largest
    lo = 0
    hi = Tk
    if IS_CAUSAL:
        hi = tl.minimum(Tk, q_hi + 1)
        if HAS_WINDOW:
            lo = tl.maximum(0, q_lo - window + 1)
    else:
        if HAS_WINDOW:
            lo = tl.maximum(0, q_lo - window + 1)
            hi = tl.minimum(Tk, q_hi + window)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@device_fn
def _query_range(start_n, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[lo, hi) of the query rows that can see a key tile (lo aligned down to BLOCK_M)."""
    shift = Tk - Tq
    k_hi = tl.minimum(start_n + BLOCK_N, Tk) - 1
    lo = 0
    hi = Tq
    if IS_CAUSAL:
        lo = tl.maximum(0, start_n - shift)
        if HAS_WINDOW:
            hi = tl.minimum(Tq, k_hi + window - shift)
    else:
        if HAS_WINDOW:
            lo = tl.maximum(0, start_n - window + 1 - shift)
            hi = tl.minimum(Tq, k_hi + window - shift)
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


@device_fn
def _tanh(x):
    """``tanh`` of an fp32 tile to ~2 ulp (no libdevice call: the interpreter has none).

    Small ``|x|`` use the odd Taylor series to ``x^9`` (truncation < 1e-8 relative below 0.25), the
    rest ``1 - 2 / (exp(2|x|) + 1)`` with the sign restored; +-inf give +-1, NaN gives NaN.
    """
    ax = tl.abs(x)
    x2 = x * x
    poly = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    big = 1.0 - 2.0 / (tl.exp2(ax * 2.8853900817779268) + 1.0)  # exp(2|x|) = exp2(2|x| log2(e))
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.25, poly, big)


@device_fn
def _capped_scores(qk, qk_scale2, cap2, HAS_SOFTCAP: tl.constexpr):
    """Log2-domain scores of a tile before the masks: ``s2 = qk * qk_scale2``, soft-capped to
    ``cap2 * tanh(s2 / cap2)`` (``cap2 = softcap * log2(e)``, so ``s2 / cap2 = s / softcap``).

    ``qk`` is the raw fp32 ``q . k`` tile; ``qk_scale2 = scale * score_scale * log2(e)``. The
    backward reads ``d cap / d s = 1 - (s2 / cap2)^2`` off the result.
    """
    s2 = qk * qk_scale2
    if HAS_SOFTCAP:
        s2 = cap2 * _tanh(s2 / cap2)
    return s2


@device_fn
def _masked_scores(
    s2, offs_m, offs_n, Tq, Tk, window,
    mask_base, stride_mm, stride_mn,
    qb, kbits_base, stride_kbn,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, HAS_KNOCKOUT: tl.constexpr,
):
    """Log2-domain scores of a [BLOCK_M, BLOCK_N] tile with every removal applied (-inf).

    ``s2`` are the tile's scores before the masks (:func:`_capped_scores`); the additive mask is
    added here. Removed: keys/queries out of range, causality, window, bool mask False,
    knocked-out edges.
    """
    m_ok = offs_m < Tq
    n_ok = offs_n < Tk
    keep = m_ok[:, None] & n_ok[None, :]
    if IS_CAUSAL or HAS_WINDOW:
        diff = (offs_m[:, None] + (Tk - Tq)) - offs_n[None, :]  # query pos - key pos
        if IS_CAUSAL:
            keep = keep & (diff >= 0)
            if HAS_WINDOW:
                keep = keep & (diff < window)
        else:
            keep = keep & (diff < window) & (diff > -window)
    if HAS_MASK:
        mptrs = mask_base + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :].to(tl.int64) * stride_mn
        mval = tl.load(mptrs, mask=m_ok[:, None] & n_ok[None, :], other=0)
        if MASK_IS_BOOL:
            keep = keep & (mval != 0)
        else:
            s2 = s2 + mval.to(tl.float32) * 1.4426950408889634
    if HAS_KNOCKOUT:
        kb = tl.load(kbits_base + offs_n.to(tl.int64) * stride_kbn, mask=n_ok, other=0)
        keep = keep & ((qb[:, None] & kb[None, :]) == 0)
    return tl.where(keep, s2, float("-inf"))


@device_fn
def _finite_or_zero(x):
    """``(x with its non-finite elements zeroed, int32 [rows]: 1 where a row had one)`` of a 2-D tile.

    q, k and v enter every product cleaned like this, so a NaN never reaches a row through an
    edge the row does not read (``0 * NaN`` in a dot product); the flags say which rows/keys
    make a reading row NaN.
    """
    xf = x.to(tl.float32)
    ok = tl.abs(xf) < float("inf")  # false for NaN and +-inf
    bad = tl.max(tl.where(ok, 0, 1), 1)
    return tl.where(ok, x, 0.0).to(x.dtype), bad


@device_fn
def _nan_reads(s2, q_bad, kv_bad, row_bad):
    """Flag rows that read something non-finite; return ``(s2 without those entries, row_bad)``.

    An entry is read when its score is above ``-inf`` (NaN included). A row is bad when it reads
    a NaN or ``+inf`` score, or reads anything while its query is non-finite (``q_bad``), or reads
    a key whose k or v is non-finite (``kv_bad``). Bad entries become ``-inf`` so the online
    softmax stays finite; the caller writes NaN for bad rows.
    """
    read = s2 != float("-inf")
    bad = read & ((s2 != s2) | (s2 == float("inf")) | (q_bad[:, None] != 0) | (kv_bad[None, :] != 0))
    row_bad = row_bad | tl.max(bad.to(tl.int32), 1)
    return tl.where(bad, float("-inf"), s2), row_bad
