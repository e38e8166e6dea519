"""What is specific to the native CPU kernel (backend="cpu"): its build, its log-sum-exp, float64
inputs, finite-difference gradients and the ``auto`` preference rule. Conformance of the CPU
backend with the reference (forward, backward, whole models) is in tests/backends/."""

from __future__ import annotations

import shutil

import pytest
import torch

from attention_cases import Case, compare, dead_rows, make_inputs
from headint.ops import attention
from headint.ops.arguments import prepare
from headint.ops.fused import fused_forward
from headint.ops.reference import reference_attention


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, seed=0):
    kw = make_inputs(Case("qkv", B, Hq, Hkv, Tq, Tk, D, dtype=dtype, seed=seed))
    return kw["q"], kw["k"], kw["v"]


def test_extension_builds(cpu_kernel):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    path = cpu_kernel.build()
    assert path.is_file(), path
    assert cpu_kernel.vector_width() in (4, 8, 16)


def test_poison_outputs_are_nan(cpu_kernel):
    assert cpu_kernel.POISON_OUTPUTS
    assert torch.isnan(cpu_kernel._alloc((3, 2), torch.float32)).all()


def _fwd_cpu(**kw):
    """Run the fused op directly (to see the lse) on prepared args."""
    return fused_forward(prepare(**kw), "cpu")


def test_removed_rows_have_neg_inf_lse():
    kw = make_inputs(Case("dead", 2, 2, 2, 70, 70, 16, knockout=("deadrows",), causal=True))
    dead = dead_rows(70)
    out, lse, _ = _fwd_cpu(**kw)
    assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
    assert torch.isneginf(lse[:, :, dead]).all() and torch.isfinite(lse[:, :, ~dead]).all()


def test_lse_matches_reference():
    q, k, v = qkv(2, 4, 2, 77, 90, 64, seed=91)
    g = torch.Generator().manual_seed(2)
    kw = dict(q=q, k=k, v=v, causal=True, window=50, attn_mask=torch.randn(77, 90, generator=g),
              score_scale=torch.rand(4, generator=g))
    _, lse, _ = _fwd_cpu(**kw)
    _, ref = reference_attention(prepare(**kw), return_lse=True)
    assert rel(lse, ref) < 1e-5


def test_float64_accepted():
    q, k, v = qkv(1, 2, 2, 40, 40, 16, dtype=torch.float64, seed=111)
    g = torch.Generator().manual_seed(1)
    kw = dict(causal=True, head_mask=torch.rand(2, generator=g), head_patch=torch.randn(2, 16, generator=g),
              score_scale=torch.rand(2, generator=g))
    out = attention(q, k, v, backend="cpu", **kw)
    ref = attention(q, k, v, backend="reference", **kw)
    assert out.dtype == torch.float64 and rel(out, ref) < 1e-5  # computed in fp32


def test_gradcheck_fp64_shapes_small():
    """Directional check of the kernel's own gradients (finite differences in fp64 inputs,
    fp32 compute: loose tolerance) - independent of the reference's autograd."""
    q, k, v = qkv(1, 2, 1, 9, 11, 16, dtype=torch.float64, seed=131)
    q.requires_grad_(True)
    ss = torch.tensor([0.7, 1.3])
    out = attention(q, k, v, causal=True, score_scale=ss, backend="cpu")
    g = torch.Generator().manual_seed(2)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (gq,) = torch.autograd.grad(out, q, dout)
    dirn = torch.randn(q.shape, generator=g, dtype=torch.float64)
    eps = 1e-2
    with torch.no_grad():
        f = lambda x: (attention(x, k, v, causal=True, score_scale=ss, backend="cpu") * dout).sum()  # noqa: E731
        fd = (f(q + eps * dirn) - f(q - eps * dirn)) / (2 * eps)
    assert abs(fd.item() - (gq * dirn).sum().item()) < 1e-3 * max(1.0, abs(fd.item()))


def test_prefer_cpu_kernel_rule(cpu_kernel, monkeypatch):
    """fp32/fp16/bf16, never fp64; decoding too; calls SDPA can run as measured (here: as the
    HEADINT_AUTO_CPU override says), the others always."""
    from headint.ops import EdgeKnockout, backends

    prefer = backends.entry("cpu").prefer
    q, k, v = qkv(1, 2, 2, 8, 8, 16)
    q1, kl = q[:, :, :1], torch.zeros(1, 2, 4096, 16)
    ko = EdgeKnockout(torch.ones(8, dtype=torch.bool), torch.arange(8) % 2 == 0)
    monkeypatch.setenv("HEADINT_AUTO_CPU", "kernel")
    assert prefer(prepare(q, k, v), False)
    assert prefer(prepare(q.half(), k.half(), v.half()), True)
    assert not prefer(prepare(q.double(), k.double(), v.double()), False)
    assert prefer(prepare(q1, kl, kl), False) and prefer(prepare(q1, kl, kl), True)  # long decode
    monkeypatch.setenv("HEADINT_AUTO_CPU", "sdpa")
    assert not prefer(prepare(q, k, v), False) and not prefer(prepare(q1, kl, kl), True)
    assert prefer(prepare(q, k, v, knockout=ko), False)  # SDPA cannot run it
    assert prefer(prepare(q, k, v, attn_mask=torch.zeros(8, 8)), False)  # nor an additive mask


@pytest.mark.parametrize(
    "case",
    [
        Case("long_causal_gqa", 1, 4, 2, 1100, 1100, 64, causal=True, knockout=("perhead",), head_mask="bhq",
             head_patch="bhqd", score_scale="bh"),
        Case("long_window_end_aligned", 1, 2, 1, 700, 1300, 32, causal=True, window=300, mask="bool:b1qk"),
        Case("long_noncausal_vdim", 1, 2, 2, 900, 1000, 48, Dv=80, knockout=("every3rd",), sinks="h", softcap=20.0),
    ],
    ids=str,
)
def test_long_sequences_match_reference(case):
    """Lengths where the forward takes query tiles of 256-512 (vector lanes trimmed per key
    tile), the backward several key tiles per query tile, and a partial last tile of each."""
    compare(make_inputs(case), "cpu", grads=True)


def test_long_sequence_nan_rows_match_reference():
    """Non-finite inputs far from the first tiles, at a length with several query and key
    tiles: the same NaN rows and NaN gradients as the reference, the same values elsewhere."""
    case = Case("long_nonfinite", 1, 2, 2, 1030, 1030, 64, causal=True, knockout=("deadrows",), layout="bthd")
    kw = make_inputs(case)
    with torch.no_grad():
        kw["q"][0, 1, 700, 3] = float("nan")  # one query row: its output row is NaN
        kw["k"][0, 0, 900, 5] = float("inf")  # one key: every row that keeps it is NaN
        kw["v"][0, 1, 10, 0] = float("nan")  # an early value: almost every row of head 1 is NaN
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(1, 2, 1030, 64, generator=g)
    res = {}
    for backend, dtype in (("cpu", torch.float32), ("reference", torch.float64)):
        leaves = {n: kw[n].detach().to(dtype).requires_grad_(True) for n in ("q", "k", "v")}
        out = attention(**{**kw, **leaves}, backend=backend)
        grads = torch.autograd.grad(out, list(leaves.values()), dout.to(dtype))
        res[backend] = [out.detach()] + list(grads)
    nan_rows = torch.isnan(res["reference"][0]).any(-1)
    assert nan_rows.any() and not nan_rows.all()
    for got, want in zip(res["cpu"], res["reference"]):
        torch.testing.assert_close(got.double(), want, equal_nan=True, rtol=1e-4, atol=1e-5)
