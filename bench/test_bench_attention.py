"""What an intervention costs inside the attention operator (pytest-benchmark, forward, no grad).

    pytest bench/test_bench_attention.py --benchmark-only

Shapes: B=8, H=12, D=64, T in (128, 512), causal, fp32. Cases:

- ``none``: no intervention;
- ``headmask``: per-row head masks and patches, ``head_mask [B, H]`` (each row zeroes a different
  head, like a scan) with ``head_patch [B, H, T, D]``;
- ``knockout``: a compact :class:`headint.EdgeKnockout`, random query selector x key selector per
  ``(b, h)``.

Implementations: every backend in ``headint.available_backends("cpu")`` (``headint.attention``;
a backend that refuses a case, e.g. ``sdpa`` with knockouts, is skipped), against
``torch_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the intervention done
the way a user would without headint (blend applied to its output; a dense ``[B, H, T, T]`` bool
mask built from the knockout selectors, built inside the timed call).

Every benchmark first checks its output against ``backend="reference"`` on the same inputs.
Groups are per (T, case), so ``--benchmark-group-by=group`` tables compare implementations, and
the ``torch_sdpa`` ``none`` case is the no-intervention floor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import headint

B, H, D = 8, 12, 64
TS = (128, 512)
CASES = ("none", "headmask", "knockout")
IMPLS = tuple(headint.available_backends("cpu")) + ("torch_sdpa",)


def make_inputs(T: int, case: str, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    kw = {}
    if case == "headmask":
        m = torch.ones(B, H)
        m[torch.arange(B), torch.arange(B) % H] = 0.0  # row b ablates head b: one variant per row
        kw["head_mask"] = m
        kw["head_patch"] = torch.randn(B, H, T, D, generator=g)
    elif case == "knockout":
        qs = torch.rand(B, H, T, generator=g) < 0.5
        ks = torch.rand(B, H, T, generator=g) < 0.1
        ks[..., 0] = False  # every query keeps key 0: no fully removed row (SDPA would give NaN)
        kw["knockout"] = headint.EdgeKnockout(qs, ks)
    return q, k, v, kw


def torch_sdpa(q, k, v, kw):
    """The same function with plain PyTorch: what a user writes without headint."""
    if "knockout" in kw:
        ko = kw["knockout"]
        T = q.shape[2]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        keep = causal & ~(ko.queries[..., :, None] & ko.keys[..., None, :])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if "head_mask" in kw:
        m = kw["head_mask"][:, :, None, None]
        out = m * out + (1 - m) * kw["head_patch"]
    return out


def make_fn(impl: str, q, k, v, kw):
    if impl == "torch_sdpa":
        return lambda: torch_sdpa(q, k, v, kw)
    return lambda: headint.attention(q, k, v, causal=True, backend=impl, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T", TS, ids=lambda t: f"T{t}")
def test_attention(benchmark, check, T, case, impl):
    q, k, v, kw = make_inputs(T, case)
    fn = make_fn(impl, q, k, v, kw)
    with torch.no_grad():
        try:
            out = fn()
        except headint.BackendUnavailable as e:
            pytest.skip(f"{impl}: {e}")
        expected = headint.attention(q, k, v, causal=True, backend="reference", **kw)
    check(out, expected, f"{impl} vs reference (T={T}, {case})")
    benchmark.group = f"attention B{B} H{H} T{T} D{D} | {case}"
    benchmark.extra_info.update(B=B, H=H, T=T, D=D, case=case, impl=impl, threads=torch.get_num_threads())
    with torch.no_grad():
        benchmark(fn)
