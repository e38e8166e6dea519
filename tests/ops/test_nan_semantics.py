"""One NaN semantics on every backend (issue #12 item 3), forward and backward.

The rule (``headint.attention``'s docstring): a NaN in anything a row reads - its query, the keys
and values it keeps, ``scale``, its head's ``score_scale``, the additive mask at a kept key, its
head mask - makes that row's output NaN; keys removed by a bool mask, causality, the window or a
knockout are never read, so a NaN there leaks nowhere (no output, no gradient); a row whose every
key is removed is a zero row. Each check compares against the same backend on inputs without the
NaN: what the NaN does not reach must be exactly what it was.
"""

from __future__ import annotations

import pytest
import torch

from headint.ops import EdgeKnockout, attention, last_backend

from _ops_helpers import BACKENDS, require_backend

B, HQ, HKV, T, D = 2, 4, 2, 7, 16
NAN = float("nan")


def qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, T, D, generator=g)
    k = torch.randn(B, HKV, T, D, generator=g)
    v = torch.randn(B, HKV, T, D, generator=g)
    return q, k, v


def run(backend: str, q, k, v, **kw) -> torch.Tensor:
    require_backend(backend)
    out = attention(q, k, v, backend=backend, **kw)
    assert last_backend() == backend
    return out


def check_rows(out: torch.Tensor, clean: torch.Tensor, nan_rows: torch.Tensor) -> None:
    """Rows ``nan_rows`` ([B, Hq, Tq] bool) are entirely NaN; every other row equals ``clean``."""
    assert nan_rows.any(), "the case must make some row NaN"
    assert torch.isnan(out[nan_rows]).all(), f"rows that read a NaN must be NaN: {out[nan_rows]}"
    keep = ~nan_rows
    assert torch.isfinite(out[keep]).all(), "a NaN leaked into a row that does not read it"
    torch.testing.assert_close(out[keep], clean[keep])


def skip_unsupported(backend: str, **needs) -> None:
    if backend == "sdpa" and (needs.get("knockout") or needs.get("score_scale") or needs.get("additive")):
        pytest.skip("backend 'sdpa' does not take compact knockouts, score scales or additive masks")


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_query_row_is_nan_and_empty_rows_stay_zero(backend):
    q, k, v = qkv(1)
    keep = torch.ones(B, HQ, T, T, dtype=torch.bool)
    keep[1, 2, 4] = False  # row (1, 2, 4) has no key: a zero row even with a NaN query
    qn = q.clone()
    qn[0, 1, 3, 5] = NAN
    qn[1, 2, 4] = NAN
    out = run(backend, qn, k, v, attn_mask=keep)
    clean = run(backend, torch.nan_to_num(qn, nan=0.0), k, v, attn_mask=keep)
    nan_rows = torch.zeros(B, HQ, T, dtype=torch.bool)
    nan_rows[0, 1, 3] = True
    check_rows(out, clean, nan_rows)
    assert torch.equal(out[1, 2, 4], torch.zeros(D))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["k_nan", "k_inf", "v_nan", "v_inf"])
