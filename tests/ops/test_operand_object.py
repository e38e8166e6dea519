"""One operand object across the op boundary (issue #10): ``AttentionArgs`` end to end.

The custom op's schema, its fake implementation and autograd, and the C++ kernel's operand list
all derive from (or are checked against) the dataclass's field list.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import headint.ops.fused as fused
from headint.ops import EdgeKnockout, attention, cpu_backend
from headint.ops.arguments import AttentionArgs, prepare

from _ops_helpers import require_backend

TENSORS = ("q", "k", "v", "mask", "q_bits", "k_bits", "head_mask", "head_patch", "score_scale", "sinks")
SCALARS = ("scale", "causal", "window", "softcap")


def _full_args(dtype=torch.float32, seed=0) -> AttentionArgs:
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, T, D = 2, 4, 2, 9, 16
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    return prepare(
        q, k, v, causal=True, window=6, attn_mask=torch.randn(T, T, generator=g).to(dtype),
        knockout=EdgeKnockout(torch.rand(Hq, T, generator=g) < 0.3, torch.rand(T, generator=g) < 0.5),
        head_mask=torch.rand(B, Hq, T, generator=g), head_patch=torch.randn(Hq, D, generator=g).to(dtype),
        score_scale=torch.rand(Hq, generator=g) + 0.5, sinks=torch.randn(Hq, generator=g), softcap=2.5,
    )


def test_field_list_describes_the_operands():
    assert AttentionArgs.operand_names() == TENSORS
    assert AttentionArgs.scalar_names() == SCALARS
    assert AttentionArgs.differentiable_names() == ("q", "k", "v", "head_mask", "head_patch", "score_scale", "sinks")
    assert AttentionArgs.optional_operand_names() == TENSORS[3:]
    assert AttentionArgs.optional_names() == TENSORS[3:] + ("window", "softcap")
    assert [f.name for f in dataclasses.fields(AttentionArgs)] == list(TENSORS + SCALARS)


def test_flatten_unflatten_roundtrip():
    a = _full_args()
    a.head_patch = None  # an absent operand in the middle of the list
    tensors, present, scalars = a.flatten()
    assert present == [True] * 7 + [False, True, True] and len(tensors) == 9
    b = AttentionArgs.unflatten(tensors, present, scalars)
    for name in TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or x is y, name
    assert b.scalars() == [a.scale, True, 6, 2.5]
    with pytest.raises(ValueError, match="present"):
        AttentionArgs.unflatten(tensors[:-1], present, scalars)


def test_custom_op_schema_is_derived_from_the_fields():
    for op, lead in ((torch.ops.headint.attention_fwd, []), (torch.ops.headint.attention_bwd, ["dout", "attn", "lse"])):
        args = op.default._schema.arguments
        assert [a.name for a in args] == lead + ["operands", "present", *SCALARS, "backend"]
        types = {a.name: str(a.type) for a in args}
        assert types["operands"] == "List[Tensor]" and types["present"] == "List[bool]"
        assert types["scale"] == "float" and types["causal"] == "bool" and types["window"] == "Optional[int]"
        assert types["softcap"] == "Optional[float]"


def test_fused_module_names_no_optional_operand():
    """Adding an operand needs no edit in fused.py: it never names one (only q, for the output shape)."""
    source = Path(fused.__file__).read_text()
    code = re.sub(r'"""[\s\S]*?"""', "", source)  # docstrings may explain
    code = "\n".join(line.split("#")[0] for line in code.splitlines())
    for name in AttentionArgs.optional_names() + ("k", "v", "scale", "causal"):
        assert not re.search(rf"\b{name}\b", code.replace("a.q", "")), f"fused.py names operand {name!r}"


def _cpu_kernel():
    require_backend("cpu")
    cpu_backend.build()


def test_cpu_kernel_operand_order_matches_the_fields():
    """The C++ kernel's `enum Operand` (reported by operand_names) and its scalar parameters are
    in the dataclass's field order: this fails if either side drifts."""
    _cpu_kernel()
    assert cpu_backend.kernel_operand_names() == AttentionArgs.operand_names()
    assert cpu_backend.kernel_scalar_names() == AttentionArgs.scalar_names()
    assert cpu_backend.operand_order_mismatch() is None
    source = (cpu_backend.source_dir() / "attention_cpu.cpp").read_text()
    enum = re.search(r"enum Operand : int \{([^}]*)\}", source).group(1)
    assert [e.strip().lower() for e in enum.split(",")][:-1] == list(TENSORS)


