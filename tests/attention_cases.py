"""One case format for every attention backend test: :class:`Case`, its inputs, and the checks.

A :class:`Case` names a shape (``B, Hq, Hkv, Tq, Tk, D``, and ``Dv`` when the value head dim
differs), a dtype and the features of one ``headint.attention`` call (causality, window, masks,
knockouts, head mask / patch, score scale, soft-capping, sinks, memory layout) in a few short
strings. :func:`make_inputs` turns it into fresh random
keyword arguments for ``headint.attention`` (seeded per case, at user-level shapes).
:func:`compare` runs a backend on them and checks its output (and gradients) against the
``"reference"`` backend run in float64, the ground truth:

- float32 inputs: ``|got - ref64| <= 1e-5 |ref64| + 1e-6 sqrt(numel)`` (Frobenius norms);
- float16 / bfloat16 inputs: ``|got - ref64| <= 2 |ref_lowp - ref64| + eps |ref64|``: at most
  twice as wrong as the reference computed in the same input dtype, plus ``eps`` = the dtype's
  machine epsilon for outputs, ``min(4 eps, LOWP_GRAD_EPS)`` for gradients.

Vocabulary of the feature strings (dims strings use ``b``=B, ``h``=Hq, ``q``=Tq, ``k``=Tk,
``d``=D (``Dv`` in ``head_patch``), ``1``=a broadcast dim of size 1):

- ``mask``: ``"<kind>:<dims>"``, kind ``bool`` (True = keep, ~70 % kept), ``add`` (additive,
  N(0, 2) with ~10 % ``-inf``), ``addf`` (additive, finite), ``pad`` (bool key padding: batch
  row ``b`` drops its last ``3 b mod Tk`` keys, key 0 always kept), ``lens`` (bool key padding
  with lengths ``Tk, Tk // 2, 1, ...``), ``addpad`` (``lens`` as an additive 0 / -inf mask),
  ``holes`` (bool, all kept except query row ``Tq // 3`` of the last leading index, which keeps
  nothing), ``addholes`` (the same as an additive 0 / -inf mask).
- ``knockout``: a tuple of names, their union: ``pair`` (two compact knockouts with
  broadcast selectors), ``perhead`` (selectors ``[B,Hq,Tq]`` / ``[B,Hq,Tk]``), ``bcast``
  (``[B,1,Tq]`` / ``[Tk]``), ``one`` (``[Tq]`` / ``[Tk]``), ``key0`` (no query sees key 0),
  ``every3rd`` (every query loses keys 0, 3, 6, ...), ``rows`` (a few query rows lose every key), ``deadrows`` (rows 0, 5, Tq-6, Tq-1 of every
  head lose every key), ``all`` (every edge removed), ``dense`` (a dense bool
  ``[B,Hq,Tq,Tk]`` knockout tensor; alone).
- ``head_mask``: dims ``h`` / ``bh`` / ``bhq`` / ``bhq1``; ``head_mask_values``: ``unit``
  (U[0,1)), ``wide`` (U[-0.25,1.25)), ``zero``, ``one``, ``quarter`` (0.25), ``scalar`` (0.3
  expanded from a 0-dim tensor: stride 0 everywhere).
- ``head_patch``: dims ``hd`` / ``hqd`` / ``bhqd`` (``d`` is the value head dim). ``score_scale``:
  dims ``h`` (U[0,2)) or ``bh`` (U[-0.5,1.5) with one exact 0).
- ``softcap``: a float (the logit soft-cap) or None. ``sinks``: dims ``h`` (N(0, 1)), ``bh``
  (N(0, 2) with one ``-inf``: no sink in that row of heads), or ``big`` (``[Hq]``, 4 + N(0, 1):
  sinks that dominate the softmax).
- ``Dv``: the value head dim (None: ``D``); v is ``[B, Hkv, Tk, Dv]`` and so are the outputs.
- ``layout``: ``bhtd`` (contiguous) or ``bthd`` (q, k, v are transposed views of
  ``[B, T, H, D]`` storage, like Hugging Face projections).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass

import pytest
import torch

import headint
from headint.ops import EdgeKnockout, attention, backends
from headint.ops.arguments import prepare

FP32_RTOL = 1e-5
FP32_ATOL = 1e-6  # per element, in the norm: sqrt(numel) * FP32_ATOL
LOWP_FACTOR = 2.0
LOWP_GRAD_EPS = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

GRAD_NAMES = ("q", "k", "v", "head_mask", "head_patch", "score_scale", "sinks")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Case:
    """One ``headint.attention`` call: a shape, a dtype and its features (see module docstring)."""

    name: str
    B: int
    Hq: int
    Hkv: int
    Tq: int
    Tk: int
    D: int
    dtype: torch.dtype = torch.float32
    causal: bool = False
    window: int | None = None
    scale: float | None = None
    mask: str | None = None
    mask_dtype: torch.dtype = torch.float32
    knockout: tuple[str, ...] = ()
    head_mask: str | None = None
    head_mask_values: str = "wide"
    head_patch: str | None = None
    score_scale: str | None = None
    softcap: float | None = None
    sinks: str | None = None
    Dv: int | None = None
    layout: str = "bhtd"
    seed: int | None = None

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.B, self.Hq, self.Hkv, self.Tq, self.Tk, self.D)

    @property
    def value_dim(self) -> int:
        """The value head dim (``Dv``, or ``D`` when not set)."""
        return self.D if self.Dv is None else self.Dv

    @property
    def rng_seed(self) -> int:
        return self.seed if self.seed is not None else zlib.crc32(self.name.encode())

    def but(self, **changes) -> "Case":
        """A copy with some fields changed (the name gets the changes appended)."""
        tag = ",".join(f"{k}={_short(v)}" for k, v in changes.items())
        return dataclasses.replace(self, name=f"{self.name}[{tag}]", **changes)

    def __str__(self) -> str:
        return self.name


def _short(v) -> str:
    return str(v).replace("torch.", "")


def ids(cases) -> list[str]:
    return [c.name for c in cases]


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sizes(case: Case, dims: str, value: bool = False) -> tuple[int, ...]:
    """Sizes of a dims string; ``value``: ``d`` is the value head dim."""
    full = {"b": case.B, "h": case.Hq, "q": case.Tq, "k": case.Tk, "d": case.value_dim if value else case.D, "1": 1}
    try:
        return tuple(full[c] for c in dims)
    except KeyError:
        raise ValueError(f"case {case.name}: bad dims string {dims!r} (letters b, h, q, k, d, 1)") from None


def _lengths_keep(case: Case) -> torch.Tensor:
    """``[B, 1, 1, Tk]`` bool key padding: row 0 keeps every key, row 1 half of them, later rows one."""
    lengths = torch.tensor([case.Tk if b == 0 else (max(1, case.Tk // 2) if b == 1 else 1) for b in range(case.B)])
    return (torch.arange(case.Tk)[None, :] < lengths[:, None])[:, None, None, :]


def _mask(case: Case, g) -> torch.Tensor:
    kind, _, dims = case.mask.partition(":")
    B, Tk = case.B, case.Tk
    if kind == "pad":
        keep = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
        for b in range(B):
            keep[b, ..., Tk - (b * 3) % max(Tk, 1):] = False
        keep[..., 0] = True
        return keep
    if kind == "lens":
        return _lengths_keep(case)
    if kind == "addpad":
        return torch.zeros(B, 1, 1, Tk, dtype=case.mask_dtype).masked_fill(~_lengths_keep(case), float("-inf"))
    size = _sizes(case, dims)
    if kind in ("holes", "addholes"):  # all kept / 0, except one query row of the last batch row that keeps nothing
        keep = torch.ones(size, dtype=torch.bool)
        keep[(-1,) * (len(size) - 2) + (case.Tq // 3,)] = False
        if kind == "holes":
            return keep
        return torch.zeros(size, dtype=case.mask_dtype).masked_fill(~keep, float("-inf"))
    if kind == "bool":
        return torch.rand(size, generator=g) < 0.7
    if kind in ("add", "addf"):
        m = torch.randn(size, generator=g) * 2.0
        if kind == "add":
            m[torch.rand(size, generator=g) < 0.1] = float("-inf")
        return m.to(case.mask_dtype)
    raise ValueError(f"case {case.name}: unknown mask kind {kind!r}")


def _knockouts(case: Case, g):
    B, H, Tq, Tk = case.B, case.Hq, case.Tq, case.Tk
    names = case.knockout
    if "dense" in names:
        if len(names) != 1:
            raise ValueError(f"case {case.name}: a dense knockout cannot be combined with {names}")
        return torch.rand(B, H, Tq, Tk, generator=g) < 0.3
    kos = []
    for n in names:
        if n == "pair":
            kos.append(EdgeKnockout(torch.rand(B, H, Tq, generator=g) < 0.5, torch.rand(B, 1, Tk, generator=g) < 0.4))
            kos.append(EdgeKnockout(torch.rand(1, H, Tq, generator=g) < 0.3, torch.rand(Tk, generator=g) < 0.5))
        elif n == "perhead":
            kos.append(EdgeKnockout(torch.rand(B, H, Tq, generator=g) < 0.3, torch.rand(B, H, Tk, generator=g) < 0.3))
        elif n == "bcast":
            kos.append(EdgeKnockout(torch.rand(B, 1, Tq, generator=g) < 0.5, torch.rand(Tk, generator=g) < 0.2))
        elif n == "one":
            kos.append(EdgeKnockout(torch.rand(Tq, generator=g) < 0.5, torch.rand(Tk, generator=g) < 0.3))
        elif n == "every3rd":
            kos.append(EdgeKnockout(torch.ones(Tq, dtype=torch.bool), torch.arange(Tk) % 3 == 0))
        elif n == "key0":
            kos.append(EdgeKnockout(torch.ones(Tq, dtype=torch.bool), torch.arange(Tk) == 0))
        elif n == "rows":
            rows = torch.zeros(B, H, Tq, dtype=torch.bool)
            rows[0, 0, 0] = True
            rows[-1, -1, Tq // 2] = True
            rows[:, 1 % H, Tq - 1] = True
            kos.append(EdgeKnockout(rows, torch.ones(Tk, dtype=torch.bool)))
        elif n == "deadrows":
            kos.append(EdgeKnockout(dead_rows(Tq), torch.ones(Tk, dtype=torch.bool)))
        elif n == "all":
            kos.append(EdgeKnockout(torch.ones(Tq, dtype=torch.bool), torch.ones(Tk, dtype=torch.bool)))
        else:
            raise ValueError(f"case {case.name}: unknown knockout {n!r}")
    return kos


def dead_rows(Tq: int) -> torch.Tensor:
    """``[Tq]`` bool: the rows the ``deadrows`` knockout removes (0, 5, Tq - 6, Tq - 1)."""
    rows = torch.zeros(Tq, dtype=torch.bool)
    for i in (0, 5, Tq - 6, Tq - 1):
        if 0 <= i < Tq:
            rows[i] = True
    return rows


def _head_mask(case: Case, g) -> torch.Tensor:
    size = _sizes(case, case.head_mask)
    values = case.head_mask_values
    if values == "unit":
        return torch.rand(size, generator=g)
    if values == "wide":
        return torch.rand(size, generator=g) * 1.5 - 0.25
    if values == "zero":
        return torch.zeros(size)
    if values == "one":
        return torch.ones(size)
    if values == "quarter":
        return torch.full(size, 0.25)
    if values == "scalar":  # one value seen through stride-0 dims
        return torch.tensor(0.3).expand(size)
    raise ValueError(f"case {case.name}: unknown head_mask_values {values!r}")


def _score_scale(case: Case, g) -> torch.Tensor:
    if case.score_scale == "h":
        return torch.rand(case.Hq, generator=g) * 2.0
    if case.score_scale == "bh":
        ss = torch.rand(case.B, case.Hq, generator=g) * 2.0 - 0.5
        ss.view(-1)[-1] = 0.0  # a head whose scores are all zero: uniform attention
        return ss
    raise ValueError(f"case {case.name}: unknown score_scale dims {case.score_scale!r}")


def _sinks(case: Case, g) -> torch.Tensor:
    if case.sinks == "h":
        return torch.randn(case.Hq, generator=g)
    if case.sinks == "bh":
        s = torch.randn(case.B, case.Hq, generator=g) * 2.0
        s.view(-1)[0] = float("-inf")  # no sink for this (b, h)
        return s
    if case.sinks == "big":
        return torch.randn(case.Hq, generator=g) + 4.0
    raise ValueError(f"case {case.name}: unknown sinks {case.sinks!r}")


def _qkv(case: Case, g):
    B, Hq, Hkv, Tq, Tk, D = case.shape
    if case.layout == "bhtd":
        make = lambda H, T, d=D: torch.randn(B, H, T, d, generator=g).to(case.dtype)  # noqa: E731
    elif case.layout == "bthd":
        make = lambda H, T, d=D: torch.randn(B, T, H, d, generator=g).to(case.dtype).transpose(1, 2)  # noqa: E731
    else:
        raise ValueError(f"case {case.name}: unknown layout {case.layout!r}")
    return make(Hq, Tq), make(Hkv, Tk), make(Hkv, Tk, case.value_dim)


def make_inputs(case: Case) -> dict:
    """Fresh keyword arguments of ``headint.attention`` for ``case`` (same seed, same values)."""
    g = gen(case.rng_seed)
    q, k, v = _qkv(case, g)
    kw: dict = dict(q=q, k=k, v=v, causal=case.causal, window=case.window)
    if case.scale is not None:
        kw["scale"] = case.scale
    if case.mask is not None:
        kw["attn_mask"] = _mask(case, g)
    if case.knockout:
        kw["knockout"] = _knockouts(case, g)
    if case.head_mask is not None:
        kw["head_mask"] = _head_mask(case, g)
    if case.head_patch is not None:
        kw["head_patch"] = torch.randn(_sizes(case, case.head_patch, value=True), generator=g).to(case.dtype)
    if case.score_scale is not None:
        kw["score_scale"] = _score_scale(case, g)
    if case.softcap is not None:
        kw["softcap"] = case.softcap
    if case.sinks is not None:
        kw["sinks"] = _sinks(case, g)
    return kw


def grad_output(case: Case) -> torch.Tensor:
    """The seeded upstream gradient ``[B, Hq, Tq, Dv]`` (float32) of a case."""
    return torch.randn(case.B, case.Hq, case.Tq, case.value_dim, generator=gen(case.rng_seed + 12345))


# ------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------

def backend_names() -> tuple[str, ...]:
    """Every backend the backend table knows (``headint.ops.backends``)."""
    return tuple(n for n in backends.backend_names() if n != "auto")


def backends_under_test() -> list[str]:
    """The backends checked against ``"reference"``: every other name in the table."""
    return [b for b in backend_names() if b != "reference"]


def skip_unless_runs(backend: str, kw: dict) -> None:
    """Skip (with the backend's own reason) when ``backend`` cannot run these arguments."""
    args = prepare(**kw)
    reason = backends.unavailable_reason(backend, kw["q"].device, args)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


# ------------------------------------------------------------------------------------------
# running and checking
# ------------------------------------------------------------------------------------------

def float_inputs(kw: dict) -> list[str]:
    """Names of the differentiable tensors of a call's keyword arguments."""
    return [n for n in GRAD_NAMES if isinstance(kw.get(n), torch.Tensor) and kw[n].is_floating_point()]


def cast_inputs(kw: dict, dtype) -> dict:
    """A copy with every differentiable operand (and a float mask) cast to ``dtype``."""
    out = dict(kw)
    for n in float_inputs(kw):
        out[n] = kw[n].to(dtype)
    m = kw.get("attn_mask")
    if isinstance(m, torch.Tensor) and m.is_floating_point():
        out["attn_mask"] = m.to(dtype)
    return out


def run(kw: dict, backend: str, grad_out: torch.Tensor | None = None, grads: bool = False):
    """Run ``attention``; with ``grads`` backpropagate ``grad_out``.

    Returns ``(out, {name: grad})``; an input the output does not depend on gets zeros.
    Checks that ``backend`` is the one that ran.
    """
    kw = dict(kw)
    leaves = {}
    if grads:
        for n in float_inputs(kw):
            kw[n] = kw[n].detach().clone().requires_grad_(True)
            leaves[n] = kw[n]
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    out = attention(q, k, v, backend=backend, **kw)
    assert headint.last_backend() == backend, f"asked for {backend!r}, {headint.last_backend()!r} ran"
    if not grads:
        return out.detach(), {}
    out.backward(grad_out.to(out.dtype))
    return out.detach(), {n: (t.grad if t.grad is not None else torch.zeros_like(t)) for n, t in leaves.items()}


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).norm().item()


