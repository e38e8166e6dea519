"""``torch.compile`` over ``headint.ops.attention(..., backend="triton")`` (CPU tensors, interpreter).

The fused op is a ``torch.library`` custom op with a fake implementation and registered autograd,
so dynamo traces it as one opaque node; Inductor compiles the graph around it (CPU C++ codegen)
and the op runs the interpreted Triton kernels. ``aot_eager`` (no code generation) is checked too.

Notes: the backend is loaded once eagerly before compiling (``backends.resolve``): dynamo cannot
trace the first-use import of the backend module. The graph is not ``fullgraph``: backend
resolution (a logging call in ``headint.ops.backends.resolve``) breaks the graph there.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from headint.ops import attention, backends

from attention_cases import gen


def _inputs(seed):
    g = gen(seed)
    q = torch.randn(2, 4, 17, 16, generator=g)
    k = torch.randn(2, 2, 20, 16, generator=g)
    v = torch.randn(2, 2, 20, 16, generator=g)
    m = torch.rand(2, 4, 17, generator=g)
    return q, k, v, m


@pytest.mark.parametrize("compile_backend", ["inductor", "aot_eager"])
def test_torch_compile_forward_backward(compile_backend):
    if compile_backend == "inductor" and shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("inductor on CPU needs a C++ compiler")
    torch._dynamo.reset()
    backends.resolve("triton", torch.device("cpu"))  # load the backend eagerly (see module docstring)
    fn = torch.compile(
        lambda q, k, v, m: attention(q, k, v, head_mask=m, causal=True, backend="triton"),
        backend=compile_backend,
    )
    q, k, v, m = _inputs(40)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, m)]
    out = fn(*leaves)
    assert backends.last_backend() == "triton"
    go = torch.randn(out.shape, generator=gen(41))
    out.backward(go)

    ref_leaves = [x.double().requires_grad_(True) for x in (q, k, v, m)]
    ref = attention(*ref_leaves[:3], head_mask=ref_leaves[3], causal=True, backend="reference")
    ref.backward(go.double())
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=1e-5)
    for name, a, b in zip("qkvm", leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=1e-5, msg=lambda s: f"d{name}: {s}")
