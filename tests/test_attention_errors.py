"""Argument validation of ``headint.ops.attention``: bad input raises ValueError / TypeError
whose message names the argument, the shape (or dtype) it got and what was expected."""

from __future__ import annotations

import re

import pytest
import torch

import headint
from headint.ops import EdgeKnockout, attention

B, HQ, HKV, TQ, TK, D = 2, 4, 2, 5, 6, 8


def esc(s: str) -> str:
    return re.escape(s)


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, TQ, D, generator=g)
    k = torch.randn(B, HKV, TK, D, generator=g)
    v = torch.randn(B, HKV, TK, D, generator=g)
    return q, k, v


def T(n, dtype=torch.bool):
    return torch.ones(n, dtype=dtype) if isinstance(n, int) else torch.ones(*n, dtype=dtype)


# ------------------------------------------------------------------------------ q / k / v


@pytest.mark.parametrize("shape", [(HQ, TQ, D), (1, B, HQ, TQ, D), (D,)])
def test_q_wrong_rank(qkv, shape):
    _, k, v = qkv
    with pytest.raises(ValueError, match=r"q has shape " + esc(str(list(shape))) + r".*4 dims \[B, Hq, Tq, D\]"):
        attention(torch.randn(shape), k, v, backend="reference")


def test_k_v_wrong_rank(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"k and v must be 4-dim \[B, Hkv, Tk, D\].*k \[2, 6, 8\]"):
        attention(q, k[0], v[0], backend="reference")


def test_k_v_shape_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"k and v must share \[B, Hkv, Tk\] \(k \[B, Hkv, Tk, D\], v \[B, Hkv, Tk, Dv\]\); "
                                         r"got k \[2, 2, 6, 8\], v \[2, 2, 5, 8\]"):
        attention(q, k, v[:, :, :5], backend="reference")


def test_batch_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"k has batch size 1 \(shape \[1, 2, 6, 8\]\) but q has 2 \(shape \[2, 4, 5, 8\]\)"):
        attention(q, k[:1], v[:1], backend="reference")


def test_head_dim_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"k has head dim 4 \(shape \[2, 2, 6, 4\]\) but q has 8 \(shape \[2, 4, 5, 8\]\)"):
        attention(q, k[..., :4], v[..., :4], backend="reference")


@pytest.mark.parametrize("hkv", [3, 8])
def test_hq_not_multiple_of_hkv(qkv, hkv):
    q, _, _ = qkv
    k = torch.randn(B, hkv, TK, D)
    with pytest.raises(ValueError, match=rf"q heads \(4, shape \[2, 4, 5, 8\]\) must be a multiple of k/v heads \({hkv}, "
                                         rf"shape \[2, {hkv}, 6, 8\]\)"):
        attention(q, k, k.clone(), backend="reference")


def test_zero_kv_heads(qkv):
    q, _, _ = qkv
    k = torch.randn(B, 0, TK, D)
    with pytest.raises(ValueError, match=r"multiple of k/v heads \(0"):
        attention(q, k, k, backend="reference")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_non_float_dtypes(qkv, dtype, which):
    args = dict(zip("qkv", qkv))
    args[which] = args[which].to(dtype)
    with pytest.raises(TypeError, match=rf"{which} must be a floating tensor.*got {esc(str(dtype))}"):
        attention(args["q"], args["k"], args["v"], backend="reference")


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_mixed_dtypes(qkv, which):
    args = dict(zip("qkv", qkv))
    args[which] = args[which].double()
    with pytest.raises(TypeError, match=rf"q, k, v must share a dtype;.*{which} torch.float64"):
        attention(args["q"], args["k"], args["v"], backend="reference")


def test_q_not_a_tensor(qkv):
    _, k, v = qkv
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor of shape \[B, Hq, Tq, D\], got list"):
        attention([[1.0]], k, v, backend="reference")


def test_kv_on_other_device(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"q, k, v must be on one device.*meta"):
        attention(q, k.to("meta"), v.to("meta"), backend="reference")


# ------------------------------------------------------------------------------ head_mask / head_patch


