"""Exact properties every backend must have, beyond matching the reference within tolerance:
empty rows are exact zeros (and pass no gradient), a head mask of one is bit-exact plain
attention, batch rows are independent, padding never changes a real position's result, calls
are deterministic, and gradients flow to exactly the inputs that ask for them."""

from __future__ import annotations

import pytest
import torch

from attention_cases import (
    Case, backend_names, compare, compare_case, dead_rows, make_inputs, run, skip_unless_runs, backends_under_test,
)
from headint.ops import EdgeKnockout, backends

BACKENDS = backends_under_test()


def zeros_like(x):
    return torch.zeros_like(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_removed_rows_are_exact_zeros(backend):
    c = Case("deadrows", 2, 2, 2, 70, 70, 16, knockout=("deadrows",), causal=True)
    out = compare_case(c, backend)["out"]
    dead = dead_rows(70)
    assert torch.equal(out[:, :, dead], zeros_like(out[:, :, dead]))
    assert (out[:, :, ~dead].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_removed_rows_blend_to_the_patch(backend):
    c = Case("deadrows+patch", 2, 2, 2, 70, 70, 16, knockout=("deadrows",), causal=True, head_mask="h",
             head_mask_values="quarter", head_patch="hqd")
    kw = make_inputs(c)
    out = compare(kw, backend)["out"]
    dead = dead_rows(70)
    patch = kw["head_patch"]
    torch.testing.assert_close(out[:, :, dead], (0.75 * patch[:, dead]).expand(2, 2, int(dead.sum()), 16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["causal_tq>tk", "additive_row", "bool_row", "no_keys"])
def test_rows_without_keys_are_zeros_not_nan(backend, how):
    if how == "causal_tq>tk":  # causal with more queries than keys: the first Tq - Tk rows see nothing
        kw = make_inputs(Case(how, 1, 2, 2, 40, 12, 16, causal=True))
        rows = slice(0, 28)
    elif how == "additive_row":
        kw = make_inputs(Case(how, 2, 2, 2, 30, 30, 16))
        kw["attn_mask"] = torch.zeros(30, 30).index_fill_(0, torch.tensor([3]), float("-inf"))
        rows = slice(3, 4)
    elif how == "bool_row":
        kw = make_inputs(Case(how, 2, 2, 2, 9, 9, 16))
        keep = torch.ones(2, 1, 9, 9, dtype=torch.bool)
        keep[1, 0, 3] = False
        kw["attn_mask"] = keep
        rows = slice(3, 4)
    else:
        kw = make_inputs(Case(how, 2, 2, 2, 5, 0, 16))
        rows = slice(None)
    out = compare(kw, backend)["out"]
    if how == "bool_row":
        out = out[1:]
    assert torch.equal(out[:, :, rows], zeros_like(out[:, :, rows]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_removed_rows_pass_no_gradient(backend):
    c = Case("deadrows-grads", 2, 2, 2, 70, 70, 16, knockout=("deadrows",), causal=True, head_mask="h",
             head_mask_values="unit", score_scale="h")
    res = compare_case(c, backend, grads=True)
    g = res["grads"]
    dead = dead_rows(70)
    assert torch.equal(g["q"][:, :, dead], zeros_like(g["q"][:, :, dead]))
    # key 69 is seen only by query 69 (causal), which is removed: no gradient reaches it
    for n in ("k", "v"):
        assert torch.equal(g[n][:, :, 69], zeros_like(g[n][:, :, 69])), n
    # every edge removed: q, k, v get no gradient, the head mask still gets -sum_d dO * patch
    c = Case("all-grads", 2, 2, 2, 30, 30, 16, knockout=("all",), head_mask="bh", head_mask_values="unit",
             head_patch="hd")
    g = compare_case(c, backend, grads=True)["grads"]
    for n in ("q", "k", "v"):
        assert torch.equal(g[n], zeros_like(g[n])), n
    assert (g["head_mask"] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_hidden_by_causality_pass_no_gradient(backend):
    c = Case("tq>tk", 1, 2, 2, 40, 12, 16, causal=True, score_scale="h")
    g = compare_case(c, backend, grads=True)["grads"]
    assert torch.equal(g["q"][:, :, :28], zeros_like(g["q"][:, :, :28]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_head_mask_gives_zero_qkv_grads(backend):
    c = Case("hm0", 2, 2, 1, 19, 37, 32, head_mask="bh", head_mask_values="zero", head_patch="bhqd", causal=True)
    res = compare_case(c, backend, grads=True)
    assert torch.equal(res["out"], make_inputs(c)["head_patch"])
    for n in ("q", "k", "v"):
        assert torch.equal(res["grads"][n], zeros_like(res["grads"][n])), n
    assert res["grads"]["head_mask"].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mshape", [(4,), (2, 4), (2, 4, 30)])
def test_head_mask_of_one_is_bit_exact_plain(backend, mshape):
    kw = make_inputs(Case("plain", 2, 4, 2, 30, 30, 64, causal=True))
    skip_unless_runs(backend, kw)
    plain, _ = run(kw, backend)
    ones, _ = run({**kw, "head_mask": torch.ones(mshape), "head_patch": torch.randn(4, 64)}, backend)
    assert torch.equal(plain, ones)
    zeros, _ = run({**kw, "head_mask": torch.zeros(mshape)}, backend)
    assert torch.equal(zeros, zeros_like(zeros))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_rows_are_independent(backend):
    """Each batch row carries its own intervention: row b equals a batch-1 call with row b's."""
    c = Case("rows", 3, 2, 2, 21, 21, 16, head_mask="bh", head_patch="bhqd", score_scale="bh", causal=True)
    kw = make_inputs(c)
    sel_q = torch.zeros(3, 1, 21, dtype=torch.bool)
    sel_q[1, 0, 5:] = True
    kw["knockout"] = EdgeKnockout(sel_q, torch.arange(21) < 4)
    skip_unless_runs(backend, kw)
    out, _ = run(kw, backend)
    for b in range(3):
        one = {n: (x[b:b + 1] if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
        one["knockout"] = EdgeKnockout(sel_q[b:b + 1], torch.arange(21) < 4)
        ob, _ = run(one, backend)
        torch.testing.assert_close(out[b:b + 1], ob, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", [{}, {"head_mask": "bh", "head_patch": "hd"}], ids=["plain", "hm+patch"])
def test_left_padding_does_not_change_real_positions(backend, extra):
    """A row left-padded by 5 keys (masked) and 5 queries gives the unpadded row's result on its
    real queries: causal alignment to the end of the keys holds with padding too."""
    c = Case("pad", 1, 4, 2, 17, 17, 32, causal=True, **extra)
    kw = make_inputs(c)
    skip_unless_runs(backend, kw)
    ref, _ = run(kw, backend)
    P = 5
    g = torch.Generator().manual_seed(3)
    padded = dict(kw)
    for n in ("q", "k", "v"):
        x = kw[n]
        padded[n] = torch.cat([torch.randn(x.shape[0], x.shape[1], P, x.shape[3], generator=g) * 100, x], dim=2)
    keep = torch.ones(1, 1, 1, 17 + P, dtype=torch.bool)
    keep[..., :P] = False
    padded["attn_mask"] = keep
    if "head_mask" in extra:
        padded["head_mask"] = kw["head_mask"]
    out, _ = run(padded, backend)
    torch.testing.assert_close(out[:, :, P:], ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_are_deterministic(backend):
    c = Case("det", 1, 4, 1, 21, 18, 80, head_mask="bhq", score_scale="h", causal=True)
    kw = make_inputs(c)
    skip_unless_runs(backend, kw)
    go = torch.randn(1, 4, 21, 80, generator=torch.Generator().manual_seed(3))
    o1, g1 = run(kw, backend, go, grads=True)
    o2, g2 = run(kw, backend, go, grads=True)
    assert torch.equal(o1, o2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_only_through_some_inputs(backend):
    """Inputs not requiring grad (k, score_scale) do not disturb the others' gradients."""
    from headint.ops import attention

    kw = make_inputs(Case("some", 2, 2, 1, 19, 37, 32, head_mask="bh", score_scale="h", causal=True))
    skip_unless_runs(backend, kw)
    q = kw["q"].clone().requires_grad_(True)
    v = kw["v"].clone().requires_grad_(True)
    out = attention(q, kw["k"], v, causal=True, head_mask=kw["head_mask"], score_scale=kw["score_scale"],
                    backend=backend)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(go)
    q2 = kw["q"].double().requires_grad_(True)
    v2 = kw["v"].double().requires_grad_(True)
    ref = attention(q2, kw["k"].double(), v2, causal=True, head_mask=kw["head_mask"],
                    score_scale=kw["score_scale"], backend="reference")
    ref.backward(go.double())
    torch.testing.assert_close(q.grad.double(), q2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.grad.double(), v2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_queries(backend):
    kw = make_inputs(Case("no_queries", 1, 2, 2, 0, 7, 16, score_scale="h"))
    skip_unless_runs(backend, kw)
    out, grads = run(kw, backend, torch.zeros(1, 2, 0, 16), grads=True)
    assert out.shape == (1, 2, 0, 16)
    assert torch.equal(grads["k"], zeros_like(grads["k"]))
    assert torch.equal(grads["score_scale"], zeros_like(grads["score_scale"]))


def test_backends_expected_here_are_available():
    """The suite skips a backend only for its own reasons: here, with a C++ compiler and triton
    installed (interpreted), the kernel backends must load; a broken build fails loudly."""
    import shutil

    cpu = torch.device("cpu")
    assert "reference" in backend_names() and set(BACKENDS) >= {"sdpa", "triton", "cpu"}
    assert backends.unavailable_reason("sdpa", cpu) is None
    if shutil.which("c++") or shutil.which("g++"):
        assert backends.unavailable_reason("cpu", cpu) is None
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    assert backends.unavailable_reason("triton", cpu) is None


def test_every_kernel_backend_is_poisoned(poisoned_outputs):
    """The autouse fixture sets the POISON_OUTPUTS flag of both kernel backends (their own tests
    check that the flag NaN-fills the outputs)."""
    names = {m.__name__ for m in poisoned_outputs}
    assert names == {"headint_kernels.launch", "headint.ops.cpu_backend"}
    assert all(m.POISON_OUTPUTS for m in poisoned_outputs)
