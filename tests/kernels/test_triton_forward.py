"""Forward Triton kernel (interpreted on CPU) against the float64 PyTorch reference.

Shapes are tiny but awkward for the interpreter's 16 x 16 tiles: lengths that are not multiples
of 16, Tq != Tk both ways, decoding (Tq = 1), GQA ratios 1 / 2 / 4, head dims 16 / 32 / 64 / 80 /
96 (and 128 / 256 in a couple of cases: padded to the next power of two where needed).
"""

from __future__ import annotations

import pytest
import torch

from headint.ops import Knockout, attention
from headint.ops.arguments import prepare
from headint.ops.reference import reference_attention

from _triton_helpers import compare, make_case, run

# B, Hq, Hkv, Tq, Tk, D
SHAPES = {
    "tiny": (1, 2, 2, 1, 1, 16),
    "gqa2_odd": (2, 2, 1, 19, 37, 80),
    "gqa4_tq_gt_tk": (1, 4, 1, 33, 17, 32),
    "square": (1, 2, 2, 40, 40, 64),
    "decode": (2, 4, 2, 1, 45, 96),
    "mha_d16": (1, 3, 3, 17, 31, 16),
}


def test_poison_is_on(poisoned_outputs):
    assert poisoned_outputs.POISON_OUTPUTS
    assert torch.isnan(poisoned_outputs._alloc((2, 3), torch.float32, torch.device("cpu"))).all()


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_plain(shape, causal):
    compare(make_case(1, SHAPES[shape], causal=causal), torch.float32)


@pytest.mark.parametrize(
    "shape,features,causal,window",
    [
        ("gqa2_odd", ["hm_bht", "patch_bhtd"], True, None),
        ("gqa2_odd", ["hm_h"], False, None),
        ("gqa4_tq_gt_tk", ["hm_bh", "patch_hd"], True, None),
        ("square", ["hm_bht", "patch_htd"], False, 7),
        ("gqa2_odd", ["ko"], False, None),
        ("gqa2_odd", ["ko", "ko_rows"], True, None),
        ("decode", ["ko", "hm_bh", "patch_hd"], True, None),
        ("gqa2_odd", ["ss_h"], False, None),
        ("gqa4_tq_gt_tk", ["ss_bh"], True, None),
        ("gqa2_odd", ["pad"], False, None),
        ("decode", ["pad"], True, None),
        ("gqa2_odd", ["add"], True, None),
        ("mha_d16", ["add_tt"], False, None),
        ("square", ["boolmask_full"], True, None),
        ("mha_d16", ["dense_ko"], False, None),
        ("square", [], True, 5),
        ("gqa2_odd", [], False, 9),
        ("gqa2_odd", [], True, 1),
        ("square", ["hm_zero"], False, None),
        ("square", ["hm_one", "patch_hd"], True, None),
        ("gqa2_odd", ["ko", "ko_rows", "ss_bh", "add", "hm_bht", "patch_bhtd"], True, 11),
        ("mha_d16", ["pad", "ko", "ss_h", "hm_h", "patch_htd"], False, 6),
    ],
)
def test_features_fp32(shape, features, causal, window):
    compare(make_case(2, SHAPES[shape], features=features, causal=causal, window=window), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape,features,causal",
    [
        ("gqa2_odd", [], True),
        ("square", ["hm_bht", "patch_bhtd", "ko", "ss_h"], False),
        ("decode", ["pad", "hm_bh"], True),
    ],
)
def test_low_precision(dtype, shape, features, causal):
    compare(make_case(3, SHAPES[shape], dtype=dtype, features=features, causal=causal), dtype)


@pytest.mark.parametrize("D", [128, 256])
def test_large_head_dims(D):
    compare(make_case(4, (1, 2, 1, 18, 21, D), features=["hm_bht", "patch_bhtd"], causal=True), torch.float32)


