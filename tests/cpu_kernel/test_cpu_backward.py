"""Backward pass of the native CPU kernel: grads of q, k, v, head_mask, head_patch, score_scale
against the reference's autograd."""

from __future__ import annotations

import pytest
import torch

from headint.ops import EdgeKnockout

from _cpu_helpers import check_backward, qkv, rand, randn, run

SHAPES = [
    # B, Hq, Hkv, Tq, Tk, D
    (1, 2, 2, 1, 1, 16),
    (2, 4, 2, 37, 53, 64),
    (1, 4, 1, 65, 130, 80),
    (2, 2, 2, 130, 64, 16),
    (1, 8, 2, 1, 200, 64),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_plain(shape, causal):
    check_backward(*qkv(*shape, seed=sum(shape)), causal=causal)


@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("D", [16, 64, 80])
def test_gqa_head_dims_score_scale(gqa, D):
    q, k, v = qkv(2, 4, 4 // gqa, 70, 75, D, seed=gqa * 10 + D)
    check_backward(q, k, v, causal=True, score_scale=rand(2, 4, seed=5) * 2 - 0.5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Tq,Tk,window", [(100, 100, 7), (70, 150, 33), (1, 90, 10), (150, 80, 65)])
def test_window(causal, Tq, Tk, window):
    q, k, v = qkv(1, 2, 1, Tq, Tk, 16, seed=Tq + window)
    check_backward(q, k, v, causal=causal, window=window)


def test_masks_broadcast():
    B, H, T = 2, 4, 75
    q, k, v = qkv(B, H, 2, T, T, 64, seed=11)
    check_backward(q, k, v, attn_mask=rand(B, 1, 1, T, seed=1) < 0.7, causal=True)
    check_backward(q, k, v, attn_mask=rand(1, H, T, T, seed=2) < 0.6)
    check_backward(q, k, v, attn_mask=randn(T, seed=3) * 3, causal=True)
    check_backward(q, k, v, attn_mask=randn(B, 1, T, T, seed=4).half())


def test_knockouts():
    B, H, T = 2, 4, 97
    q, k, v = qkv(B, H, 2, T, T, 64, seed=31)
    many = [
        EdgeKnockout(rand(B, H, T, seed=3) < 0.3, rand(B, H, T, seed=4) < 0.3),
        EdgeKnockout(rand(B, 1, T, seed=5) < 0.5, rand(T, seed=6) < 0.2),
    ]
    check_backward(q, k, v, knockout=many, causal=True)
    check_backward(q, k, v, knockout=many[0], window=30)


@pytest.mark.parametrize("hm_shape", [(4,), (2, 4), (2, 4, 67)])
@pytest.mark.parametrize("patch_shape", [None, (4, 64), (2, 4, 67, 64)])
def test_head_mask_and_patch(hm_shape, patch_shape):
    q, k, v = qkv(2, 4, 2, 67, 67, 64, seed=51)
    head_mask = rand(*hm_shape, seed=9) * 1.5 - 0.25
    patch = None if patch_shape is None else randn(*patch_shape, seed=10)
    check_backward(q, k, v, head_mask=head_mask, head_patch=patch, causal=True)


def test_everything_together():
    B, Hq, Hkv, Tq, Tk, D = 2, 8, 2, 66, 129, 80
    q, k, v = qkv(B, Hq, Hkv, Tq, Tk, D, seed=121)
    check_backward(
        q, k, v, causal=True, window=100,
        attn_mask=randn(B, 1, Tq, Tk, seed=1),
        knockout=[EdgeKnockout(rand(B, Hq, Tq, seed=2) < 0.2, rand(Tk, seed=3) < 0.5)],
        head_mask=rand(B, Hq, Tq, seed=5), head_patch=randn(B, Hq, Tq, D, seed=6),
        score_scale=rand(B, Hq, seed=7) * 2,
    )


def test_fully_removed_rows_have_zero_grads():
    B, H, T, D = 2, 2, 70, 16
    q, k, v = qkv(B, H, H, T, T, D, seed=81)
    dead = torch.zeros(T, dtype=torch.bool)
    dead[[0, 5, 64, 69]] = True
    ko = EdgeKnockout(dead, torch.ones(T, dtype=torch.bool))
    out, g = check_backward(q, k, v, knockout=ko, causal=True, head_mask=rand(H, seed=1), score_scale=rand(H, seed=2))
    assert torch.equal(g["q"][:, :, dead], torch.zeros_like(g["q"][:, :, dead]))
    # keys only the dead rows could see get no gradient: key 69 is seen only by query 69 (causal)
    assert torch.equal(g["k"][:, :, 69], torch.zeros_like(g["k"][:, :, 69]))
    assert torch.equal(g["v"][:, :, 69], torch.zeros_like(g["v"][:, :, 69]))
    # everything removed: all grads zero (but head_mask still gets dout * (0 - patch))
    ko_all = EdgeKnockout(torch.ones(T, dtype=torch.bool), torch.ones(T, dtype=torch.bool))
    _, g = check_backward(q, k, v, knockout=ko_all, head_mask=rand(B, H, seed=3), head_patch=randn(H, D, seed=4))
    for n in ("q", "k", "v"):
        assert torch.equal(g[n], torch.zeros_like(g[n])), n
    # causal with more queries than keys
    q2, k2, v2 = qkv(1, 2, 2, 90, 30, 16, seed=82)
    _, g = check_backward(q2, k2, v2, causal=True)
    assert torch.equal(g["q"][:, :, :60], torch.zeros_like(g["q"][:, :, :60]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    B, H, T = 2, 4, 83
    q, k, v = qkv(B, H, 2, T, T + 9, 64, dtype=dtype, seed=101)
    check_backward(q, k, v, causal=True)
    check_backward(
        q, k, v,
        knockout=EdgeKnockout(rand(T, seed=1) < 0.5, rand(T + 9, seed=2) < 0.5),
        head_mask=rand(B, H, T, seed=3), head_patch=randn(H, 64, seed=4),
        score_scale=rand(H, seed=5) + 0.5, attn_mask=rand(1, 1, T, T + 9, seed=6) < 0.9,
    )


def test_gradcheck_fp64_shapes_small():
    """Directional check of the kernel's own gradients (finite differences in fp64 inputs,
    fp32 compute: loose tolerance) - independent of the reference's autograd."""
    q, k, v = qkv(1, 2, 1, 9, 11, 16, dtype=torch.float64, seed=131)
    q.requires_grad_(True)
    out = run("cpu", q, k, v, causal=True, score_scale=torch.tensor([0.7, 1.3]))
    dout = randn(*out.shape, seed=2, dtype=torch.float64)
    (gq,) = torch.autograd.grad(out, q, dout)
    dirn = randn(*q.shape, seed=3, dtype=torch.float64)
    eps = 1e-2
    with torch.no_grad():
        f = lambda x: (run("cpu", x, k, v, causal=True, score_scale=torch.tensor([0.7, 1.3])) * dout).sum()
        fd = (f(q + eps * dirn) - f(q - eps * dirn)) / (2 * eps)
    assert abs(fd.item() - (gq * dirn).sum().item()) < 1e-3 * max(1.0, abs(fd.item()))
