"""Backward Triton kernels (interpreted on CPU) against the float64 reference's autograd.

Gradients of q, k, v, head_mask (every accepted shape: [H], [B,H], [B,H,T]), head_patch and
score_scale, through ``headint.ops.attention(..., backend="triton")`` (the fused custom op's
autograd) versus ``backend="reference"`` in float64.
"""

from __future__ import annotations

import pytest
import torch

from headint.ops import Knockout
from headint.ops.arguments import prepare

from _triton_helpers import compare, make_case, run

# B, Hq, Hkv, Tq, Tk, D
SHAPES = {
    "gqa2_odd": (2, 2, 1, 19, 37, 32),
    "gqa4": (1, 4, 1, 21, 18, 80),
    "square": (1, 2, 2, 33, 33, 64),
    "decode": (2, 4, 2, 1, 29, 16),
    "mha_d96": (1, 2, 2, 17, 26, 96),
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_plain_grads(shape, causal):
    compare(make_case(21, SHAPES[shape], causal=causal), torch.float32, grads=True, seed=21)


@pytest.mark.parametrize(
    "shape,features,causal,window",
    [
        ("gqa2_odd", ["hm_h"], False, None),
        ("gqa2_odd", ["hm_bh", "patch_hd"], True, None),
        ("gqa4", ["hm_bht", "patch_bhtd"], True, None),
        ("square", ["hm_bht", "patch_htd"], False, 6),
        ("gqa2_odd", ["ko"], True, None),
        ("gqa4", ["ko", "ko_rows"], False, None),
        ("gqa2_odd", ["ss_h"], False, None),
        ("gqa4", ["ss_bh"], True, None),
        ("gqa2_odd", ["pad"], False, None),
        ("decode", ["pad", "hm_bh", "patch_hd"], True, None),
        ("square", ["add"], True, None),
        ("mha_d96", ["add_tt", "ss_h"], False, None),
        ("square", [], True, 4),
        ("gqa2_odd", [], False, 8),
        ("square", ["hm_zero", "patch_hd"], True, None),
        ("square", ["hm_one"], False, None),
        ("gqa2_odd", ["ko", "ko_rows", "ss_bh", "add", "hm_bht", "patch_bhtd"], True, 10),
        ("gqa4", ["pad", "ko", "ss_h", "hm_h", "patch_htd"], False, 7),
        ("mha_d96", ["dense_ko", "hm_bh"], True, None),
    ],
)
def test_feature_grads_fp32(shape, features, causal, window):
    compare(make_case(22, SHAPES[shape], features=features, causal=causal, window=window), torch.float32,
            grads=True, seed=22)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape,features,causal",
    [
        ("gqa2_odd", [], True),
        ("gqa4", ["hm_bht", "patch_bhtd", "ko", "ss_h"], False),
    ],
)
def test_low_precision_grads(dtype, shape, features, causal):
    compare(make_case(23, SHAPES[shape], dtype=dtype, features=features, causal=causal), dtype, grads=True, seed=23)


@pytest.mark.slow
@pytest.mark.parametrize("D", [128, 256])
def test_large_head_dim_grads(D):
    compare(make_case(24, (1, 2, 1, 18, 21, D), features=["hm_bht", "patch_bhtd", "ss_h"], causal=True),
            torch.float32, grads=True, seed=24)


def test_head_dim_256_grads():
    compare(make_case(24, (1, 2, 1, 9, 13, 256), features=["hm_bh", "ko"], causal=True), torch.float32,
            grads=True, seed=24)