def test_fully_removed_rows_are_zero_and_lse_is_neg_inf(poisoned_outputs):
    B, H, Tq, Tk, D = 2, 2, 20, 18, 32
    kw = make_case(5, (B, H, H, Tq, Tk, D), features=["ko_rows"], causal=True)  # Tq > Tk: first 2 rows see nothing
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    a = prepare(q, k, v, **kw)
    out, lse, attn = poisoned_outputs.attention_forward(a)
    ref, ref_lse = reference_attention(a, return_lse=True)
    assert attn is None
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    removed = torch.isinf(ref_lse)
    assert removed[:, :, :2].all() and removed.sum() > B * H * 2  # causal misalignment + knocked rows
    assert (out[removed] == 0).all()
    assert torch.equal(torch.isinf(lse), removed) and (lse[removed] < 0).all()
    torch.testing.assert_close(lse[~removed], ref_lse[~removed], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attn_output_is_pre_blend(poisoned_outputs):
    kw = make_case(6, (1, 2, 2, 19, 23, 16), features=["hm_bht", "patch_bhtd"])
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    a = prepare(q, k, v, **kw)
    out, lse, attn = poisoned_outputs.attention_forward(a)
    plain = prepare(q, k, v)
    torch.testing.assert_close(attn, reference_attention(plain), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, reference_attention(a), atol=1e-5, rtol=1e-5)


def test_all_keys_padded_row_gives_zeros_not_nan():
    B, H, T, D = 2, 2, 9, 16
    kw = make_case(7, (B, H, H, T, T, D))
    keep = torch.ones(B, 1, T, T, dtype=torch.bool)
    keep[1, 0, 3] = False  # query 3 of batch 1 sees nothing
    kw["attn_mask"] = keep
    out, _ = run(kw, "triton")
    assert not torch.isnan(out).any()
    assert (out[1, :, 3] == 0).all()
    compare(kw, torch.float32)


def test_non_contiguous_and_broadcast_inputs():
    """q/k/v as transposed views ([B, T, H, D] storage), a head mask expanded from one value."""
    g = torch.Generator().manual_seed(8)
    B, H, Hkv, Tq, Tk, D = 2, 4, 2, 18, 26, 32
    q = torch.randn(B, Tq, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, Tk, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, Tk, Hkv, D, generator=g).transpose(1, 2)
    hm = torch.tensor(0.3).expand(B, H)
    kw = dict(q=q, k=k, v=v, causal=True, window=None, head_mask=hm, knockout=Knockout(torch.ones(Tq, dtype=torch.bool),
                                                                                         torch.arange(Tk) % 3 == 0))
    compare(kw, torch.float32, grads=True)


def test_per_row_interventions_differ_by_batch_row():
    """Each batch row carries a different intervention: row b must equal a batch-1 call with row b's."""
    B, H, T, D = 3, 2, 21, 16
    kw = make_case(9, (B, H, H, T, T, D), features=["hm_bh", "patch_bhtd", "ss_bh"], causal=True)
    sel_q = torch.zeros(B, 1, T, dtype=torch.bool)
    sel_q[1, 0, 5:] = True
    kw["knockout"] = Knockout(sel_q, torch.arange(T) < 4)
    out, _ = run(kw, "triton")
    for b in range(B):
        one = {n: (x[b:b + 1] if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
        one["knockout"] = Knockout(sel_q[b:b + 1], torch.arange(T) < 4)
        ob, _ = run(one, "triton")
        torch.testing.assert_close(out[b:b + 1], ob, atol=1e-6, rtol=1e-6)


def test_fp64_is_rejected_with_a_clear_error():
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        attention(q, q, q, backend="triton")


def test_last_backend_is_triton():
    import headint

    kw = make_case(10, SHAPES["tiny"])
    run(kw, "triton")
    assert headint.last_backend() == "triton"


def test_zero_keys_and_zero_queries():
    """Tk = 0: every row is empty (zeros, blended with the patch); Tq = 0: empty output."""
    kw = make_case(11, (2, 2, 1, 5, 0, 16), features=["hm_bh", "patch_hd"])
    compare(kw, torch.float32, grads=True, seed=11)
    kw = make_case(12, (1, 2, 2, 0, 7, 16), features=["ss_h"])
    out, grads = run(kw, "triton", torch.zeros(1, 2, 0, 16), grads=True)
    assert out.shape == (1, 2, 0, 16)
    assert (grads["k"] == 0).all() and (grads["score_scale"] == 0).all()