def check(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor | None, dtype,
          grad: bool = False) -> None:
    """``got`` (computed in ``dtype``) against the float64 reference (see module docstring)."""
    assert got is not None, f"{name}: no result"
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten, poisoned element?)"
    scale = ref64.double().norm().item()
    e = err(got, ref64)
    if dtype == torch.float32:
        tol = FP32_RTOL * scale + FP32_ATOL * math.sqrt(ref64.numel())
        assert e <= tol, f"{name}: |got - ref64| = {e:.3e} > {tol:.3e} (|ref64| = {scale:.3e})"
    else:
        e_ref = err(ref_lowp, ref64)
        eps = torch.finfo(dtype).eps
        if grad:
            eps = min(4 * eps, LOWP_GRAD_EPS[dtype])
        tol = LOWP_FACTOR * e_ref + eps * scale
        assert e <= tol, (
            f"{name}: |got - ref64| = {e:.3e} > {tol:.3e} ({LOWP_FACTOR} x |ref_{dtype} - ref64| = {e_ref:.3e}, "
            f"eps {eps:.2e} x |ref64| = {scale:.3e})"
        )


def compare(kw: dict, backend: str, grads: bool = False, grad_out: torch.Tensor | None = None) -> dict:
    """Run ``backend`` and the references on one call and check the output (and gradients).

    Returns ``{"out", "ref", "grads", "grads_ref"}`` for further checks.
    """
    dtype = kw["q"].dtype
    skip_unless_runs(backend, kw)
    if grads and grad_out is None:
        B, H, Tq, _ = kw["q"].shape
        grad_out = torch.randn(B, H, Tq, kw["v"].shape[-1], generator=gen(B * 1000 + Tq))
    out, gr = run(kw, backend, grad_out, grads)
    ref64, gr64 = run(cast_inputs(kw, torch.float64), "reference", grad_out, grads)
    ref_lp, gr_lp = None, {}
    if dtype != torch.float32:
        ref_lp, gr_lp = run(kw, "reference", grad_out, grads)
    assert out.dtype == dtype, f"output dtype {out.dtype} != input dtype {dtype}"
    check("out", out, ref64, ref_lp, dtype)
    for n in gr64:
        check(f"d{n}", gr[n], gr64[n], gr_lp.get(n), dtype, grad=True)
    return {"out": out, "ref": ref64, "grads": gr, "grads_ref": gr64}


def compare_case(case: Case, backend: str, grads: bool = False) -> dict:
    """:func:`compare` on the inputs of a :class:`Case` (with its seeded upstream gradient)."""
    return compare(make_inputs(case), backend, grads=grads, grad_out=grad_output(case) if grads else None)
