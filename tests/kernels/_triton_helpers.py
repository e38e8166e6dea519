"""Case builders and comparisons for the Triton kernel tests.

A *case* is a dict of keyword arguments for :func:`headint.ops.attention` (tensors at user-level
shapes), built from a seed, a shape and a list of features. Kernel results are compared with the
reference backend run in float64 (the ground truth):

- fp32 inputs: ``||kernel - ref64|| <= 1e-5 * ||ref64||`` (plus a tiny absolute floor),
- fp16 / bf16 inputs: ``err(kernel, ref64) <= C * err(ref_lowp, ref64) + eps``: the kernel may
  be at most a few times as wrong as the reference computed in the same input dtype.
"""

from __future__ import annotations

import math

import torch

from headint.ops import EdgeKnockout, attention

FP32_RTOL = 1e-5
LOWP_FACTOR = 3.0
LOWP_EPS = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

GRAD_NAMES = ("q", "k", "v", "head_mask", "head_patch", "score_scale")


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def rand(g, *shape):
    return torch.rand(*shape, generator=g)


def make_case(seed: int, shape, dtype=torch.float32, features=(), causal=False, window=None) -> dict:
    """Keyword arguments for ``attention`` with the features asked for.

    features: "hm_h", "hm_bh", "hm_bht" (head mask shapes), "patch_hd", "patch_htd", "patch_bhtd",
    "hm_zero", "hm_one", "ko" (compact knockouts, two of them), "ko_rows" (some query rows fully
    knocked out), "ss_h", "ss_bh" (score_scale), "pad" (bool key-padding mask [B,1,1,Tk]),
    "add" (additive float mask [B,Hq,Tq,Tk] with a few -inf), "add_tt" (additive [Tq,Tk]),
    "dense_ko" (dense bool knockout tensor), "boolmask_full" (bool [B,Hq,Tq,Tk]).
    """
    B, H, Hkv, Tq, Tk, D = shape
    g = gen(seed)
    kw: dict = dict(
        q=randn(g, B, H, Tq, D, dtype=dtype),
        k=randn(g, B, Hkv, Tk, D, dtype=dtype),
        v=randn(g, B, Hkv, Tk, D, dtype=dtype),
        causal=causal,
        window=window,
    )
    f = set(features)
    if "hm_h" in f:
        kw["head_mask"] = rand(g, H)
    if "hm_bh" in f:
        kw["head_mask"] = rand(g, B, H) * 1.5 - 0.25  # scaling beyond [0, 1] too
    if "hm_bht" in f:
        kw["head_mask"] = rand(g, B, H, Tq)
    if "hm_zero" in f:
        kw["head_mask"] = torch.zeros(B, H)
    if "hm_one" in f:
        kw["head_mask"] = torch.ones(H)
    if "patch_hd" in f:
        kw["head_patch"] = randn(g, H, D, dtype=dtype)
    if "patch_htd" in f:
        kw["head_patch"] = randn(g, H, Tq, D, dtype=dtype)
    if "patch_bhtd" in f:
        kw["head_patch"] = randn(g, B, H, Tq, D, dtype=dtype)
    kos = []
    if "ko" in f:
        kos.append(EdgeKnockout(rand(g, B, H, Tq) < 0.5, rand(g, B, 1, Tk) < 0.4))
        kos.append(EdgeKnockout(rand(g, 1, H, Tq) < 0.3, rand(g, Tk) < 0.5))
    if "ko_rows" in f:
        rows = torch.zeros(B, H, Tq, dtype=torch.bool)
        rows[0, 0, 0] = True
        rows[-1, -1, Tq // 2] = True
        rows[:, 1 % H, Tq - 1] = True
        kos.append(EdgeKnockout(rows, torch.ones(Tk, dtype=torch.bool)))
    if kos:
        kw["knockout"] = kos
    if "dense_ko" in f:
        kw["knockout"] = rand(g, B, H, Tq, Tk) < 0.3
    if "ss_h" in f:
        kw["score_scale"] = rand(g, H) * 2.0
    if "ss_bh" in f:
        kw["score_scale"] = rand(g, B, H) * 2.0 - 0.5  # negative scales too
    if "pad" in f:
        keep = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
        for b in range(B):
            keep[b, ..., Tk - (b * 3) % max(Tk, 1):] = False  # batch b pads its last (3b mod Tk) keys
        keep[..., 0] = True
        kw["attn_mask"] = keep
    if "boolmask_full" in f:
        kw["attn_mask"] = rand(g, B, H, Tq, Tk) < 0.7
    if "add" in f:
        m = randn(g, B, H, Tq, Tk)
        m[rand(g, B, H, Tq, Tk) < 0.1] = float("-inf")
        kw["attn_mask"] = m
    if "add_tt" in f:
        kw["attn_mask"] = randn(g, Tq, Tk) * 2.0
    return kw


def float_inputs(kw: dict) -> list[str]:
    """Names of the differentiable tensors of a case."""
    return [n for n in GRAD_NAMES if isinstance(kw.get(n), torch.Tensor) and kw[n].is_floating_point()]


def cast_case(kw: dict, dtype) -> dict:
    """A copy of the case with every differentiable operand (and float masks) cast to ``dtype``."""
    out = dict(kw)
    for n in float_inputs(kw):
        out[n] = kw[n].to(dtype)
    m = kw.get("attn_mask")
    if isinstance(m, torch.Tensor) and m.is_floating_point():
        out["attn_mask"] = m.to(dtype)
    return out


def run(kw: dict, backend: str, grad_out: torch.Tensor | None = None, grads: bool = False):
    """Run ``attention``; with ``grads`` also backpropagate ``grad_out`` and return the input grads."""
    kw = dict(kw)
    leaves = {}
    if grads:
        for n in float_inputs(kw):
            kw[n] = kw[n].detach().clone().requires_grad_(True)
            leaves[n] = kw[n]
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    out = attention(q, k, v, backend=backend, **kw)
    if not grads:
        return out.detach(), {}
    out.backward(grad_out.to(out.dtype))
    # an input the output does not depend on (q, k, v when there are no keys) gets None: i.e. zeros
    return out.detach(), {n: (t.grad if t.grad is not None else torch.zeros_like(t)) for n, t in leaves.items()}


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).norm().item()