def test_fully_knocked_out_rows_have_zero_grads():
    B, H, T, D = 2, 2, 20, 16
    kw = make_case(25, (B, H, H, T, T, D), features=["hm_bht", "patch_bhtd", "ss_bh"], causal=False)
    rows = torch.zeros(B, H, T, dtype=torch.bool)
    rows[0, 1, 3] = True
    rows[1, 0, 17] = True
    kw["knockout"] = Knockout(rows, torch.ones(T, dtype=torch.bool))
    res = compare(kw, torch.float32, grads=True, seed=25)
    g = res["grads"]
    for n, t in g.items():
        assert not torch.isnan(t).any(), n
    assert (g["q"][0, 1, 3] == 0).all() and (g["q"][1, 0, 17] == 0).all()
    # a removed row's attn is 0, so its head-mask gradient is -sum_d dO * patch (compared above): nonzero
    assert g["head_mask"][0, 1, 3] != 0


def test_fully_removed_by_causality_gives_zero_grads():
    """Tq > Tk with causal alignment to the end of the keys: the first Tq - Tk queries see nothing."""
    kw = make_case(26, (1, 2, 1, 24, 19, 32), features=["ss_h"], causal=True)
    res = compare(kw, torch.float32, grads=True, seed=26)
    assert (res["grads"]["q"][:, :, :5] == 0).all()


def test_all_zero_head_mask_gives_zero_qkv_grads():
    kw = make_case(27, SHAPES["gqa2_odd"], features=["hm_zero", "patch_bhtd"], causal=True)
    res = compare(kw, torch.float32, grads=True, seed=27)
    for n in ("q", "k", "v"):
        assert (res["grads"][n] == 0).all(), n
    assert res["grads"]["head_mask"].abs().sum() > 0


def test_grads_only_through_some_inputs():
    """Inputs not requiring grad (k, score_scale) still give correct grads for the others."""
    kw = make_case(28, SHAPES["gqa2_odd"], features=["hm_bh", "ss_h"], causal=True)
    g = torch.Generator().manual_seed(1)
    q = kw["q"].clone().requires_grad_(True)
    v = kw["v"].clone().requires_grad_(True)
    from headint.ops import attention

    out = attention(q, kw["k"], v, causal=True, head_mask=kw["head_mask"], score_scale=kw["score_scale"],
                    backend="triton")
    go = torch.randn(out.shape, generator=g)
    out.backward(go)
    q2 = kw["q"].double().requires_grad_(True)
    v2 = kw["v"].double().requires_grad_(True)
    ref = attention(q2, kw["k"].double(), v2, causal=True, head_mask=kw["head_mask"],
                    score_scale=kw["score_scale"], backend="reference")
    ref.backward(go.double())
    torch.testing.assert_close(q.grad.double(), q2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.grad.double(), v2.grad, atol=1e-5, rtol=1e-5)


def test_launcher_backward_outputs_full_shapes(poisoned_outputs):
    """The launcher returns dhead_mask [B,H,Tq] and dscore_scale [B,H] at full shape, all written."""
    B, H, Hkv, Tq, Tk, D = 2, 4, 2, 19, 23, 16
    kw = make_case(29, (B, H, Hkv, Tq, Tk, D), features=["hm_h", "patch_hd", "ss_h", "ko"], causal=True)
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    a = prepare(q, k, v, **kw)
    L = poisoned_outputs
    out, lse, attn = L.attention_forward(a)
    dout = torch.randn(B, H, Tq, D)
    g = L.attention_backward(a, dout, attn, lse)
    dq, dk, dv, dhm, dss = g["q"], g["k"], g["v"], g["head_mask"], g["score_scale"]
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dhm.shape == (B, H, Tq) and dss.shape == (B, H)
    for t in (dq, dk, dv, dhm, dss):
        assert torch.isfinite(t).all()
    # dhead_mask is sum_d dout * (attn - patch)
    torch.testing.assert_close(dhm, (dout * (attn - a.head_patch)).sum(-1), atol=1e-5, rtol=1e-5)


def test_repeated_calls_are_deterministic():
    kw = make_case(30, SHAPES["gqa4"], features=["hm_bht", "ss_h"], causal=True)
    go = torch.randn(kw["q"].shape, generator=torch.Generator().manual_seed(3))
    _, g1 = run(kw, "triton", go, grads=True)
    _, g2 = run(kw, "triton", go, grads=True)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n
