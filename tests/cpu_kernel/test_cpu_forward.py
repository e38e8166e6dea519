"""Forward pass of the native CPU kernel (backend="cpu") against the PyTorch reference."""

from __future__ import annotations

import shutil

import pytest
import torch

from headint.ops import Knockout
from headint.ops.arguments import prepare
from headint.ops.fused import fused_forward

from _cpu_helpers import check_forward, qkv, rand, randn, rel, run


def test_extension_builds(cpu_kernel):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    path = cpu_kernel.build()
    assert path.is_file(), path
    assert cpu_kernel.vector_width() in (4, 8, 16)


def test_poison_outputs_are_nan(cpu_kernel):
    assert cpu_kernel.POISON_OUTPUTS
    assert torch.isnan(cpu_kernel._alloc((3, 2), torch.float32)).all()


# shapes crossing the 64-row / 64-key tile edges, odd lengths, Tq != Tk, decoding (Tq = 1)
SHAPES = [
    # B, Hq, Hkv, Tq, Tk, D
    (1, 2, 2, 1, 1, 16),
    (2, 4, 2, 37, 53, 64),
    (1, 4, 1, 65, 130, 80),
    (2, 2, 2, 130, 64, 16),
    (1, 8, 2, 1, 200, 64),
    (1, 4, 4, 127, 127, 64),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_plain(shape, causal):
    check_forward(*qkv(*shape, seed=sum(shape)), causal=causal)


@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("D", [16, 64, 80])
def test_gqa_head_dims(gqa, D):
    q, k, v = qkv(2, 4, 4 // gqa, 70, 70, D, seed=gqa * 100 + D)
    check_forward(q, k, v, causal=True, score_scale=rand(2, 4, seed=5) * 2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Tq,Tk,window", [(100, 100, 1), (100, 100, 7), (70, 150, 33), (1, 90, 10), (150, 80, 65)])
def test_window(causal, Tq, Tk, window):
    q, k, v = qkv(1, 2, 1, Tq, Tk, 16, seed=Tq + Tk + window)
    check_forward(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("shape", [(2, 1, 1, 75), (1, 4, 75, 75), (2, 4, 1, 75), (75,), (2, 1, 75, 75), (75, 75)])
def test_bool_mask_broadcast(shape):
    q, k, v = qkv(2, 4, 2, 75, 75, 64, seed=11)
    mask = rand(*shape, seed=3) < 0.6
    check_forward(q, k, v, attn_mask=mask)
    check_forward(q, k, v, attn_mask=mask, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 1, 1, 70), (1, 4, 33, 70), (33, 70)])
def test_additive_mask_broadcast(dtype, shape):
    q, k, v = qkv(2, 4, 4, 33, 70, 16, seed=12)
    mask = randn(*shape, seed=4).to(dtype) * 2
    check_forward(q, k, v, attn_mask=mask, causal=True)


def test_padding_mask_and_noncontiguous_qkv():
    B, H, T, D = 3, 4, 90, 64
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv(B, H, H, T, T, D, seed=21))
    assert not q.is_contiguous()
    lengths = torch.tensor([90, 41, 1])
    pad = torch.arange(T)[None, :] < lengths[:, None]  # [B, Tk] True = real token
    check_forward(q, k, v, attn_mask=pad[:, None, None, :], causal=True)
    check_forward(q, k, v, attn_mask=pad[:, None, None, :])
    add = torch.zeros(B, 1, 1, T).masked_fill(~pad[:, None, None, :], float("-inf"))
    check_forward(q, k, v, attn_mask=add)


def test_knockout_compact_and_union():
    B, H, T = 2, 4, 97
    q, k, v = qkv(B, H, 2, T, T, 64, seed=31)
    one = Knockout(rand(T, seed=1) < 0.5, rand(T, seed=2) < 0.3)
    check_forward(q, k, v, knockout=one, causal=True)
    many = [
        Knockout(rand(B, H, T, seed=3) < 0.3, rand(B, H, T, seed=4) < 0.3),
        Knockout(rand(B, 1, T, seed=5) < 0.5, rand(T, seed=6) < 0.2),
        Knockout(torch.ones(T, dtype=torch.bool), torch.arange(T) == 0),  # no query sees key 0
    ]
    check_forward(q, k, v, knockout=many, causal=True)
    check_forward(q, k, v, knockout=many, attn_mask=rand(B, 1, T, T, seed=7) < 0.8, window=40)


def test_dense_knockout():
    q, k, v = qkv(1, 2, 2, 60, 60, 16, seed=41)
    check_forward(q, k, v, knockout=rand(1, 2, 60, 60, seed=8) < 0.4, causal=True)


@pytest.mark.parametrize("hm_shape", [(4,), (2, 4), (2, 4, 67)])
@pytest.mark.parametrize("patch_shape", [None, (4, 64), (4, 67, 64), (2, 4, 67, 64)])
def test_head_mask_and_patch(hm_shape, patch_shape):
    q, k, v = qkv(2, 4, 2, 67, 67, 64, seed=51)
    head_mask = rand(*hm_shape, seed=9) * 1.5 - 0.25
    patch = None if patch_shape is None else randn(*patch_shape, seed=10)
    check_forward(q, k, v, head_mask=head_mask, head_patch=patch, causal=True)


def test_head_mask_of_one_is_exactly_plain():
    q, k, v = qkv(2, 4, 4, 50, 50, 64, seed=61)
    plain = run("cpu", q, k, v, causal=True)
    ones = run("cpu", q, k, v, causal=True, head_mask=torch.ones(4), head_patch=randn(4, 64, seed=1))
    assert torch.equal(plain, ones)
    zeros = run("cpu", q, k, v, causal=True, head_mask=torch.zeros(2, 4))
    assert torch.equal(zeros, torch.zeros_like(zeros))


def test_score_scale():
    q, k, v = qkv(2, 4, 2, 45, 80, 80, seed=71)
    ss = torch.tensor([[0.0, 1.0, 2.5, -1.0], [0.5, 3.0, 1.0, 0.0]])
    check_forward(q, k, v, score_scale=ss)
    check_forward(q, k, v, score_scale=ss[0], causal=True, scale=0.3)


def _fwd_cpu(**kw):
    """Run the fused op directly (to see the lse) on prepared args."""
    return fused_forward(prepare(**kw), "cpu")


def test_fully_removed_rows_are_zero_with_neg_inf_lse():
    B, H, T = 2, 2, 70
    q, k, v = qkv(B, H, H, T, T, 16, seed=81)
    dead = torch.zeros(T, dtype=torch.bool)
    dead[[0, 5, 64, 69]] = True
    ko = Knockout(dead, torch.ones(T, dtype=torch.bool))
    out = check_forward(q, k, v, knockout=ko, causal=True)
    assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
    _, lse, _ = _fwd_cpu(q=q, k=k, v=v, knockout=ko, causal=True)
    assert torch.isneginf(lse[:, :, dead]).all() and torch.isfinite(lse[:, :, ~dead]).all()
    # removed rows blend to the patch
    patch = randn(H, T, 16, seed=3)
    hm = torch.full((H,), 0.25)
    out = check_forward(q, k, v, knockout=ko, causal=True, head_mask=hm, head_patch=patch)
    torch.testing.assert_close(out[:, :, dead], (0.75 * patch[:, dead]).expand(B, H, 4, 16))
    # causal with more queries than keys: the first Tq - Tk rows see nothing
    q2, k2, v2 = qkv(1, 2, 2, 90, 30, 16, seed=82)
    out = check_forward(q2, k2, v2, causal=True)
    assert torch.equal(out[:, :, :60], torch.zeros_like(out[:, :, :60]))
    # an additive mask of -inf on a whole row
    add = torch.zeros(70, 70)
    add[3] = float("-inf")
    out = check_forward(q, k, v, attn_mask=add)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    # no keys at all
    out = run("cpu", q[:, :, :5], k[:, :, :0], v[:, :, :0])
    assert torch.equal(out, torch.zeros_like(out))


def test_lse_matches_reference():
    from headint.ops.reference import reference_attention

    q, k, v = qkv(2, 4, 2, 77, 90, 64, seed=91)
    kw = dict(q=q, k=k, v=v, causal=True, window=50, attn_mask=randn(77, 90, seed=2), score_scale=rand(4, seed=3))
    _, lse, _ = _fwd_cpu(**kw)
    _, ref = reference_attention(prepare(**kw), return_lse=True)
    assert rel(lse, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision(dtype, causal):
    B, H, T = 2, 4, 83
    q, k, v = qkv(B, H, 2, T, T + 9, 64, dtype=dtype, seed=101)
    check_forward(q, k, v, causal=causal)
    check_forward(
        q, k, v, causal=causal,
        knockout=Knockout(rand(T, seed=1) < 0.5, rand(T + 9, seed=2) < 0.5),
        head_mask=rand(B, H, T, seed=3), head_patch=randn(H, 64, seed=4),
        score_scale=rand(H, seed=5) + 0.5, attn_mask=rand(1, 1, T, T + 9, seed=6) < 0.9,
    )


def test_float64_accepted():
    q, k, v = qkv(1, 2, 2, 40, 40, 16, dtype=torch.float64, seed=111)
    kw = dict(causal=True, head_mask=rand(2, seed=1), head_patch=randn(2, 16, seed=2), score_scale=rand(2, seed=3))
    out = run("cpu", q, k, v, **kw)
    ref = run("reference", q, k, v, **kw)
    assert out.dtype == torch.float64 and rel(out, ref) < 1e-5  # computed in fp32


def test_all_interventions_together():
    B, Hq, Hkv, Tq, Tk, D = 2, 8, 2, 66, 129, 80
    q, k, v = qkv(B, Hq, Hkv, Tq, Tk, D, seed=121)
    check_forward(
        q, k, v, causal=True, window=100,
        attn_mask=randn(B, 1, Tq, Tk, seed=1),
        knockout=[
            Knockout(rand(B, Hq, Tq, seed=2) < 0.2, rand(Tk, seed=3) < 0.5),
            Knockout(rand(Tq, seed=4) < 0.1, torch.ones(Tk, dtype=torch.bool)),
        ],
        head_mask=rand(B, Hq, Tq, seed=5), head_patch=randn(B, Hq, Tq, D, seed=6),
        score_scale=rand(B, Hq, seed=7) * 2,
    )


def test_prefer_cpu_kernel_rule(cpu_kernel):
    from headint.ops import backends

    prefer = backends.entry("cpu").prefer
    q, k, v = qkv(1, 2, 2, 8, 8, 16)
    assert prefer(prepare(q, k, v), False)
    assert prefer(prepare(q.half(), k.half(), v.half()), True)
    assert not prefer(prepare(q.double(), k.double(), v.double()), False)
    q1, kl = q[:, :, :1], torch.zeros(1, 2, 4096, 16)
    assert not prefer(prepare(q1, kl, kl), False)  # long decode
    assert prefer(prepare(q1, kl, kl), True)