def test_drift_between_kernel_and_fields_is_detected(monkeypatch):
    _cpu_kernel()
    swapped = list(AttentionArgs.operand_names())
    swapped[6], swapped[8] = swapped[8], swapped[6]
    monkeypatch.setattr(AttentionArgs, "operand_names", classmethod(lambda cls: tuple(swapped)))
    assert "head_mask" in (cpu_backend.operand_order_mismatch() or "")
    monkeypatch.undo()
    monkeypatch.setattr(AttentionArgs, "scalar_names", classmethod(lambda cls: ("scale", "window", "causal")))
    assert "scalars" in (cpu_backend.operand_order_mismatch() or "")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_custom_op_passes_opcheck(backend):
    """Schema, fake tensors, autograd registration and AOT dispatch of the generated op."""
    require_backend(backend)
    a = _full_args()
    tensors, present, scalars = a.flatten()
    tensors = [t.detach().clone().requires_grad_(t.is_floating_point()) if t.dtype != torch.bool else t for t in tensors]
    result = torch.library.opcheck(torch.ops.headint.attention_fwd, (tensors, present, *scalars, backend))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradients_of_every_differentiable_operand(backend):
    """The generic autograd returns a gradient for each differentiable operand, in its dtype and
    (broadcast) shape, equal to the reference's."""
    require_backend(backend)
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, T, D = 2, 4, 2, 9, 16
    leaves = dict(
        q=torch.randn(B, Hq, T, D, generator=g), k=torch.randn(B, Hkv, T, D, generator=g),
        v=torch.randn(B, Hkv, T, D, generator=g), head_mask=torch.rand(Hq, generator=g),
        head_patch=torch.randn(Hq, T, D, generator=g), score_scale=torch.rand(B, Hq, generator=g) + 0.5,
        sinks=torch.randn(Hq, generator=g),
    )
    dout = torch.randn(B, Hq, T, D, generator=g)
    grads = {}
    for be in (backend, "reference"):
        xs = {n: x.clone().requires_grad_(True) for n, x in leaves.items()}
        out = attention(xs["q"], xs["k"], xs["v"], causal=True, head_mask=xs["head_mask"],
                        head_patch=xs["head_patch"], score_scale=xs["score_scale"], sinks=xs["sinks"],
                        softcap=3.0, backend=be)
        grads[be] = dict(zip(xs, torch.autograd.grad(out, list(xs.values()), dout)))
    for n, x in leaves.items():
        got, ref = grads[backend][n], grads["reference"][n]
        assert got.shape == x.shape and got.dtype == x.dtype, n
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4, msg=lambda m, n=n: f"d{n}: {m}")


def test_cpu_fp64_interventions_get_fp64_gradients():
    """fp64 calls carry fp64 head masks / score scales: the kernel writes their gradients in fp64."""
    _cpu_kernel()
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g, dtype=torch.float64) for _ in range(3))
    hm = torch.rand(2, generator=g, dtype=torch.float64).requires_grad_(True)
    ss = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    out = attention(q, k, v, head_mask=hm, score_scale=ss, backend="cpu")
    ghm, gss = torch.autograd.grad(out.sum(), [hm, ss])
    assert ghm.dtype == gss.dtype == torch.float64
    rhm, rss = torch.autograd.grad(attention(q, k, v, head_mask=hm, score_scale=ss, backend="reference").sum(), [hm, ss])
    torch.testing.assert_close(ghm, rhm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gss, rss, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(1, 2, 3, 0), (2, 1, 1, 0)])
def test_head_dim_zero_is_a_clear_error(shape):
    q = torch.zeros(shape)
    kv = torch.zeros(shape[0], shape[1], 4, 0)
    with pytest.raises(ValueError, match=re.escape(f"q has shape {list(shape)}") + r".*head dim"):
        attention(q, kv, kv)
    with pytest.raises(ValueError, match=re.escape(f"q has shape {list(shape)}")):
        attention(q, kv, kv, scale=1.0, backend="reference")