@pytest.mark.parametrize("shape", [(HQ + 1,), (HQ - 1,), (B + 1, HQ), (B, HQ, TQ + 1), (B, HQ, TQ, 2), (3, HQ, TQ, 1)])
def test_head_mask_wrong_shape(qkv, shape):
    with pytest.raises(ValueError, match=r"head_mask has shape " + esc(str(list(shape)))
                       + r"; expected one of \[Hq\], \[B, Hq\], \[B, Hq, Tq\] or \[B, Hq, Tq, 1\].*Hq=4"):
        attention(*qkv, head_mask=torch.ones(shape), backend="reference")


@pytest.mark.parametrize("shape", [(), (B, HQ, TQ, 1, 1)])
def test_head_mask_wrong_rank(qkv, shape):
    with pytest.raises(ValueError, match=r"head_mask has shape " + esc(str(list(shape))) + r"; expected one of \[Hq\]"):
        attention(*qkv, head_mask=torch.ones(shape), backend="reference")


def test_head_mask_error_does_not_misreport_head_dim(qkv):
    with pytest.raises(ValueError) as info:
        attention(*qkv, head_mask=torch.ones(HQ + 1), backend="reference")
    assert "D=1" not in str(info.value)


def test_head_mask_python_number(qkv):
    with pytest.raises(TypeError, match=r"head_mask must be a tensor \(e.g. \[Hq\]\); got a Python number 0.5"):
        attention(*qkv, head_mask=0.5, backend="reference")


def test_head_mask_int_dtype(qkv):
    with pytest.raises(TypeError, match=r"head_mask must be floating or bool, got torch.int64"):
        attention(*qkv, head_mask=torch.ones(HQ, dtype=torch.int64), backend="reference")


@pytest.mark.parametrize("shape", [(HQ, D + 1), (HQ + 1, D), (HQ, TQ + 1, D), (B + 1, HQ, TQ, D), (B, HQ, TQ, 1, D)])
def test_head_patch_wrong_shape(qkv, shape):
    with pytest.raises(ValueError, match=r"head_patch has shape " + esc(str(list(shape)))
                       + r"; expected one of \[Hq, Dv\], \[Hq, Tq, Dv\] or \[B, Hq, Tq, Dv\]"):
        attention(*qkv, head_mask=torch.zeros(HQ), head_patch=torch.zeros(shape), backend="reference")


def test_head_patch_wrong_shape_names_sizes(qkv):
    with pytest.raises(ValueError, match=r"head_patch has shape \[4, 7\].*B=2, Hq=4, Tq=5, Dv=8"):
        attention(*qkv, head_mask=torch.zeros(HQ), head_patch=torch.zeros(HQ, 7), backend="reference")


def test_head_patch_without_head_mask(qkv):
    with pytest.raises(ValueError, match=r"head_patch was given without head_mask"):
        attention(*qkv, head_patch=torch.zeros(HQ, D), backend="reference")


def test_head_patch_int_dtype(qkv):
    with pytest.raises(TypeError, match=r"head_patch must be floating, got torch.int64"):
        attention(*qkv, head_mask=torch.zeros(HQ), head_patch=torch.zeros(HQ, D, dtype=torch.int64),
                  backend="reference")


@pytest.mark.parametrize("arg", ["head_mask", "head_patch"])
def test_interventions_on_other_device(qkv, arg):
    kw = {"head_mask": torch.zeros(HQ), "head_patch": torch.zeros(HQ, D)}
    kw[arg] = kw[arg].to("meta")
    with pytest.raises(ValueError, match=rf"{arg} is on meta, q on cpu"):
        attention(*qkv, backend="reference", **kw)


# ------------------------------------------------------------------------------ score_scale


@pytest.mark.parametrize("shape", [(HQ + 1,), (B + 1, HQ), (B, HQ + 1)])
def test_score_scale_wrong_shape(qkv, shape):
    with pytest.raises(ValueError, match=r"score_scale has shape " + esc(str(list(shape)))
                       + r"; expected one of \[Hq\] or \[B, Hq\] with B=2, Hq=4"):
        attention(*qkv, score_scale=torch.ones(shape), backend="reference")


