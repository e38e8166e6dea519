"""The Triton launchers' own outputs (beyond ``headint.attention``'s): the log-sum-exp, the
pre-blend head output the backward needs, the full-shape intervention gradients, and the
dtype error. Conformance of the Triton backend with the reference is in tests/backends/."""

from __future__ import annotations

import pytest
import torch

from attention_cases import Case, make_inputs
from headint.ops import attention
from headint.ops.arguments import prepare
from headint.ops.reference import reference_attention


def _prepared(case: Case):
    kw = make_inputs(case)
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    return prepare(q, k, v, **kw)


def _forward(launch, a):
    return launch.attention_forward(a)


def test_poison_is_on(poisoned_outputs):
    assert poisoned_outputs.POISON_OUTPUTS
    assert torch.isnan(poisoned_outputs._alloc((2, 3), torch.float32, torch.device("cpu"))).all()


def test_fully_removed_rows_are_zero_and_lse_is_neg_inf(poisoned_outputs):
    B, H, Tq, Tk = 2, 2, 20, 18
    # Tq > Tk, causal: the first 2 rows see nothing; "rows" knocks out a few more
    a = _prepared(Case("lse", B, H, H, Tq, Tk, 32, knockout=("rows",), causal=True))
    out, lse, attn = _forward(poisoned_outputs, a)
    ref, ref_lse = reference_attention(a, return_lse=True)
    assert attn is None
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    removed = torch.isinf(ref_lse)
    assert removed[:, :, :2].all() and removed.sum() > B * H * 2
    assert (out[removed] == 0).all()
    assert torch.equal(torch.isinf(lse), removed) and (lse[removed] < 0).all()
    torch.testing.assert_close(lse[~removed], ref_lse[~removed], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attn_output_is_pre_blend(poisoned_outputs):
    a = _prepared(Case("attn", 1, 2, 2, 19, 23, 16, head_mask="bhq", head_mask_values="unit", head_patch="bhqd"))
    out, lse, attn = _forward(poisoned_outputs, a)
    plain = prepare(a.q, a.k, a.v)
    torch.testing.assert_close(attn, reference_attention(plain), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, reference_attention(a), atol=1e-5, rtol=1e-5)


def test_launcher_backward_outputs_full_shapes(poisoned_outputs):
    """The launcher returns dhead_mask [B,H,Tq] and dscore_scale [B,H] at full shape, all written."""
    B, H, Hkv, Tq, Tk, D = 2, 4, 2, 19, 23, 16
    a = _prepared(Case("full", B, H, Hkv, Tq, Tk, D, head_mask="h", head_mask_values="unit", head_patch="hd",
                       score_scale="h", knockout=("pair",), causal=True))
    L = poisoned_outputs
    out, lse, attn = _forward(L, a)
    dout = torch.randn(B, H, Tq, D, generator=torch.Generator().manual_seed(29))
    g = L.attention_backward(a, dout, attn, lse)
    dq, dk, dv, dhm, dss = g["q"], g["k"], g["v"], g["head_mask"], g["score_scale"]
    assert dq.shape == a.q.shape and dk.shape == a.k.shape and dv.shape == a.v.shape
    assert dhm.shape == (B, H, Tq) and dss.shape == (B, H)
    for t in (dq, dk, dv, dhm, dss):
        assert torch.isfinite(t).all()
    # dhead_mask is sum_d dout * (attn - patch)
    torch.testing.assert_close(dhm, (dout * (attn - a.head_patch)).sum(-1), atol=1e-5, rtol=1e-5)


def test_fp64_is_rejected_with_a_clear_error():
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        attention(q, q, q, backend="triton")
