"""Semantics of ``headint.ops.attention`` on the reference backend.

Every expected value here is computed independently in this file (plain ``torch`` ops or
``torch.nn.functional.scaled_dot_product_attention``), never through headint's reference code.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headint.ops import BackendUnavailable, EdgeKnockout, attention, backends, last_backend

REF = "reference"


# ---------------------------------------------------------------------------------------------
# Independent helpers
# ---------------------------------------------------------------------------------------------


def rand(*shape, dtype=torch.float32, gen=None, requires_grad=False):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return x.requires_grad_(requires_grad)


def qkv(B=2, Hq=4, Hkv=2, Tq=5, Tk=5, D=8, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = rand(B, Hq, Tq, D, dtype=dtype, gen=g, requires_grad=requires_grad)
    k = rand(B, Hkv, Tk, D, dtype=dtype, gen=g, requires_grad=requires_grad)
    v = rand(B, Hkv, Tk, D, dtype=dtype, gen=g, requires_grad=requires_grad)
    return q, k, v


def expand_kv(q, k, v):
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def structural_keep(Tq, Tk, causal, window):
    """[Tq, Tk] bool: query i sits at position i + Tk - Tq (bottom-right alignment)."""
    keep = torch.ones(Tq, Tk, dtype=torch.bool)
    for i in range(Tq):
        p = i + Tk - Tq
        for j in range(Tk):
            if causal and j > p:
                keep[i, j] = False
            if window is not None:
                if causal and p - j >= window:
                    keep[i, j] = False
                if not causal and abs(p - j) >= window:
                    keep[i, j] = False
    return keep


def head_mask_4d(m, B, H, T):
    """Place a head_mask of any accepted rank as [B or 1, H, T or 1, 1]."""
    if m.dim() == 1:
        return m.reshape(1, H, 1, 1)
    if m.dim() == 2:
        return m.reshape(m.shape[0], H, 1, 1)
    if m.dim() == 3:
        return m[..., None]
    return m


def head_patch_4d(p, H):
    if p.dim() == 2:
        return p.reshape(1, H, 1, p.shape[-1])
    if p.dim() == 3:
        return p[None]
    return p


def dense_attention(q, k, v, *, causal=False, attn_mask=None, scale=None, head_mask=None, head_patch=None,
                    removed=None, score_scale=None, window=None, dtype=torch.float64):
    """Straightforward dense attention with interventions, computed in ``dtype``.

    ``removed``: bool broadcastable to [B, Hq, Tq, Tk], True = edge knocked out.
    Rows with no key left give zeros.
    """
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    k, v = expand_kv(q, k, v)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if score_scale is not None:
        ss = score_scale.to(dtype)
        ss = ss.reshape(1, Hq, 1, 1) if ss.dim() == 1 else ss.reshape(ss.shape[0], Hq, 1, 1)
        s = s * ss
    keep = torch.ones(B, Hq, Tq, Tk, dtype=torch.bool)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            s = s + attn_mask.to(dtype)
    keep = keep & structural_keep(Tq, Tk, causal, window)
    if removed is not None:
        keep = keep & ~removed
    s = s.masked_fill(~keep, float("-inf"))
    alive = torch.isfinite(s).any(dim=-1, keepdim=True)
    p = torch.softmax(torch.where(alive, s, torch.zeros_like(s)), dim=-1)
    p = torch.where(alive, p, torch.zeros_like(p))
    out = p @ v
    if head_mask is not None:
        m = head_mask_4d(head_mask.to(dtype), B, Hq, Tq)
        patch = torch.zeros_like(out) if head_patch is None else head_patch_4d(head_patch.to(dtype), Hq)
        out = m * out + (1 - m) * patch
    return out


def sdpa(q, k, v, **kw):
    k, v = expand_kv(q, k, v)
    if kw.get("attn_mask") is not None:  # SDPA wants at least 2-D masks; give it the full shape
        kw["attn_mask"] = kw["attn_mask"].expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, **kw)


def close(a, b, dtype):
    tol = {torch.float32: (2e-6, 1e-5), torch.float64: (1e-12, 1e-10)}[dtype]
    torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), atol=tol[0], rtol=tol[1])


def close_fp32_grad(a, b):
    """Gradients w.r.t. head_mask / score_scale, compared at float32 accuracy."""
    torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)


# ---------------------------------------------------------------------------------------------
# No intervention == SDPA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_plain_matches_sdpa(dtype, Hq, Hkv, causal):
    q, k, v = qkv(Hq=Hq, Hkv=Hkv, Tq=7, Tk=7, dtype=dtype)
    out = attention(q, k, v, causal=causal, backend=REF)
    assert out.dtype == dtype and out.shape == q.shape
    close(out, sdpa(q, k, v, is_causal=causal), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_shape", [(7,), (1, 7), (6, 7), (1, 1, 6, 7), (2, 1, 6, 7), (2, 4, 6, 7), (4, 1, 7)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_broadcast_match_sdpa(dtype, mask_shape, kind):
    q, k, v = qkv(Hq=4, Hkv=2, Tq=6, Tk=7, dtype=dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    if kind == "bool":
        mask = torch.rand(*mask_shape, generator=g) > 0.4
        mask[..., 0] = True  # keep every row alive: SDPA gives NaN for an empty row
    else:
        mask = torch.randn(*mask_shape, generator=g, dtype=torch.float64).to(dtype)
    out = attention(q, k, v, attn_mask=mask, backend=REF)
    close(out, sdpa(q, k, v, attn_mask=mask), dtype)
    close(out, dense_attention(q, k, v, attn_mask=mask), dtype)


def test_additive_mask_with_neg_inf_and_causal():
    q, k, v = qkv(Tq=6, Tk=6, seed=3)
    mask = torch.zeros(6, 6)
    mask[:, 2] = float("-inf")
    mask[0, 0] = 0.0
    out = attention(q, k, v, attn_mask=mask, causal=True, backend=REF)
    full = mask + torch.full((6, 6), float("-inf")).triu(1)
    close(out, sdpa(q, k, v, attn_mask=full), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_custom_scale(dtype, causal):
    q, k, v = qkv(dtype=dtype, seed=4)
    out = attention(q, k, v, scale=0.37, causal=causal, backend=REF)
    close(out, sdpa(q, k, v, scale=0.37, is_causal=causal), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Tq,Tk", [(1, 6), (3, 8), (5, 6)])
def test_causal_bottom_right_alignment(dtype, Tq, Tk):
    q, k, v = qkv(Tq=Tq, Tk=Tk, dtype=dtype, seed=5)
    i = torch.arange(Tq)[:, None]
    j = torch.arange(Tk)[None, :]
    mask = j <= i + (Tk - Tq)
    out = attention(q, k, v, causal=True, backend=REF)
    close(out, sdpa(q, k, v, attn_mask=mask), dtype)
    # and it is *not* the top-left alignment SDPA's is_causal uses
    assert not torch.allclose(out, sdpa(q, k, v, is_causal=True))


def test_causal_more_queries_than_keys_gives_zero_rows():
    Tq, Tk = 6, 4
    q, k, v = qkv(Tq=Tq, Tk=Tk, dtype=torch.float64, seed=6)
    out = attention(q, k, v, causal=True, backend=REF)
    assert torch.isfinite(out).all()
    # queries 0, 1 sit at positions -2, -1: no key
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    mask = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
    close(out[:, :, 2:], sdpa(q, k, v, attn_mask=mask)[:, :, 2:], torch.float64)


@pytest.mark.parametrize("window", [1, 2, 3, 10])
@pytest.mark.parametrize("Tq,Tk", [(7, 7), (3, 7)])
def test_causal_sliding_window_matches_explicit_mask(window, Tq, Tk):
    q, k, v = qkv(Tq=Tq, Tk=Tk, dtype=torch.float64, seed=7)
    i = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    mask = (j <= i) & (i - j < window)
    out = attention(q, k, v, causal=True, window=window, backend=REF)
    close(out, sdpa(q, k, v, attn_mask=mask), torch.float64)
    if window >= Tk:
        close(out, attention(q, k, v, causal=True, backend=REF), torch.float64)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_noncausal_sliding_window_is_symmetric_band(window):
    # Both the reference and the CPU kernel keep |i' - j| < window when causal=False.
    q, k, v = qkv(Tq=6, Tk=6, dtype=torch.float64, seed=8)
    i = torch.arange(6)[:, None]
    j = torch.arange(6)[None, :]
    mask = (i - j).abs() < window
    out = attention(q, k, v, window=window, backend=REF)
    close(out, sdpa(q, k, v, attn_mask=mask), torch.float64)


def test_window_combined_with_bool_mask():
    q, k, v = qkv(Tq=6, Tk=6, dtype=torch.float64, seed=9)
    g = torch.Generator().manual_seed(0)
    bmask = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    out = attention(q, k, v, causal=True, window=3, attn_mask=bmask, backend=REF)
    close(out, dense_attention(q, k, v, causal=True, window=3, attn_mask=bmask), torch.float64)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
def test_low_precision_dtypes(dtype, atol):
    # Output keeps q's dtype; values agree with fp32 SDPA on the same (rounded) inputs.
    q, k, v = (x.to(dtype) for x in qkv(Tq=6, Tk=6, seed=56))
    m = torch.tensor([1.0, 0.5, 0.0, 1.0])
    out = attention(q, k, v, causal=True, head_mask=m, backend=REF)
    assert out.dtype == dtype
    exp = sdpa(q.float(), k.float(), v.float(), is_causal=True) * m.reshape(1, 4, 1, 1)
    torch.testing.assert_close(out.float(), exp, atol=atol, rtol=0)


def test_plain_gradients_match_sdpa():
    q, k, v = qkv(Hq=4, Hkv=2, Tq=5, Tk=5, dtype=torch.float64, seed=10, requires_grad=True)
    dout = torch.randn(q.shape, dtype=torch.float64)
    g1 = torch.autograd.grad(attention(q, k, v, causal=True, backend=REF), (q, k, v), dout)
    g2 = torch.autograd.grad(sdpa(q, k, v, is_causal=True), (q, k, v), dout)
    for a, b in zip(g1, g2):
        close(a, b, torch.float64)


def test_non_contiguous_inputs():
    q, k, v = qkv(Tq=5, Tk=5, D=8, seed=11)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, permuted strides
    kt = k[..., ::1].transpose(2, 3).contiguous().transpose(2, 3)
    out = attention(qt, kt, v, causal=True, backend=REF)
    close(out, sdpa(q, k, v, is_causal=True), torch.float32)


# ---------------------------------------------------------------------------------------------
# head_mask / head_patch
# ---------------------------------------------------------------------------------------------

B_, H_, T_, D_ = 2, 4, 5, 3


def _mask_of_shape(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float32)  # fractional in [0, 1)


@pytest.mark.parametrize("mshape", [(H_,), (B_, H_), (B_, H_, T_), (B_, H_, T_, 1), (1, H_), (1, H_, 1)])
@pytest.mark.parametrize("pshape", [None, (H_, D_), (H_, T_, D_), (B_, H_, T_, D_), (1, H_, 1, D_)])
@pytest.mark.parametrize("causal", [False, True])
def test_head_mask_and_patch_shapes(mshape, pshape, causal):
    q, k, v = qkv(B=B_, Hq=H_, Hkv=2, Tq=T_, Tk=T_, D=D_, dtype=torch.float64, seed=12)
    m = _mask_of_shape(mshape).double()  # float32-representable values
    patch = None if pshape is None else rand(*pshape, dtype=torch.float64, gen=torch.Generator().manual_seed(1))
    out = attention(q, k, v, causal=causal, head_mask=m, head_patch=patch, backend=REF)
    # independent: m * attn + (1 - m) * patch with attn from SDPA
    attn = sdpa(q, k, v, is_causal=causal)
    m4 = head_mask_4d(m, B_, H_, T_)
    p4 = torch.zeros(()) if patch is None else head_patch_4d(patch, H_)
    close(out, m4 * attn + (1 - m4) * p4, torch.float64)


def test_head_mask_scales_a_head():
    q, k, v = qkv(dtype=torch.float64, seed=13)
    m = torch.tensor([1.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    out = attention(q, k, v, head_mask=m, backend=REF)
    attn = sdpa(q, k, v)
    close(out[:, 0], attn[:, 0], torch.float64)
    close(out[:, 1], 0.5 * attn[:, 1], torch.float64)
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
    close(out[:, 3], 2.0 * attn[:, 3], torch.float64)


def test_bool_head_mask():
    q, k, v = qkv(seed=14)
    m = torch.tensor([True, False, True, False])
    out = attention(q, k, v, head_mask=m, backend=REF)
    attn = attention(q, k, v, backend=REF)
    assert torch.equal(out[:, ::2], attn[:, ::2])
    assert torch.equal(out[:, 1::2], torch.zeros_like(out[:, 1::2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mshape", [(H_,), (B_, H_), (B_, H_, T_), (B_, H_, T_, 1)])
@pytest.mark.parametrize("with_patch", [False, True])
def test_head_mask_of_ones_is_bit_exact(dtype, mshape, with_patch):
    q, k, v = qkv(B=B_, Hq=H_, Hkv=2, Tq=T_, Tk=T_, D=D_, dtype=dtype, seed=15)
    patch = rand(H_, T_, D_, dtype=dtype) if with_patch else None
    plain = attention(q, k, v, causal=True, backend=REF)
    out = attention(q, k, v, causal=True, head_mask=torch.ones(mshape, dtype=dtype), head_patch=patch, backend=REF)
    assert torch.equal(out, plain)


def test_head_mask_zero_without_patch_is_zero():
    q, k, v = qkv(seed=16)
    out = attention(q, k, v, causal=True, head_mask=torch.zeros(4), backend=REF)
    assert torch.equal(out, torch.zeros_like(q))


def test_head_mask_zero_with_patch_is_patch():
    q, k, v = qkv(seed=17)
    patch = rand(2, 4, 5, 8, gen=torch.Generator().manual_seed(3))
    out = attention(q, k, v, head_mask=torch.zeros(2, 4), head_patch=patch, backend=REF)
    assert torch.equal(out, patch)


def test_head_patch_dtype_cast_to_q():
    q, k, v = qkv(seed=18)
    patch64 = rand(4, 8, dtype=torch.float64)
    out = attention(q, k, v, head_mask=torch.zeros(4), head_patch=patch64, backend=REF)
    assert out.dtype == torch.float32
    close(out, patch64.float()[None, :, None, :].expand_as(out), torch.float32)


def test_head_mask_does_not_mutate_inputs():
    q, k, v = qkv(seed=19)
    m = torch.rand(4)
    patch = torch.randn(4, 8)
    copies = [x.clone() for x in (q, k, v, m, patch)]
    attention(q, k, v, head_mask=m, head_patch=patch, backend=REF)
    for a, b in zip((q, k, v, m, patch), copies):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# EdgeKnockout
# ---------------------------------------------------------------------------------------------


def _bools(*shape, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) < p


def _outer(qs, ks, B, H, Tq, Tk):
    """Dense removed-edge mask [B, H, Tq, Tk] of one compact knockout, by outer product."""
    def full(x, T):
        return x.reshape((1,) * (3 - x.dim()) + tuple(x.shape)).expand(B, H, T)
    return full(qs, Tq)[..., :, None] & full(ks, Tk)[..., None, :]


@pytest.mark.parametrize("causal", [False, True])
def test_compact_knockout_equals_dense(causal):
    B, H, Tq, Tk = 2, 4, 5, 7
    q, k, v = qkv(B=B, Hq=H, Hkv=2, Tq=Tq, Tk=Tk, dtype=torch.float64, seed=20)
    qs, ks = _bools(B, H, Tq, seed=1), _bools(B, H, Tk, seed=2)
    dense = _outer(qs, ks, B, H, Tq, Tk)
    out = attention(q, k, v, causal=causal, knockout=EdgeKnockout(qs, ks), backend=REF)
    close(out, dense_attention(q, k, v, causal=causal, removed=dense), torch.float64)
    out_dense = attention(q, k, v, causal=causal, knockout=dense, backend=REF)
    close(out, out_dense, torch.float64)


@pytest.mark.parametrize("qshape", [(5,), (4, 5), (2, 4, 5), (1, 4, 5), (2, 1, 5), (1,)])
@pytest.mark.parametrize("kshape", [(7,), (4, 7), (2, 4, 7), (2, 1, 1)])
def test_knockout_selector_broadcasting(qshape, kshape):
    B, H, Tq, Tk = 2, 4, 5, 7
    q, k, v = qkv(B=B, Hq=H, Hkv=2, Tq=Tq, Tk=Tk, dtype=torch.float64, seed=21)
    qs, ks = _bools(*qshape, seed=3), _bools(*kshape, p=0.4, seed=4)
    out = attention(q, k, v, causal=True, knockout=EdgeKnockout(qs, ks), backend=REF)
    dense = _outer(qs, ks, B, H, Tq, Tk)
    close(out, dense_attention(q, k, v, causal=True, removed=dense), torch.float64)


def test_knockout_list_is_union():
    B, H, Tq, Tk = 2, 4, 6, 6
    q, k, v = qkv(B=B, Hq=H, Hkv=2, Tq=Tq, Tk=Tk, dtype=torch.float64, seed=22)
    kos, dense = [], torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for n, (qshape, kshape) in enumerate([((Tq,), (Tk,)), ((H, Tq), (B, H, Tk)), ((B, H, Tq), (H, Tk))]):
        qs, ks = _bools(*qshape, p=0.3, seed=10 + n), _bools(*kshape, p=0.3, seed=20 + n)
        kos.append(EdgeKnockout(qs, ks))
        dense |= _outer(qs, ks, B, H, Tq, Tk)
    out = attention(q, k, v, causal=True, knockout=kos, backend=REF)
    close(out, dense_attention(q, k, v, causal=True, removed=dense), torch.float64)
    assert torch.equal(out, attention(q, k, v, causal=True, knockout=tuple(kos), backend=REF))
    # an empty list is no knockout
    assert torch.equal(attention(q, k, v, knockout=[], backend=REF), attention(q, k, v, backend=REF))


@pytest.mark.parametrize("active", [0, 30, 31])
def test_32_knockouts_every_bit_works(active):
    # 32 knockouts (the maximum); only the one at index `active` removes anything. Index 31 is
    # the sign bit of the int32 words.
    B, H, Tq, Tk = 1, 2, 4, 4
    q, k, v = qkv(B=B, Hq=H, Hkv=1, Tq=Tq, Tk=Tk, dtype=torch.float64, seed=23)
    none = torch.zeros(Tq, dtype=torch.bool)
    qs = torch.tensor([False, True, True, True])
    ks = torch.tensor([True, False, True, False])
    kos = [EdgeKnockout(none, torch.ones(Tk, dtype=torch.bool)) for _ in range(32)]
    kos[active] = EdgeKnockout(qs, ks)
    out = attention(q, k, v, knockout=kos, backend=REF)
    close(out, dense_attention(q, k, v, removed=_outer(qs, ks, B, H, Tq, Tk)), torch.float64)


def test_32_knockouts_disjoint_bits_do_not_mix():
    # EdgeKnockout n selects query n % Tq and key (n * 3) % Tk: selectors of different knockouts
    # must not combine (query of one, key of another).
    B, H, Tq, Tk = 1, 2, 8, 8
    q, k, v = qkv(B=B, Hq=H, Hkv=2, Tq=Tq, Tk=Tk, dtype=torch.float64, seed=24)
    kos, dense = [], torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for n in range(32):
        qs = torch.zeros(Tq, dtype=torch.bool)
        ks = torch.zeros(Tk, dtype=torch.bool)
        qs[n % Tq] = True
        ks[(n * 3 + n // Tq) % Tk] = True
        kos.append(EdgeKnockout(qs, ks))
        dense |= _outer(qs, ks, B, H, Tq, Tk)
    out = attention(q, k, v, knockout=kos, backend=REF)
    close(out, dense_attention(q, k, v, removed=dense), torch.float64)


@pytest.mark.parametrize("how", ["compact", "dense", "bool_mask", "additive_mask"])
def test_fully_knocked_row_is_zero_with_finite_grads(how):
    B, H, Tq, Tk = 1, 2, 4, 4
    q, k, v = qkv(B=B, Hq=H, Hkv=1, Tq=Tq, Tk=Tk, dtype=torch.float64, seed=25, requires_grad=True)
    row = torch.tensor([False, False, True, False])
    kw = {}
    if how == "compact":
        kw["knockout"] = EdgeKnockout(row, torch.ones(Tk, dtype=torch.bool))
    elif how == "dense":
        kw["knockout"] = row[:, None].expand(Tq, Tk)
    elif how == "bool_mask":
        kw["attn_mask"] = ~row[:, None].expand(Tq, Tk)
    else:
        kw["attn_mask"] = torch.zeros(Tq, Tk, dtype=torch.float64).masked_fill(row[:, None], float("-inf"))
    m = torch.tensor([0.75, 1.0], dtype=torch.float64, requires_grad=True)
    out = attention(q, k, v, causal=True, head_mask=m, backend=REF, **kw)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    expected = dense_attention(q.detach(), k.detach(), v.detach(), causal=True, head_mask=m.detach(),
                               removed=row[:, None].expand(Tq, Tk))
    close(out, expected, torch.float64)
    grads = torch.autograd.grad(out, (q, k, v, m), torch.randn(out.shape, dtype=torch.float64))
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.equal(grads[0][:, :, 2], torch.zeros_like(grads[0][:, :, 2]))


def test_every_row_knocked_out_gives_zeros():
    q, k, v = qkv(seed=26, requires_grad=True)
    ko = EdgeKnockout(torch.ones(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool))
    out = attention(q, k, v, knockout=ko, backend=REF)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for x in (q, k, v):
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_knocked_row_with_patch_gives_patch_part():
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Tq=3, Tk=3, D=4, dtype=torch.float64, seed=27)
    patch = rand(2, 4, dtype=torch.float64)
    m = torch.tensor([0.25, 0.5], dtype=torch.float64)
    ko = EdgeKnockout(torch.tensor([True, False, False]), torch.ones(3, dtype=torch.bool))
    out = attention(q, k, v, knockout=ko, head_mask=m, head_patch=patch, backend=REF)
    close(out[0, :, 0], (1 - m)[:, None] * patch, torch.float64)


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("ko_shape", [(6, 6), (4, 1, 6), (2, 4, 6, 6)])
def test_dense_knockout_with_attn_mask(mask_kind, ko_shape):
    B, H, T = 2, 4, 6
    q, k, v = qkv(B=B, Hq=H, Hkv=2, Tq=T, Tk=T, dtype=torch.float64, seed=28)
    removed = _bools(*ko_shape, p=0.3, seed=5)
    mask = None
    if mask_kind == "bool":
        mask = _bools(B, 1, T, T, p=0.8, seed=6)
    elif mask_kind == "additive":
        mask = rand(H, T, T, dtype=torch.float64, gen=torch.Generator().manual_seed(7))
    out = attention(q, k, v, attn_mask=mask, knockout=removed, causal=True, backend=REF)
    close(out, dense_attention(q, k, v, attn_mask=mask, removed=removed, causal=True), torch.float64)


def test_knockout_does_not_mutate_attn_mask():
    q, k, v = qkv(Tq=4, Tk=4, seed=29)
    mask = torch.zeros(4, 4)
    before = mask.clone()
    attention(q, k, v, attn_mask=mask, knockout=torch.eye(4, dtype=torch.bool), backend=REF)
    assert torch.equal(mask, before)


# ---------------------------------------------------------------------------------------------
# score_scale
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4,), (2, 4), (1, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_score_scale_equals_scaling_q(shape, causal):
    q, k, v = qkv(dtype=torch.float64, seed=30)
    ss = (torch.rand(*shape, generator=torch.Generator().manual_seed(1)) * 3).double()  # fp32-representable
    out = attention(q, k, v, causal=causal, score_scale=ss, backend=REF)
    ss4 = ss.reshape(1, 4, 1, 1) if ss.dim() == 1 else ss.reshape(ss.shape[0], 4, 1, 1)
    close(out, sdpa(q * ss4, k, v, is_causal=causal), torch.float64)


def test_zero_score_scale_is_uniform_over_kept_keys():
    B, H, T = 2, 4, 6
    q, k, v = qkv(B=B, Hq=H, Hkv=2, Tq=T, Tk=T, dtype=torch.float64, seed=31)
    ss = torch.tensor([0.0, 1.0, 0.0, 1.0])
    out = attention(q, k, v, causal=True, score_scale=ss, backend=REF)
    _, ve = expand_kv(q, k, v)
    counts = torch.arange(1, T + 1, dtype=torch.float64)[:, None]
    prefix_mean = ve.cumsum(dim=2) / counts
    close(out[:, 0::2], prefix_mean[:, 0::2], torch.float64)
    close(out[:, 1::2], sdpa(q, k, v, is_causal=True)[:, 1::2], torch.float64)
    # with a bool mask: uniform over the keys the mask keeps
    keep = _bools(T, T, p=0.6, seed=8)
    keep[:, 0] = True
    out = attention(q, k, v, attn_mask=keep, score_scale=torch.zeros(H), backend=REF)
    w = keep.double() / keep.sum(-1, keepdim=True)
    close(out, w @ ve, torch.float64)


def test_negative_score_scale():
    q, k, v = qkv(dtype=torch.float64, seed=32)
    ss = torch.tensor([-1.0, -0.5, 2.0, 1.0])
    out = attention(q, k, v, score_scale=ss, backend=REF)
    close(out, sdpa(q * ss.double().reshape(1, 4, 1, 1), k, v), torch.float64)


# ---------------------------------------------------------------------------------------------
# Per-row interventions
# ---------------------------------------------------------------------------------------------


def test_per_row_head_ablation_equals_separate_runs():
    B = H = 3
    q, k, v = qkv(B=B, Hq=H, Hkv=1, Tq=5, Tk=5, D=4, dtype=torch.float64, seed=33)
    m = 1 - torch.eye(B, H, dtype=torch.float64)  # row i ablates head i
    out = attention(q, k, v, causal=True, head_mask=m, backend=REF)
    for i in range(B):
        row = attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], causal=True, head_mask=m[i], backend=REF)
        assert torch.equal(out[i:i + 1], row)
        assert torch.equal(out[i, i], torch.zeros_like(out[i, i]))
        close(out[i:i + 1], dense_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], causal=True, head_mask=m[i]),
              torch.float64)


def test_per_row_mixed_interventions_equal_separate_runs():
    B, H, T, D = 3, 3, 5, 4
    q, k, v = qkv(B=B, Hq=H, Hkv=1, Tq=T, Tk=T, D=D, dtype=torch.float64, seed=34)
    m = torch.rand(B, H, T, generator=torch.Generator().manual_seed(1)).double()
    patch = rand(B, H, T, D, dtype=torch.float64, gen=torch.Generator().manual_seed(2))
    ss = torch.rand(B, H, generator=torch.Generator().manual_seed(3)).double() * 2  # fp32-representable
    qs, ks = _bools(B, H, T, seed=4), _bools(B, H, T, seed=5)
    out = attention(q, k, v, causal=True, head_mask=m, head_patch=patch, score_scale=ss,
                    knockout=EdgeKnockout(qs, ks), backend=REF)
    for i in range(B):
        s = slice(i, i + 1)
        row = attention(q[s], k[s], v[s], causal=True, head_mask=m[s], head_patch=patch[s], score_scale=ss[i],
                        knockout=EdgeKnockout(qs[i], ks[i]), backend=REF)
        close(out[s], row, torch.float64)
        exp = dense_attention(q[s], k[s], v[s], causal=True, head_mask=m[s], head_patch=patch[s], score_scale=ss[i],
                              removed=_outer(qs[i], ks[i], 1, H, T, T))
        close(out[s], exp, torch.float64)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def _gc_inputs(seed=40, B=1, Hq=2, Hkv=1, Tq=3, Tk=4, D=3):
    return qkv(B=B, Hq=Hq, Hkv=Hkv, Tq=Tq, Tk=Tk, D=D, dtype=torch.float64, seed=seed, requires_grad=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_gradcheck_qkv_patch_with_everything(causal, mask_kind):
    # head_mask / score_scale enter as constants here (their own gradcheck is below).
    q, k, v = _gc_inputs()
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    patch = rand(Hq, Tq, D, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[0.25, 0.75]]).double()
    ss = torch.tensor([1.5, 0.5]).double()
    mask = None
    if mask_kind == "bool":
        mask = torch.tensor([[True, True, False, True], [True, False, True, True], [True, True, True, False]])
    elif mask_kind == "additive":
        mask = rand(Tq, Tk, dtype=torch.float64, gen=torch.Generator().manual_seed(9))
    ko = [EdgeKnockout(torch.tensor([False, True, False]), torch.tensor([True, False, False, True])),
          EdgeKnockout(torch.tensor([[True, False, False], [False, False, True]]), torch.tensor([False, True, False, False]))]

    def f(q, k, v, patch):
        return attention(q, k, v, causal=causal, attn_mask=mask, head_mask=m, head_patch=patch, score_scale=ss,
                         knockout=ko, scale=0.8, backend=REF)

    assert torch.autograd.gradcheck(f, (q, k, v, patch))


def test_gradcheck_window_and_dense_knockout():
    q, k, v = _gc_inputs(seed=41, Tq=4, Tk=4)
    removed = torch.zeros(4, 4, dtype=torch.bool)
    removed[2, 1] = removed[3, 3] = True

    def f(q, k, v):
        return attention(q, k, v, causal=True, window=2, knockout=removed, backend=REF)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradcheck_with_fully_knocked_row():
    q, k, v = _gc_inputs(seed=42, Tq=3, Tk=3)
    ko = EdgeKnockout(torch.tensor([False, True, False]), torch.ones(3, dtype=torch.bool))
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, knockout=ko, causal=True, backend=REF),
                                    (q, k, v))


@pytest.mark.parametrize("which", ["head_mask", "score_scale"])
def test_gradcheck_head_mask_and_score_scale_fp64(which):
    q, k, v = _gc_inputs(seed=43)
    patch = rand(2, 3, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([0.3, 0.6], dtype=torch.float64, requires_grad=True)
    ss = torch.tensor([1.3, 0.7], dtype=torch.float64, requires_grad=True)
    ko = EdgeKnockout(torch.tensor([False, True, False]), torch.tensor([True, False, False, True]))

    def f(q, k, v, m, patch, ss):
        return attention(q, k, v, causal=True, head_mask=m, head_patch=patch, score_scale=ss, knockout=ko,
                         backend=REF)

    inputs = (q, k, v, m, patch, ss)
    if which == "head_mask":
        ss.requires_grad_(False)
    else:
        m.requires_grad_(False)
    assert torch.autograd.gradcheck(f, inputs)


def test_fp64_head_mask_forward_precision():
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Tq=3, Tk=3, D=4, dtype=torch.float64, seed=44)
    m = torch.tensor([0.1, 0.3], dtype=torch.float64)  # not representable in float32
    out = attention(q, k, v, head_mask=m, backend=REF)
    close(out, m.reshape(1, 2, 1, 1) * sdpa(q, k, v), torch.float64)


def test_fp64_head_mask_gradient_precision():
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Tq=3, Tk=3, D=4, dtype=torch.float64, seed=48)
    m = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)  # exact in float32
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (gm,) = torch.autograd.grad(attention(q, k, v, head_mask=m, backend=REF), m, dout)
    close(gm, (dout * sdpa(q, k, v)).sum(dim=(0, 2, 3)), torch.float64)


@pytest.mark.parametrize("mshape", [(2,), (1, 2), (1, 2, 3), (1, 2, 3, 1)])
def test_head_mask_and_score_scale_grads_match_dense_autograd(mshape):
    # Analytic gradients of head_mask / score_scale (and everything else) against autograd
    # through the independent dense formula, at float32-representable parameter values.
    q, k, v = _gc_inputs(seed=45)
    patch = rand(2, 3, dtype=torch.float64, requires_grad=True)
    m = torch.rand(mshape, generator=torch.Generator().manual_seed(1)).double().requires_grad_()
    ss = torch.tensor([1.25, 0.75], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True]])
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    inputs = (q, k, v, m, patch, ss)
    out = attention(q, k, v, causal=True, attn_mask=mask, head_mask=m, head_patch=patch, score_scale=ss,
                    backend=REF)
    exp = dense_attention(q, k, v, causal=True, attn_mask=mask, head_mask=m, head_patch=patch, score_scale=ss)
    close(out, exp, torch.float64)
    g1 = torch.autograd.grad(out, inputs, dout)
    g2 = torch.autograd.grad(exp, inputs, dout)
    for i, (a, b) in enumerate(zip(g1, g2)):
        if i in (3, 5):  # head_mask, score_scale
            close_fp32_grad(a, b)
        else:
            close(a, b, torch.float64)


@pytest.mark.parametrize("mshape", [(4,), (2, 4), (2, 4, 5), (2, 4, 5, 1)])
def test_head_mask_gradient_identity(mshape):
    # d out / d m = sum_d dO * (attn - patch), reduced over the dims m broadcasts over.
    q, k, v = qkv(B=2, Hq=4, Hkv=2, Tq=5, Tk=5, D=3, dtype=torch.float64, seed=46)
    m = torch.rand(mshape, generator=torch.Generator().manual_seed(1)).double().requires_grad_()
    patch = rand(4, 5, 3, dtype=torch.float64)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = attention(q, k, v, causal=True, head_mask=m, head_patch=patch, backend=REF)
    (gm,) = torch.autograd.grad(out, m, dout)
    attn = sdpa(q, k, v, is_causal=True)
    per = (dout * (attn - patch[None])).sum(-1)  # [B, H, T]
    if len(mshape) == 1:
        exp = per.sum(dim=(0, 2))
    elif len(mshape) == 2:
        exp = per.sum(dim=2)
    elif len(mshape) == 3:
        exp = per
    else:
        exp = per[..., None]
    close_fp32_grad(gm, exp)
    # and the patch gradient is (1 - m) * dO reduced over the batch
    patch_r = patch.clone().requires_grad_()
    out = attention(q, k, v, causal=True, head_mask=m.detach(), head_patch=patch_r, backend=REF)
    (gp,) = torch.autograd.grad(out, patch_r, dout)
    close(gp, ((1 - head_mask_4d(m.detach(), 2, 4, 5)) * dout).sum(0), torch.float64)


def test_score_scale_gradient_matches_finite_difference_fp32_representable():
    # d out / d s for a head = directional derivative along q for that head (scaling q).
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Tq=4, Tk=4, D=3, dtype=torch.float64, seed=47)
    ss = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = attention(q, k, v, causal=True, score_scale=ss, backend=REF)
    (g,) = torch.autograd.grad(out, ss, dout)
    # independent: out(s) = SDPA(q * s); d/ds = <grad_q SDPA, q>
    qs = (q * ss.detach().reshape(1, 2, 1, 1)).requires_grad_()
    (gq,) = torch.autograd.grad(sdpa(qs, k, v, is_causal=True), qs, dout)
    close_fp32_grad(g, (gq * q).sum(dim=(0, 2, 3)))


# ---------------------------------------------------------------------------------------------
# Property test
# ---------------------------------------------------------------------------------------------


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 3))
    Tq = draw(st.integers(1, 5))
    Tk = draw(st.integers(1, 6))
    D = draw(st.integers(1, 4))
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(1, 4)))
    mask_kind = draw(st.sampled_from([None, "bool", "additive"]))
    mask_shape = draw(st.sampled_from([(Tq, Tk), (1, Tk), (Hq, Tq, Tk), (B, 1, Tq, Tk), (B, Hq, 1, Tk)]))
    ko_kind = draw(st.sampled_from([None, "compact", "list", "dense"]))
    hm_rank = draw(st.sampled_from([None, 1, 2, 3, 4]))
    patch_rank = draw(st.sampled_from([None, 2, 3, 4]))
    use_ss = draw(st.sampled_from([None, 1, 2]))
    scale = draw(st.one_of(st.none(), st.floats(0.1, 2.0)))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, Hkv=Hkv, Hq=Hq, Tq=Tq, Tk=Tk, D=D, causal=causal, window=window, mask_kind=mask_kind,
                mask_shape=mask_shape, ko_kind=ko_kind, hm_rank=hm_rank, patch_rank=patch_rank, use_ss=use_ss,
                scale=scale, seed=seed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases())
def test_property_reference_equals_dense(c):
    B, Hq, Hkv, Tq, Tk, D = c["B"], c["Hq"], c["Hkv"], c["Tq"], c["Tk"], c["D"]
    g = torch.Generator().manual_seed(c["seed"])
    q, k, v = (rand(*s, dtype=torch.float64, gen=g) for s in [(B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D)])
    kw, dkw = {}, {}
    if c["mask_kind"] == "bool":
        kw["attn_mask"] = torch.rand(*c["mask_shape"], generator=g) < 0.7
    elif c["mask_kind"] == "additive":
        add = torch.randn(*c["mask_shape"], generator=g, dtype=torch.float64)
        add = add.masked_fill(torch.rand(*c["mask_shape"], generator=g) < 0.15, float("-inf"))
        kw["attn_mask"] = add
    removed = None
    if c["ko_kind"] in ("compact", "list"):
        n = 1 if c["ko_kind"] == "compact" else 3
        kos = []
        removed = torch.zeros(B, Hq, Tq, Tk, dtype=torch.bool)
        for _ in range(n):
            qs = torch.rand(B, Hq, Tq, generator=g) < 0.5
            ks = torch.rand(Hq, Tk, generator=g) < 0.4
            kos.append(EdgeKnockout(qs, ks))
            removed |= _outer(qs, ks, B, Hq, Tq, Tk)
        kw["knockout"] = kos[0] if n == 1 else kos
    elif c["ko_kind"] == "dense":
        removed = torch.rand(B, 1, Tq, Tk, generator=g) < 0.25
        kw["knockout"] = removed
    if c["hm_rank"] is not None:
        shape = {1: (Hq,), 2: (B, Hq), 3: (B, Hq, Tq), 4: (B, Hq, Tq, 1)}[c["hm_rank"]]
        kw["head_mask"] = torch.rand(*shape, generator=g).double()  # fp32-representable
        if c["patch_rank"] is not None:
            pshape = {2: (Hq, D), 3: (Hq, Tq, D), 4: (B, Hq, Tq, D)}[c["patch_rank"]]
            kw["head_patch"] = rand(*pshape, dtype=torch.float64, gen=g)
    if c["use_ss"] is not None:
        shape = (Hq,) if c["use_ss"] == 1 else (B, Hq)
        kw["score_scale"] = (torch.rand(*shape, generator=g) * 2).double()
    dkw = {key: val for key, val in kw.items() if key != "knockout"}
    out = attention(q, k, v, causal=c["causal"], window=c["window"], scale=c["scale"], backend=REF, **kw)
    exp = dense_attention(q, k, v, causal=c["causal"], window=c["window"], scale=c["scale"], removed=removed,
                          **dkw)
    assert out.shape == (B, Hq, Tq, D)
    assert torch.isfinite(out).all()
    close(out, exp, torch.float64)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def test_last_backend_reference():
    q, k, v = qkv(seed=50)
    attention(q, k, v, backend=REF)
    assert last_backend() == "reference"


@pytest.mark.parametrize("kind", ["plain", "head_mask", "knockout"])
def test_auto_on_cpu_runs_and_matches_reference(kind):
    q, k, v = qkv(seed=51)
    kw = {}
    if kind == "head_mask":
        kw["head_mask"] = torch.tensor([1.0, 0.5, 0.0, 1.0])
    elif kind == "knockout":
        qs = torch.tensor([False, True, False, True, True])
        kw["knockout"] = EdgeKnockout(qs, torch.tensor([True, False, True, False, False]))
    ref = attention(q, k, v, causal=True, backend=REF, **kw)
    out = attention(q, k, v, causal=True, backend="auto", **kw)
    name = last_backend()
    assert name in backends.backend_names()[1:] and name != "triton"  # a concrete CPU-capable backend, not "auto"
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    ko = kw.pop("knockout", None)
    removed = None if ko is None else _outer(ko.queries, ko.keys, 2, 4, 5, 5)
    exp = dense_attention(q, k, v, causal=True, removed=removed, **kw)
    torch.testing.assert_close(out, exp.float(), atol=1e-5, rtol=1e-4)


def test_unknown_backend_raises_clear_message():
    q, k, v = qkv(seed=52)
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'nope'.*reference"):
        attention(q, k, v, backend="nope")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") is not None, reason="TRITON_INTERPRET is set")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv(seed=53)
    with pytest.raises(BackendUnavailable, match=r"triton.*CPU.*TRITON_INTERPRET=1"):
        attention(q, k, v, backend="triton")


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


def test_single_query_single_key():
    q, k, v = qkv(B=1, Hq=1, Hkv=1, Tq=1, Tk=1, D=2, dtype=torch.float64, seed=54)
    assert torch.equal(attention(q, k, v, causal=True, backend=REF), v)


def test_zero_keys_gives_zeros():
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Tq=2, Tk=0, D=4, seed=55)
    out = attention(q, k, v, backend=REF)
    assert torch.equal(out, torch.zeros_like(q))