def test_score_scale_wrong_rank(qkv):
    with pytest.raises(ValueError, match=r"score_scale has shape \[2, 4, 5\]; expected one of \[Hq\] or \[B, Hq\]"):
        attention(*qkv, score_scale=torch.ones(B, HQ, TQ), backend="reference")


def test_score_scale_python_number(qkv):
    with pytest.raises(TypeError, match=r"score_scale must be a tensor"):
        attention(*qkv, score_scale=2.0, backend="reference")


# ------------------------------------------------------------------------------ attn_mask


@pytest.mark.parametrize("shape", [(TQ, TK + 1), (TQ + 1, TK), (3, TQ, TK), (3, HQ, TQ, TK), (TK - 1,)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_attn_mask_does_not_broadcast(qkv, shape, dtype):
    with pytest.raises(ValueError, match=r"attn_mask has shape " + esc(str(list(shape)))
                       + r", which does not broadcast to \[2, 4, 5, 6\] \(\[B, Hq, Tq, Tk\]\)"):
        attention(*qkv, attn_mask=torch.ones(shape, dtype=dtype), backend="reference")


def test_attn_mask_too_many_dims(qkv):
    with pytest.raises(ValueError, match=r"attn_mask has shape \[1, 2, 4, 5, 6\]; expected at most 4 dims "
                                         r"broadcastable to \[2, 4, 5, 6\]"):
        attention(*qkv, attn_mask=torch.ones(1, B, HQ, TQ, TK, dtype=torch.bool), backend="reference")


def test_attn_mask_int_dtype(qkv):
    with pytest.raises(TypeError, match=r"attn_mask must be bool .* or floating .*; got torch.int64"):
        attention(*qkv, attn_mask=torch.ones(TQ, TK, dtype=torch.int64), backend="reference")


def test_attn_mask_on_other_device(qkv):
    with pytest.raises(ValueError, match=r"attn_mask is on meta, q on cpu"):
        attention(*qkv, attn_mask=torch.ones(TQ, TK, dtype=torch.bool, device="meta"), backend="reference")


# ------------------------------------------------------------------------------ knockout


@pytest.mark.parametrize("qshape", [(TQ + 1,), (HQ + 1, TQ), (B + 1, HQ, TQ)])
def test_knockout_queries_do_not_broadcast(qkv, qshape):
    with pytest.raises(ValueError, match=r"EdgeKnockout queries has shape " + esc(str(list(qshape)))
                       + r", which does not broadcast to \[2, 4, 5\]"):
        attention(*qkv, knockout=EdgeKnockout(T(qshape), T(TK)), backend="reference")


@pytest.mark.parametrize("kshape", [(TK + 1,), (TQ,), (3, TK)])
def test_knockout_keys_do_not_broadcast(qkv, kshape):
    with pytest.raises(ValueError, match=r"EdgeKnockout keys has shape " + esc(str(list(kshape)))
                       + r", which does not broadcast to \[2, 4, 6\]"):
        attention(*qkv, knockout=EdgeKnockout(T(TQ), T(kshape)), backend="reference")


def test_knockout_selector_too_many_dims(qkv):
    with pytest.raises(ValueError, match=r"EdgeKnockout queries has shape \[1, 2, 4, 5\]; expected at most 3 dims"):
        attention(*qkv, knockout=EdgeKnockout(T((1, B, HQ, TQ)), T(TK)), backend="reference")


@pytest.mark.parametrize("which", ["queries", "keys"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_knockout_selector_not_bool(qkv, which, dtype):
    sel = {"queries": T(TQ), "keys": T(TK)}
    sel[which] = sel[which].to(dtype)
    with pytest.raises(TypeError, match=rf"EdgeKnockout {which} must have dtype torch.bool, got {esc(str(dtype))}"):
        attention(*qkv, knockout=EdgeKnockout(sel["queries"], sel["keys"]), backend="reference")


@pytest.mark.parametrize("bad", ["ab", 1.5, None, [0, True]])
def test_knockout_selector_not_a_tensor(qkv, bad):
    with pytest.raises(TypeError, match=r"EdgeKnockout queries must be a bool tensor broadcastable to \[2, 4, 5\] "
                                        r"or an int / list of ints .*got " + type(bad).__name__):
        attention(*qkv, knockout=EdgeKnockout(bad, T(TK)), backend="reference")


@pytest.mark.parametrize("which,bad,n", [("queries", [0, 5], 5), ("keys", -1, 6), ("keys", [2, 6], 6)])
def test_knockout_index_out_of_range(qkv, which, bad, n):
    sel = {"queries": T(TQ), "keys": T(TK)}
    sel[which] = bad
    with pytest.raises(ValueError, match=rf"EdgeKnockout {which} indices \[-?\d\] out of range: the call has {n} {which}"):
        attention(*qkv, knockout=EdgeKnockout(sel["queries"], sel["keys"]), backend="reference")


def test_knockout_index_lists_equal_bool_selectors(qkv):
    """An int / list of indices selects those positions along the axis, for every row and head."""
    qsel = torch.zeros(TQ, dtype=torch.bool)
    qsel[[1, 3]] = True
    ksel = torch.zeros(TK, dtype=torch.bool)
    ksel[0] = True
    want = attention(*qkv, knockout=EdgeKnockout(qsel, ksel), backend="reference")
    for queries, keys in [([1, 3], 0), ((3, 1), [0]), (qsel, 0), ([1, 3], ksel)]:
        got = attention(*qkv, knockout=EdgeKnockout(queries, keys), backend="reference")
        assert torch.equal(got, want), (queries, keys)
    assert not torch.equal(want, attention(*qkv, backend="reference"))


def test_too_many_knockouts(qkv):
    kos = [EdgeKnockout(T(TQ), T(TK)) for _ in range(33)]
    with pytest.raises(ValueError, match=r"knockout: at most 32 EdgeKnockout objects per call, got 33"):
        attention(*qkv, knockout=kos, backend="reference")


def test_exactly_32_knockouts_accepted(qkv):
    kos = [EdgeKnockout(T(TQ), T(TK)) for _ in range(32)]
    out = attention(*qkv, knockout=kos, backend="reference")
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8])
def test_dense_knockout_not_bool(qkv, dtype):
    with pytest.raises(TypeError, match=rf"dense knockout must be a bool tensor .*got {esc(str(dtype))}"):
        attention(*qkv, knockout=torch.zeros(TQ, TK, dtype=dtype), backend="reference")


def test_dense_knockout_does_not_broadcast(qkv):
    with pytest.raises(ValueError, match=r"knockout has shape \[5, 5\], which does not broadcast to \[2, 4, 5, 6\]"):
        attention(*qkv, knockout=torch.zeros(TQ, TQ, dtype=torch.bool), backend="reference")


@pytest.mark.parametrize("bad", ["abc", 3, [EdgeKnockout(T(TQ), T(TK)), "x"]])
def test_knockout_wrong_type(qkv, bad):
    with pytest.raises(TypeError, match=r"knockout must be a headint.ops.EdgeKnockout, a list of them, or a bool tensor"):
        attention(*qkv, knockout=bad, backend="reference")


@pytest.mark.parametrize("as_list", [False, True])
def test_model_level_knockout_rejected(qkv, as_list):
    ko = headint.Knockout(queries=[0], keys=[1], layer=0, head=1)
    with pytest.raises(TypeError, match=r"Knockout\(layer=...\), a model-level intervention; pass it to headint.intervene.*EdgeKnockout"):
        attention(*qkv, knockout=[EdgeKnockout(T(TQ), T(TK)), ko] if as_list else ko, backend="reference")


def test_knockout_selectors_on_other_device(qkv):
    with pytest.raises(ValueError, match=r"knockout selectors must be on cpu.*meta"):
        attention(*qkv, knockout=EdgeKnockout(T(TQ).to("meta"), T(TK)), backend="reference")


# ------------------------------------------------------------------------------ window


@pytest.mark.parametrize("window", [0, -1, -5])
def test_window_not_positive(qkv, window):
    with pytest.raises(ValueError, match=rf"window must be a positive int, got {window}"):
        attention(*qkv, window=window, backend="reference")


def test_validation_happens_before_backend_choice(qkv):
    # An invalid argument is reported as such even with an unknown backend name.
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"window must be a positive int"):
        attention(q, k, v, window=0, backend="nope")