@pytest.mark.parametrize("structure", ["causal", "window"])
def test_non_finite_key_is_read_only_by_the_rows_that_keep_it(backend, what, structure):
    q, k, v = qkv(2)
    j = 4
    kn, vn = k.clone(), v.clone()
    target, value = {"k_nan": (kn, NAN), "k_inf": (kn, float("inf")), "v_nan": (vn, NAN), "v_inf": (vn, float("-inf"))}[what]
    target[0, 0, j, 7] = value
    kw = dict(causal=True) if structure == "causal" else dict(causal=True, window=2)
    out = run(backend, q, kn, vn, **kw)
    clean = run(backend, q, k, v, **kw)
    nan_rows = torch.zeros(B, HQ, T, dtype=torch.bool)
    readers = torch.arange(T) >= j if structure == "causal" else (torch.arange(T) >= j) & (torch.arange(T) - j < 2)
    nan_rows[0, 0:2] = readers  # query heads 0 and 1 read kv head 0 (grouped-query attention)
    check_rows(out, clean, nan_rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("removal", ["bool_mask", "knockout", "dense_knockout", "additive"])
def test_nan_at_removed_keys_does_not_leak(backend, removal):
    q, k, v = qkv(3)
    j = 2
    kn, vn = k.clone(), v.clone()
    kn[:, :, j, 0] = NAN
    vn[:, :, j, 1] = NAN
    kw: dict = dict(causal=True)
    if removal == "bool_mask":
        keep = torch.ones(B, 1, T, T, dtype=torch.bool)
        keep[..., j] = False
        kw["attn_mask"] = keep
    elif removal == "knockout":
        skip_unsupported(backend, knockout=True)
        kw["knockout"] = EdgeKnockout(torch.ones(T, dtype=torch.bool), torch.arange(T) == j)
    elif removal == "dense_knockout":
        removed = torch.zeros(T, T, dtype=torch.bool)
        removed[:, j] = True
        kw["knockout"] = removed
    else:  # an additive -inf column, and NaN additive entries where causality removes the key
        skip_unsupported(backend, additive=True)
        add = torch.randn(T, T, generator=torch.Generator().manual_seed(4))
        add[:, j] = float("-inf")
        add = add.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), NAN)
        kw["attn_mask"] = add
    out = run(backend, q, kn, vn, **kw)
    if removal == "additive":
        kw["attn_mask"] = torch.nan_to_num(kw["attn_mask"], nan=0.0, neginf=float("-inf"))
    clean = run(backend, q, k, v, **kw)
    assert torch.isfinite(out[:, :, j:]).all() and torch.isfinite(out).all(), "a NaN at a removed key leaked"
    torch.testing.assert_close(out, clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_scale_makes_every_reading_row_nan(backend):
    q, k, v = qkv(5)
    keep = torch.ones(B, 1, T, T, dtype=torch.bool)
    keep[1, 0, 6] = False  # an empty row stays zero: it reads nothing, not even the scale
    out = run(backend, q, k, v, attn_mask=keep, scale=NAN)
    nan_rows = keep.any(-1).expand(B, HQ, T)
    assert torch.isnan(out[nan_rows]).all()
    assert torch.equal(out[~nan_rows], torch.zeros_like(out[~nan_rows]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["score_scale", "additive"])
def test_nan_in_per_head_and_per_row_operands(backend, source):
    """score_scale NaN for one head, or an additive NaN at one kept entry: exactly the rows
    reading it are NaN (an additive NaN at a causally removed entry is not read)."""
    q, k, v = qkv(6)
    kw: dict = dict(causal=True)
    clean_kw: dict = dict(causal=True)
    nan_rows = torch.zeros(B, HQ, T, dtype=torch.bool)
    ss = torch.rand(B, HQ, generator=torch.Generator().manual_seed(7)) + 0.5
    if source == "score_scale":
        skip_unsupported(backend, score_scale=True)
        bad = ss.clone()
        bad[1, 2] = NAN
        kw["score_scale"], clean_kw["score_scale"] = bad, ss
        nan_rows[1, 2] = True
    else:
        skip_unsupported(backend, additive=True)
        add = torch.randn(B, HQ, T, T, generator=torch.Generator().manual_seed(10))
        add = add.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), 0.0)
        bad = add.clone()
        bad[0, 1, 3, 2] = NAN  # kept (2 <= 3): row (0, 1, 3) reads it
        bad[1, 0, 1, 5] = NAN  # removed by causality: row (1, 0, 1) does not read it
        bad[1, 3, 5, 0] = float("inf")  # a +inf score counts as NaN
        kw["attn_mask"], clean_kw["attn_mask"] = bad, add
        nan_rows[0, 1, 3] = nan_rows[1, 3, 5] = True
    out = run(backend, q, k, v, **kw)
    clean = run(backend, q, k, v, **clean_kw)
    check_rows(out, clean, nan_rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_head_mask_row_and_head_patch_element(backend):
    """The blend m * attn + (1 - m) * patch is elementwise: a NaN m gives NaN rows, a NaN in the
    patch one NaN element (also where m = 1); a removed key's NaN value leaks through neither."""
    q, k, v = qkv(11)
    hm = torch.rand(HQ, generator=torch.Generator().manual_seed(8))
    hm[1] = 1.0
    patch = torch.randn(HQ, D, generator=torch.Generator().manual_seed(9))
    bad_hm, bad_patch = hm.clone(), patch.clone()
    bad_hm[3] = NAN
    bad_patch[1, 4] = NAN
    keep = torch.ones(B, 1, T, T, dtype=torch.bool)
    keep[..., T - 1] = False  # the last key is removed for every row ...
    vn = v.clone()
    vn[:, :, T - 1] = NAN  # ... so its NaN value is never read
    out = run(backend, q, k, vn, causal=True, attn_mask=keep, head_mask=bad_hm, head_patch=bad_patch)
    clean = run(backend, q, k, v, causal=True, attn_mask=keep, head_mask=hm, head_patch=patch)
    expected_nan = torch.zeros(B, HQ, T, D, dtype=torch.bool)
    expected_nan[:, 3] = True
    expected_nan[:, 1, :, 4] = True
    assert torch.equal(torch.isnan(out), expected_nan)
    torch.testing.assert_close(out[~expected_nan], clean[~expected_nan])


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


def _grads(backend, q, k, v, dout, **kw):
    """Output and gradients w.r.t. q, k, v and any float intervention in ``kw``."""
    leaves = {"q": q, "k": k, "v": v}
    for n in ("head_mask", "score_scale"):
        if kw.get(n) is not None:
            leaves[n] = kw[n]
    leaves = {n: x.detach().clone().requires_grad_(True) for n, x in leaves.items()}
    call = dict(kw)
    call.update({n: leaves[n] for n in ("head_mask", "score_scale") if n in leaves})
    out = run(backend, leaves["q"], leaves["k"], leaves["v"], **call)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return out, dict(zip(leaves, grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_nan_at_removed_keys_reaches_no_gradient(backend):
    q, k, v = qkv(13)
    j = 3
    kn, vn = k.clone(), v.clone()
    kn[0, 0, j, :3] = NAN
    vn[0, 0, j] = NAN
    keep = torch.ones(B, 1, T, T, dtype=torch.bool)
    keep[..., j] = False
    kw: dict = dict(causal=True, attn_mask=keep, head_mask=torch.rand(B, HQ, generator=torch.Generator().manual_seed(14)))
    if backend != "sdpa":
        kw["score_scale"] = torch.rand(HQ, generator=torch.Generator().manual_seed(15)) + 0.5
    dout = torch.randn(B, HQ, T, D, generator=torch.Generator().manual_seed(16))
    out, g = _grads(backend, q, kn, vn, dout, **kw)
    clean_out, gc = _grads(backend, q, k, v, dout, **kw)
    torch.testing.assert_close(out, clean_out)
    for n in g:
        assert torch.isfinite(g[n]).all(), f"a NaN at a removed key leaked into d{n}"
        torch.testing.assert_close(g[n], gc[n], msg=lambda m, n=n: f"d{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_nan_query_sends_nan_only_along_read_edges(backend):
    q, k, v = qkv(17)
    r, h = 3, 1  # query row 3 of head 1 (kv head 0) has a NaN; causal: it reads keys 0..3
    qn = q.clone()
    qn[0, h, r, 2] = NAN
    kw: dict = dict(causal=True, head_mask=torch.rand(B, HQ, T, generator=torch.Generator().manual_seed(18)))
    if backend != "sdpa":
        kw["score_scale"] = torch.rand(B, HQ, generator=torch.Generator().manual_seed(19)) + 0.5
    dout = torch.randn(B, HQ, T, D, generator=torch.Generator().manual_seed(20))
    out, g = _grads(backend, qn, k, v, dout, **kw)
    _, gc = _grads(backend, torch.nan_to_num(qn, nan=0.0), k, v, dout, **kw)

    def expect(name, bad):
        """``bad``: bool mask over the gradient's leading dims of entries that must be non-finite."""
        grad, clean = g[name], gc[name]
        per = ~torch.isfinite(grad)
        per = per.flatten(bad.dim()).any(-1) if per.dim() > bad.dim() else per
        assert torch.equal(per, bad), f"d{name}: non-finite at {per.nonzero().tolist()}, expected {bad.nonzero().tolist()}"
        torch.testing.assert_close(grad[~bad], clean[~bad], msg=lambda m: f"d{name}: {m}")

    row = torch.zeros(B, HQ, T, dtype=torch.bool)
    row[0, h, r] = True
    assert torch.isnan(out[row]).all() and torch.isfinite(out[~row]).all()
    expect("q", row)
    keys = torch.zeros(B, HKV, T, dtype=torch.bool)
    keys[0, 0, : r + 1] = True
    expect("k", keys)
    expect("v", keys)
    expect("head_mask", row)
    if "score_scale" in g:
        heads = torch.zeros(B, HQ, dtype=torch.bool)
        heads[0, h] = True
        expect("score_scale", heads)