def check(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor | None, dtype) -> None:
    assert got is not None, f"{name}: no gradient"
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    scale = ref64.double().norm().item()
    e = err(got, ref64)
    if dtype == torch.float32:
        tol = FP32_RTOL * scale + 1e-6 * math.sqrt(ref64.numel())
        assert e <= tol, f"{name}: |kernel - ref64| = {e:.3e} > {tol:.3e} (|ref| = {scale:.3e})"
    else:
        e_ref = err(ref_lowp, ref64)
        tol = LOWP_FACTOR * e_ref + LOWP_EPS[dtype] * scale + 1e-3 * math.sqrt(ref64.numel()) * 1e-2
        assert e <= tol, (
            f"{name}: |kernel - ref64| = {e:.3e} > {tol:.3e} ({LOWP_FACTOR} x |ref_{dtype} - ref64| = {e_ref:.3e}, "
            f"|ref| = {scale:.3e})"
        )


def compare(kw: dict, dtype, grads: bool = False, seed: int = 0) -> dict:
    """Run the Triton backend and the references on a case and check outputs (and gradients)."""
    g = gen(seed + 12345)
    grad_out = None
    if grads:
        B, H, Tq, D = kw["q"].shape
        grad_out = randn(g, B, H, Tq, D)
    out, gr = run(kw, "triton", grad_out, grads)
    ref64, gr64 = run(cast_case(kw, torch.float64), "reference", grad_out, grads)
    ref_lp, gr_lp = (None, {})
    if dtype != torch.float32:
        ref_lp, gr_lp = run(kw, "reference", grad_out, grads)
    assert out.dtype == kw["q"].dtype
    check("out", out, ref64, ref_lp, dtype)
    for n in gr64:
        check(f"d{n}", gr[n], gr64[n], gr_lp.get(n), dtype)
    return {"out": out, "ref": ref64, "grads": gr, "grads_ref": gr64}
