"""What is specific to the native CPU kernel (backend="cpu"): its build, its log-sum-exp, float64
inputs, finite-difference gradients and the ``auto`` preference rule. Conformance of the CPU
backend with the reference (forward, backward, whole models) is in tests/backends/."""

from __future__ import annotations

import shutil

import pytest
import torch

from attention_cases import Case, dead_rows, make_inputs
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
