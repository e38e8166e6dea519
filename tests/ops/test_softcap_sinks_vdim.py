"""Logit soft-capping, attention sinks and a value head dim != the query/key one (issue #11).

The conformance suite (``tests/backends``) checks every backend against the float64 reference on
many cases with these operands. Here: the reference against independent oracles (the eager
attention functions of ``transformers``' Gemma 2, gpt-oss and DeepSeek-V3), float64 gradchecks of
the reference, the semantics of the edge cases (rows with no key, ``-inf`` / NaN sinks, saturated
soft-caps), every kernel with its outputs poisoned, the Triton ``tanh``, and the argument errors.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from headint.ops import BackendUnavailable, EdgeKnockout, attention, backends, cpu_backend, last_backend
from headint.ops.arguments import prepare
from headint.ops.fused import fused_forward
from headint.ops.reference import reference_attention, reference_probs

from _ops_helpers import require_backend

KERNELS = ("cpu", "triton")
ALL = ("reference", "cpu", "triton")


def _qkv(B=2, Hq=4, Hkv=2, Tq=7, Tk=9, D=24, Dv=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Tq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Tk, Dv, generator=g, dtype=dtype))


def _run(backend, *args, **kw):
    if backend != "reference":
        require_backend(backend)
    out = attention(*args, backend=backend, **kw)
    assert last_backend() == backend
    return out


# ---------------------------------------------------------------------------------------------
# the reference against transformers' own eager attention functions
# ---------------------------------------------------------------------------------------------

#: Gemma 2's and DeepSeek-V3's eager attention take the softmax in float32 even for float64 inputs
FP32_SOFTMAX_ATOL = 1e-6


def _causal_additive(Tq, Tk, dtype=torch.float64):
    keep = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    return torch.zeros(Tq, Tk, dtype=dtype).masked_fill(~keep, float("-inf"))


def test_softcap_matches_gemma2_eager():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v = _qkv(D=16, Dv=16, dtype=torch.float64)
    module = SimpleNamespace(num_key_value_groups=2, training=False, head_dim=16)
    mask = _causal_additive(7, 9)[None, None]
    for cap in (0.7, 5.0, 50.0):
        want, _ = eager_attention_forward(module, q * 3, k, v, mask, scaling=0.25, softcap=cap)
        got = attention(q * 3, k, v, causal=True, scale=0.25, softcap=cap, backend="reference")
        torch.testing.assert_close(got.transpose(1, 2), want, atol=FP32_SOFTMAX_ATOL, rtol=0)


def test_sinks_match_gpt_oss_eager():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v = _qkv(D=16, Dv=16, dtype=torch.float64)
    sinks = torch.tensor([-1.0, 0.5, 3.0, 8.0], dtype=torch.float64)
    module = SimpleNamespace(num_key_value_groups=2, training=False, sinks=sinks)
    mask = _causal_additive(7, 9)[None, None]
    want, _ = eager_attention_forward(module, q, k, v, mask, scaling=0.25)
    got = attention(q, k, v, causal=True, scale=0.25, sinks=sinks, backend="reference")
    torch.testing.assert_close(got.transpose(1, 2), want, atol=1e-12, rtol=1e-12)
    # a row whose every key is removed: gpt-oss puts all of its probability on the sink (output 0)
    mask = mask.expand(2, 4, 7, 9).clone()
    mask[0, 1, 3] = float("-inf")
    want, _ = eager_attention_forward(module, q, k, v, mask, scaling=0.25)
    got = attention(q, k, v, attn_mask=mask, scale=0.25, sinks=sinks, backend="reference")
    torch.testing.assert_close(got.transpose(1, 2), want, atol=1e-12, rtol=1e-12)
    assert (got[0, 1, 3] == 0).all()


def test_value_head_dim_matches_deepseek_v3_eager():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import eager_attention_forward

    q, k, v = _qkv(D=24, Dv=12, dtype=torch.float64)
    module = SimpleNamespace(num_key_value_groups=2, training=False)
    want, _ = eager_attention_forward(module, q, k, v, _causal_additive(7, 9)[None, None], scaling=0.3)
    got = attention(q, k, v, causal=True, scale=0.3, backend="reference")
    assert got.shape == (2, 4, 7, 12)
    torch.testing.assert_close(got.transpose(1, 2), want, atol=FP32_SOFTMAX_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# gradients of the reference (float64 gradcheck), with the other operands
# ---------------------------------------------------------------------------------------------

def _gradcheck_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Tq, Tk, D, Dv = 2, 4, 2, 5, 6, 8, 4
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    return dict(q=t(B, Hq, Tq, D), k=t(B, Hkv, Tk, D), v=t(B, Hkv, Tk, Dv)), g


@pytest.mark.parametrize("variant", ["softcap", "sinks", "both+everything"])
def test_reference_gradcheck(variant):
    x, g = _gradcheck_inputs({"softcap": 1, "sinks": 2, "both+everything": 3}[variant])
    B, Hq, Tq, Tk = 2, 4, 5, 6
    kw: dict = {"causal": True}
    if variant in ("softcap", "both+everything"):
        kw["softcap"] = 0.8  # strongly capped: tanh' far from 1
        x["q"] = (x["q"].detach() * 3).requires_grad_(True)
    if variant in ("sinks", "both+everything"):
        x["sinks"] = torch.randn(B, Hq, generator=g, dtype=torch.float64).requires_grad_(True)
    if variant == "both+everything":
        x["head_mask"] = torch.rand(B, Hq, Tq, generator=g, dtype=torch.float64).requires_grad_(True)
        x["head_patch"] = torch.randn(Hq, 4, generator=g, dtype=torch.float64).requires_grad_(True)
        x["score_scale"] = (torch.rand(Hq, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
        mask = torch.randn(Tq, Tk, generator=g, dtype=torch.float64)
        mask[2, :] = float("-inf")  # a row with no key (sink only)
        kw.update(attn_mask=mask, window=4,
                  knockout=EdgeKnockout(torch.rand(Hq, Tq, generator=g) < 0.5, torch.rand(Tk, generator=g) < 0.4))
    names = list(x)

    def f(*tensors):
        return attention(**dict(zip(names, tensors)), backend="reference", **kw)

    assert torch.autograd.gradcheck(f, tuple(x.values()), atol=1e-7, rtol=1e-5)


def test_sink_gradient_is_minus_sum_of_sink_probability_times_delta():
    """dsink[b, h] = -sum_i exp(sink - lse_i) * sum_d dO * O: the formula the kernels use."""
    q, k, v = _qkv(dtype=torch.float64)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = attention(q, k, v, causal=True, sinks=sinks, backend="reference")
    dout = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, sinks, dout)
    _, lse = reference_probs(prepare(q, k, v, causal=True, sinks=sinks.detach()), return_lse=True)
    delta = (dout * out.detach()).sum(-1)
    want = -(torch.exp(sinks.detach()[None, :, None] - lse) * delta).sum(dim=(0, 2))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# semantics of the edge cases, on every backend
# ---------------------------------------------------------------------------------------------

def _lse(backend, **kw):
    a = prepare(**kw)
    if backend == "reference":
        return reference_attention(a, return_lse=True)
    require_backend(backend)
    out, lse, _ = fused_forward(a, backend)
    return out, lse


@pytest.mark.parametrize("backend", ALL)
def test_rows_without_keys_are_zero_and_their_lse_is_the_sink(backend):
    q, k, v = _qkv(D=16, Dv=32)
    sinks = torch.tensor([0.5, -2.0, 3.0, float("-inf")])
    ko = EdgeKnockout(torch.tensor([1, 0, 0, 1, 0, 0, 1], dtype=torch.bool), torch.ones(9, dtype=torch.bool))
    out, lse = _lse(backend, q=q, k=k, v=v, sinks=sinks, knockout=ko)
    dead = torch.tensor([0, 3, 6])
    assert (out[:, :, dead] == 0).all()
    torch.testing.assert_close(lse[:, :, dead], sinks[None, :, None].expand(2, 4, 3))  # -inf sink: lse -inf
    # no keys at all (Tk = 0): the same
    out, lse = _lse(backend, q=q, k=k[:, :, :0], v=v[:, :, :0], sinks=sinks)
    assert out.shape == (2, 4, 7, 32) and (out == 0).all()
    torch.testing.assert_close(lse, sinks[None, :, None].expand(2, 4, 7))


@pytest.mark.parametrize("backend", ALL)
def test_minus_inf_sink_is_no_sink_and_sinks_lower_the_probabilities(backend):
    q, k, v = _qkv()
    plain = _run(backend, q, k, v, causal=True)
    none = _run(backend, q, k, v, causal=True, sinks=torch.full((2, 4), float("-inf")))
    torch.testing.assert_close(none, plain, atol=1e-6, rtol=1e-5)
    # a sink adds exp(sink) to the denominator: every row is the plain output times l / (l + exp(sink))
    sinks = torch.tensor([0.0, 1.0, -1.0, 2.0])
    got = _run(backend, q, k, v, causal=True, sinks=sinks)
    _, lse = _lse("reference", q=q, k=k, v=v, causal=True)
    factor = 1.0 / (1.0 + torch.exp(sinks[None, :, None] - lse))
    torch.testing.assert_close(got, plain * factor[..., None], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_plus_inf_sink_makes_its_heads_rows_nan(backend, bad):
    q, k, v = _qkv()
    sinks = torch.tensor([[0.0, bad, 1.0, -1.0], [0.5, 0.5, 0.5, bad]])
    ko = EdgeKnockout(torch.tensor([0, 0, 1, 0, 0, 0, 0], dtype=torch.bool), torch.ones(9, dtype=torch.bool))
    out = _run(backend, q, k, v, causal=True, sinks=sinks, knockout=ko)
    clean = _run(backend, q, k, v, causal=True, sinks=torch.nan_to_num(sinks, nan=0.0, posinf=0.0), knockout=ko)
    bad_heads = ~torch.isfinite(sinks)  # [B, Hq]
    assert torch.isnan(out[bad_heads]).all()  # every row, also the one without keys
    torch.testing.assert_close(out[~bad_heads], clean[~bad_heads])


@pytest.mark.parametrize("backend", ALL)
def test_a_nan_row_sends_nan_to_its_heads_sink_gradient_only(backend):
    q, k, v = _qkv()
    q_nan = q.clone()
    q_nan[0, 1, 2, 5] = float("nan")
    grads = {}
    for name, qq in (("nan", q_nan), ("clean", q)):
        sinks = torch.randn(2, 4, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        vv = v.clone().requires_grad_(True)
        out = _run(backend, qq, k, vv, causal=True, softcap=2.0, sinks=sinks)
        grads[name] = torch.autograd.grad(out, (sinks, vv), torch.ones_like(out))
    dsink, dv = grads["nan"]
    # query row 2 sits at position 4: it reads keys 0..4 of kv head 0 (query head 1, GQA 2)
    assert torch.isnan(dsink[0, 1]) and torch.isnan(dv[0, 0, :5]).all() and torch.isfinite(dv[0, 0, 5:]).all()
    others = torch.ones(2, 4, dtype=torch.bool)
    others[0, 1] = False
    torch.testing.assert_close(dsink[others], grads["clean"][0][others])
    torch.testing.assert_close(dv[1], grads["clean"][1][1])  # batch row 1 reads nothing of the NaN row


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # interpreted tanh of huge scores
@pytest.mark.parametrize("backend", KERNELS)
def test_saturated_and_gentle_soft_caps(backend):
    """Huge scores saturate at +-cap (no overflow, no NaN); tiny ones stay ~linear (tanh's series
    branch in the Triton kernel); both match the reference."""
    q, k, v = _qkv(D=16, Dv=16)
    for scale_q, cap in ((300.0, 1.0), (1.0, 1e3), (1e-3, 0.05)):
        ref = attention(q.double() * scale_q, k.double(), v.double(), softcap=cap, causal=True, backend="reference")
        got = _run(backend, q * scale_q, k, v, softcap=cap, causal=True)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_poisoned_outputs_are_all_written(backend, monkeypatch):
    """Every output and gradient element is written (outputs start NaN-filled), with each new
    operand alone and all together, forward and backward."""
    require_backend(backend)
    if backend == "triton":
        from headint_kernels import launch as module
    else:
        module = cpu_backend
    monkeypatch.setattr(module, "POISON_OUTPUTS", True)
    g = torch.Generator().manual_seed(7)
    for kw in ({"softcap": 1.5}, {"sinks": torch.randn(4, generator=g)}, {"Dv": 40},
               {"softcap": 2.0, "sinks": torch.randn(2, 4, generator=g), "Dv": 8, "head_mask": torch.rand(4, generator=g),
                "head_patch": torch.randn(4, 8, generator=g)}):
        kw = dict(kw)
        q, k, v = _qkv(D=16, Dv=kw.pop("Dv", 16), seed=3)
        leaves = {"q": q, "k": k, "v": v, **{n: x for n, x in kw.items() if isinstance(x, torch.Tensor)}}
        results = {}
        for be in (backend, "reference"):
            xs = {n: x.clone().requires_grad_(True) for n, x in leaves.items()}
            out = attention(**xs, **{n: x for n, x in kw.items() if not isinstance(x, torch.Tensor)}, causal=True,
                            backend=be)
            dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            results[be] = (out, *torch.autograd.grad(out, list(xs.values()), dout))
        for name, got, want in zip(["out", *leaves], results[backend], results["reference"]):
            assert torch.isfinite(got).all(), f"{sorted(kw)}: {name} has unwritten (NaN) elements"
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{sorted(kw)} {n}: {m}")


# ---------------------------------------------------------------------------------------------
# the Triton kernels' tanh
# ---------------------------------------------------------------------------------------------

def _tanh_kernel():
    """A one-program Triton kernel storing ``_tanh`` of a 1024-element vector (module-level
    globals: the interpreter re-executes the kernel's source against them)."""
    global triton, tl, _tanh
    import triton
    import triton.language as tl

    from headint_kernels.common import _tanh

    @triton.jit
    def kernel(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, _tanh(tl.load(X + offs)))

    return kernel


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # exp2(+big) = inf, as meant
def test_triton_tanh_is_accurate_everywhere():
    require_backend("triton")
    kernel = _tanh_kernel()
    mags = torch.logspace(-9, 2.5, 500)
    x = torch.cat([mags, -mags, torch.tensor([0.0, 0.2499, 0.25, 0.2501, float("inf"), -float("inf"), float("nan")])])
    x = torch.cat([x, torch.zeros(1024 - x.numel())]).float()
    y = torch.empty_like(x)
    kernel[(1,)](x, y, N=1024)
    want = torch.tanh(x.double())
    finite = torch.isfinite(x)
    rel = ((y.double() - want).abs() / want.abs().clamp_min(1e-30))[finite & (x != 0)]
    assert rel.max() < 4 * torch.finfo(torch.float32).eps, rel.max()
    assert y[x == float("inf")].eq(1).all() and y[x == -float("inf")].eq(-1).all() and torch.isnan(y[torch.isnan(x)]).all()
    assert (y[x == 0] == 0).all()


# ---------------------------------------------------------------------------------------------
# the backend table and the argument errors
# ---------------------------------------------------------------------------------------------

def test_sdpa_declares_softcap_and_sinks_unsupported_and_auto_avoids_it():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(BackendUnavailable, match=r"'sdpa' does not support logit soft-capping \(softcap\)"):
        attention(q, k, v, softcap=2.0, backend="sdpa")
    with pytest.raises(BackendUnavailable, match=r"'sdpa' does not support attention sinks \(sinks\)"):
        attention(q, k, v, sinks=torch.zeros(4), backend="sdpa")
    # fp64 on CPU: auto prefers sdpa for a plain call, the reference for one it cannot run
    attention(q, k, v, backend="auto")
    assert last_backend() == "sdpa"
    for kw in ({"softcap": 2.0}, {"sinks": torch.zeros(4)}):
        out = attention(q, k, v, backend="auto", **kw)
        assert last_backend() == "reference"
        torch.testing.assert_close(out, attention(q, k, v, backend="reference", **kw))
    # a different value head dim is something SDPA computes
    torch.testing.assert_close(attention(q, k, v, causal=True, backend="sdpa"),
                               attention(q, k, v, causal=True, backend="reference"))


def test_triton_refuses_a_value_head_dim_beyond_its_tiles():
    require_backend("triton")
    q, k, v = _qkv(D=16, Dv=288)
    with pytest.raises(BackendUnavailable, match=r"'triton' supports head dims up to 256, got v of shape \[2, 2, 9, 288\]"):
        attention(q, k, v, backend="triton")


@pytest.mark.parametrize("softcap, error, match", [
    (0.0, ValueError, "softcap must be a positive finite float.*got 0.0"),
    (-1.0, ValueError, "softcap must be a positive finite float.*got -1.0"),
    (float("nan"), ValueError, "softcap must be a positive finite float.*got nan"),
    (float("inf"), ValueError, "softcap must be a positive finite float.*got inf"),
    (True, TypeError, "softcap must be a positive float or None, got bool True"),
    ("50", TypeError, "softcap must be a positive float or None, got str '50'"),
    (torch.tensor(2.0), TypeError, "softcap must be a positive float or None, got Tensor"),
])
def test_bad_softcap_is_named(softcap, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        attention(q, k, v, softcap=softcap)


@pytest.mark.parametrize("sinks, error, match", [
    (torch.zeros(3), ValueError, re.escape("sinks has shape [3]; expected one of [Hq] or [B, Hq] with B=2, Hq=4")),
    (torch.zeros(2, 4, 1), ValueError, re.escape("sinks has shape [2, 4, 1]; expected one of [Hq] or [B, Hq]")),
    (torch.zeros(3, 4), ValueError, re.escape("sinks has shape [3, 4]")),
    (torch.zeros(4, dtype=torch.long), TypeError, "sinks must be a floating tensor .* got torch.int64"),
    (torch.zeros(4, dtype=torch.bool), TypeError, "sinks must be a floating tensor .* got torch.bool"),
    (0.5, TypeError, re.escape("sinks must be a torch.Tensor of shape [Hq] or [B, Hq], got float")),
    (torch.zeros(4, device="meta"), ValueError, "sinks is on meta, q on cpu"),
])
def test_bad_sinks_are_named(sinks, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        attention(q, k, v, sinks=sinks)


def test_value_shapes_are_checked():
    q, k, v = _qkv(D=24, Dv=12)
    with pytest.raises(ValueError, match=re.escape("k and v must share [B, Hkv, Tk]") + r".*got k \[2, 2, 9, 24\], v \[2, 2, 8, 12\]"):
        attention(q, k, v[:, :, :8])
    with pytest.raises(ValueError, match=re.escape("v has shape [2, 2, 9, 0]: value head dim Dv = 0")):
        attention(q, k, v[..., :0])
    # head_patch has the value head dim, not the query/key one
    with pytest.raises(ValueError, match=re.escape("head_patch has shape [4, 24]; expected one of [Hq, Dv], [Hq, Tq, Dv] or "
                                                   "[B, Hq, Tq, Dv] with B=2, Hq=4, Tq=7, Dv=12")):
        attention(q, k, v, head_mask=torch.zeros(4), head_patch=torch.zeros(4, 24))
    out = attention(q, k, v, head_mask=torch.zeros(4), head_patch=torch.ones(4, 12), backend="reference")
    assert out.shape == (2, 4, 7, 12) and (out == 1).all()
