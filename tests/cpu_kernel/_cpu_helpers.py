"""Helpers for the CPU kernel tests: seeded inputs, kernel-vs-reference comparisons."""

from __future__ import annotations

import torch

import headint.ops as hops
from headint.ops import attention

LOWP = (torch.float16, torch.bfloat16)
FP32_TOL = 1e-5  # relative error on norms, fp32


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


def rand(*shape, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen(seed))


def qkv(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, seed=0):
    q = randn(B, Hq, Tq, D, seed=seed, dtype=dtype)
    k = randn(B, Hkv, Tk, D, seed=seed + 1, dtype=dtype)
    v = randn(B, Hkv, Tk, D, seed=seed + 2, dtype=dtype)
    return q, k, v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _cast(kw: dict, dtype) -> dict:
    """Float tensors of the keyword arguments (patch, masks, ...) moved to dtype; others unchanged."""
    out = {}
    for name, x in kw.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point() and name == "head_patch":
            out[name] = x.to(dtype)
        else:
            out[name] = x
    return out


def run(backend, q, k, v, **kw):
    out = attention(q, k, v, backend=backend, **kw)
    assert hops.last_backend() == backend
    return out


def check_forward(q, k, v, **kw):
    """Kernel vs reference: fp32 tight; fp16/bf16 against the reference's own error w.r.t. fp64."""
    out = run("cpu", q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any(), "NaN in the kernel output (unwritten or bad element)"
    if q.dtype in LOWP:
        ref64 = run("reference", q.double(), k.double(), v.double(), **_cast(kw, torch.float64))
        ref_lp = run("reference", q, k, v, **kw)
        err_k, err_r = rel(out, ref64), rel(ref_lp, ref64)
        eps = torch.finfo(q.dtype).eps
        assert err_k <= 2 * err_r + eps, f"kernel error {err_k:.3g} vs low-precision reference error {err_r:.3g}"
    else:
        ref = run("reference", q, k, v, **kw)
        tol = FP32_TOL if q.dtype == torch.float32 else 1e-6
        if ref.norm() == 0:
            assert out.abs().max() == 0
        else:
            assert rel(out, ref) <= tol, f"relative error {rel(out, ref):.3g}"
    return out


GRAD_NAMES = ("q", "k", "v", "head_mask", "head_patch", "score_scale")


def _grads(backend, q, k, v, dout, dtype, kw):
    """Output and gradients w.r.t. q, k, v and the float interventions, computing in `dtype`."""
    leaves = {"q": q, "k": k, "v": v}
    for name in ("head_mask", "head_patch", "score_scale"):
        if kw.get(name) is not None:
            leaves[name] = kw[name]
    leaves = {
        n: (x.detach().to(dtype) if n in ("q", "k", "v", "head_patch") else x.detach().clone()).requires_grad_(True)
        for n, x in leaves.items()
    }
    call_kw = dict(kw)
    for n in ("head_mask", "head_patch", "score_scale"):
        if n in leaves:
            call_kw[n] = leaves[n]
    out = run(backend, leaves["q"], leaves["k"], leaves["v"], **call_kw)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(out.dtype))
    return out, dict(zip(leaves, grads))


def check_backward(q, k, v, seed=123, **kw):
    """Gradients of the kernel vs the reference's autograd (fp32 tight; low precision scaled)."""
    dout = randn(*q.shape, seed=seed)
    out, g = _grads("cpu", q, k, v, dout, q.dtype, kw)
    for n, x in g.items():
        assert not torch.isnan(x).any(), f"NaN in grad {n}"
    if q.dtype in LOWP:
        _, g64 = _grads("reference", q, k, v, dout, torch.float64, kw)
        _, glp = _grads("reference", q, k, v, dout, q.dtype, kw)
        eps = torch.finfo(q.dtype).eps
        for n in g:
            err_k, err_r = rel(g[n], g64[n]), rel(glp[n], g64[n])
            assert err_k <= 2 * err_r + 4 * eps, f"grad {n}: kernel error {err_k:.3g} vs reference error {err_r:.3g}"
    else:
        _, gr = _grads("reference", q, k, v, dout, q.dtype, kw)
        # a gradient that is zero in exact arithmetic (e.g. dq with one key) is rounding noise
        # in both implementations: judge it against the size of the other gradients
        scale = max([gr[n].norm().item() for n in ("q", "k", "v")] + [1.0])
        for n in g:
            if gr[n].norm() <= FP32_TOL * scale:
                assert g[n].norm() <= 2 * FP32_TOL * scale, f"grad {n} should be (nearly) zero"
            else:
                assert rel(g[n], gr[n]) <= 2 * FP32_TOL, f"grad {n}: relative error {rel(g[n], gr[n]):.3g}"
    return out, g
