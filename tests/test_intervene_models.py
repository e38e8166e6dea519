"""headint under ``intervene`` (reference backend) against independent oracles, on five
architectures: GPT-2, Llama (GQA, RoPE), Qwen2 (GQA), Mistral (sliding window < T) and BERT.

Head-output interventions (Ablate, Patch, Scale) are checked against forward pre-hooks that
edit head slices at the input of each layer's output projection; edge knockouts, q/k/v
patches and score scaling against a small eager attention function of the tests' own
(:mod:`tiny_models`), registered in ``transformers.AttentionInterface`` under another name.
"""

from __future__ import annotations

import pytest
import torch

import headint
from headint import Ablate, Knockout, Patch, PatchQKV, Scale, intervene, record

import tiny_models as tm

ARCHS = list(tm.FACTORIES)
B, T = 3, 8
ATOL, RTOL = 2e-5, 1e-5


def _ids(seed: int, b: int = B, t: int = T) -> torch.Tensor:
    return torch.randint(3, tm.VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


CLEAN = _ids(1)
CORRUPT = _ids(2)


def _padded_mask(name: str) -> torch.Tensor:
    """Left padding for decoders, right padding for BERT: rows have 8, 5 and 3 real tokens."""
    mask = torch.ones(B, T, dtype=torch.long)
    for row, n_pad in ((1, 3), (2, 5)):
        if tm.is_decoder(name):
            mask[row, :n_pad] = 0
        else:
            mask[row, T - n_pad:] = 0
    return mask


def _pad_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), ids, torch.zeros_like(ids))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with tm.one_thread():
        yield


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param, tm.get(request.param)


def _run_headint(tiny, ids, ivs, mask=None) -> torch.Tensor:
    with intervene(tiny.model, ivs, backend="reference"):
        return tm.logits(tiny.model, ids, mask)


def _close(actual, expected, mask=None, atol=ATOL):
    if mask is not None:  # compare real positions only
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# The oracle: intervention objects -> hook edits + oracle attention spec, written from the docs


def _sel(positions, b: int, t: int) -> torch.Tensor:
    """Absolute-position selector -> bool ``[b or 1, t]``."""
    if positions is None:
        return torch.ones(1, t, dtype=torch.bool)
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        return positions.reshape(-1, t)
    if isinstance(positions, int):
        positions = [positions]
    out = torch.zeros(1, t, dtype=torch.bool)
    out[0, list(positions)] = True
    return out


def _heads(head, n: int) -> list[int]:
    if head is None:
        return list(range(n))
    return [head] if isinstance(head, int) else list(head)


def _row(x: torch.Tensor, row: int | None) -> torch.Tensor:
    """Source rows: row ``i`` of a per-row run reads source row ``i`` when the source has it."""
    if row is not None and x.shape[0] > 1:
        return x[row:row + 1]
    return x


def _my_mean_z(cache, layer: int) -> torch.Tensor:
    z = cache.tensors[("z", layer)]
    if cache.attention_mask is None:
        return z.mean(0)
    w = cache.attention_mask.float()[:, :, None, None]
    return (z * w).sum(0) / w.sum(0).clamp_min(1)


def oracle_logits(tiny, ids, ivs, mask=None, row: int | None = None) -> torch.Tensor:
    """Expected logits of ``ids`` under the shared interventions ``ivs``.

    ``row``: this is row ``row`` of a per-row batch (sources with several rows give that row).
    """
    b, t = ids.shape
    H = tiny.n_heads
    edits: dict[int, list] = {}
    spec = tm.OracleSpec()
    needs_oracle_attention = False
    for iv in ivs:
        if isinstance(iv, Knockout):
            needs_oracle_attention = True
            spec.removed.setdefault(iv.layer, []).append(
                (_heads(iv.head, H), _row(_sel(iv.queries, b, t), row), _row(_sel(iv.keys, b, t), row)))
            continue
        if isinstance(iv, PatchQKV):
            needs_oracle_attention = True
            n = H if iv.which == "q" else tiny.n_kv_heads
            src = iv.source.tensors[(iv.which, iv.layer)] if isinstance(iv.source, headint.ActivationCache) else iv.source
            spec.swap.append((iv.layer, iv.which, _heads(iv.head, n), _row(_sel(iv.positions, b, t), row), _row(src, row)))
            continue
        if isinstance(iv, Scale) and iv.target == "scores":
            needs_oracle_attention = True
            f = spec.score_factor.setdefault(iv.layer, {})
            for h in _heads(iv.head, H):
                f[h] = f.get(h, 1.0) * iv.factor
            continue
        sel = _row(_sel(iv.positions, b, t), row)[:, :, None]  # [b|1, t, 1]
        heads = _heads(iv.head, H)
        if isinstance(iv, Scale):
            fn = (lambda z, f=iv.factor: z * f)
        else:
            if isinstance(iv, Ablate) and iv.kind == "zero":
                value = torch.zeros(1, t, H, tiny.head_dim)
            elif isinstance(iv, Ablate):
                v = iv.value
                if isinstance(v, headint.ActivationCache):
                    v = _my_mean_z(v, iv.layer)
                value = (v if v.dim() == 3 else v.expand(t, H, tiny.head_dim))[None, :t]
            else:
                src = iv.source.tensors[("z", iv.layer)] if isinstance(iv.source, headint.ActivationCache) else iv.source
                value = _row(src, row)[:, :t]
            fn = (lambda z, value=value: value.expand_as(z))
        edits.setdefault(iv.layer, []).append((heads, sel, fn))

    def layer_edit(layer):
        def edit(z):
            for heads, sel, fn in edits[layer]:
                new = fn(z.clone())
                for h in heads:
                    z[:, :, h] = torch.where(sel, new[:, :, h], z[:, :, h])
            return z
        return edit

    with tm.edit_heads(tiny, {l: layer_edit(l) for l in edits}):
        if needs_oracle_attention:
            with tm.oracle_attention(tiny.model, spec):
                return tm.logits(tiny.model, ids, mask)
        return tm.logits(tiny.model, ids, mask)


def check(tiny, ids, ivs, mask=None, atol=ATOL):
    got = _run_headint(tiny, ids, ivs, mask)
    want = oracle_logits(tiny, ids, ivs, mask)
    _close(got, want, mask, atol)
    return got, want


def _assert_effect(tiny, ids, got, mask=None):
    """Guard against vacuous comparisons: the intervention changed the output."""
    base = tm.logits(tiny.model, ids, mask)
    if mask is not None:
        base, got = base[mask.bool()], got[mask.bool()]
    assert (base - got).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Sanity of the set-up itself


def test_oracles_reproduce_the_model(arch):
    _, tiny = arch
    base = tm.logits(tiny.model, CLEAN)
    with tm.edit_heads(tiny, {0: lambda z: z, 1: lambda z: z}):
        _close(tm.logits(tiny.model, CLEAN), base)
    with tm.oracle_attention(tiny.model, tm.OracleSpec()):
        _close(tm.logits(tiny.model, CLEAN), base)
    assert tiny.model.config._attn_implementation == "sdpa"


def test_mistral_sliding_window_is_active():
    """T=8 > window=4: the window changes the output (so the Mistral cases exercise it)."""
    no_window = tm.make_mistral(sliding_window=None)
    windowed = tm.get("mistral")
    assert windowed.model.config.sliding_window == tm.MISTRAL_WINDOW < T
    diff = (tm.logits(no_window.model, CLEAN) - tm.logits(windowed.model, CLEAN)).abs()
    assert diff[:, : tm.MISTRAL_WINDOW].max() < 1e-5  # identical while the window covers everything
    assert diff[:, tm.MISTRAL_WINDOW:].max() > 1e-3
    # and headint sees the same window
    _close(_run_headint(windowed, CLEAN, []), tm.logits(windowed.model, CLEAN))


# ---------------------------------------------------------------------------------------------
# (a) no intervention


@pytest.mark.parametrize("ivs", [[], None], ids=["empty", "none"])
def test_no_intervention_matches_model(arch, ivs):
    name, _ = arch
    tiny = tm.FACTORIES[name]()  # output_hidden_states makes transformers install hooks for good
    base = tm.logits(tiny.model, CLEAN)
    with intervene(tiny.model, ivs, backend="reference"):
        out = tiny.model(input_ids=CLEAN, output_hidden_states=True)
    _close(out.logits, base)
    ref_hidden = tiny.model(input_ids=CLEAN, output_hidden_states=True).hidden_states
    for a, b in zip(out.hidden_states, ref_hidden):
        _close(a, b)


# ---------------------------------------------------------------------------------------------
# Recording agrees with the independent captures


def test_record_matches_hooks_and_oracle(arch):
    _, tiny = arch
    store: dict = {}
    with tm.capture_z(tiny, store):
        tm.logits(tiny.model, CORRUPT)
    spec = tm.OracleSpec()
    with tm.oracle_attention(tiny.model, spec):
        tm.logits(tiny.model, CORRUPT)
    cache = record(tiny.model, CORRUPT, what=("z", "q", "k", "v", "pattern"), backend="reference")
    for l in range(tm.N_LAYERS):
        z = cache["z", l]
        assert z.shape == (B, T, tiny.n_heads, tiny.head_dim)
        _close(z, store[l])
        assert cache["q", l].shape == (B, tiny.n_heads, T, tiny.head_dim)
        for w in ("k", "v"):
            assert cache[w, l].shape == (B, tiny.n_kv_heads, T, tiny.head_dim)
        for w in ("q", "k", "v"):
            _close(cache[w, l], spec.capture[(l, w)])
        _close(cache["pattern", l], spec.capture[(l, "probs")])


# ---------------------------------------------------------------------------------------------
# (b) zero ablation


ZERO_CASES = {
    "one_head": [Ablate(layer=0, head=1)],
    "several_heads": [Ablate(layer=0, head=[0, 2, 3])],
    "positions": [Ablate(layer=1, head=2, positions=[1, 5, 7])],
    "one_position_int": [Ablate(layer=0, head=3, positions=6)],
    "whole_layer_at_pos": [Ablate(layer=0, head=None, positions=[0, 4])],
    "both_layers": [Ablate(layer=0, head=0, positions=[2, 3]), Ablate(layer=1, head=[1, 3])],
    "bool_positions": [Ablate(layer=0, head=2, positions=torch.tensor([0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.bool))],
}


@pytest.mark.parametrize("case", list(ZERO_CASES))
def test_zero_ablation(arch, case):
    _, tiny = arch
    got, _ = check(tiny, CLEAN, ZERO_CASES[case])
    _assert_effect(tiny, CLEAN, got)


# ---------------------------------------------------------------------------------------------
# (c) mean ablation


def test_mean_ablation_from_cache(arch):
    _, tiny = arch
    cache = record(tiny.model, CORRUPT, what=("z",), backend="reference")
    ivs = [Ablate(layer=0, head=[1, 2], kind="mean", value=cache), Ablate(layer=1, head=0, positions=[3, 4, 7], kind="mean", value=cache)]
    got, _ = check(tiny, CLEAN, ivs)
    _assert_effect(tiny, CLEAN, got)
    # the mean headint uses is the one we compute ourselves
    for l in range(tm.N_LAYERS):
        _close(cache.mean_z(l), cache["z", l].mean(0))


def test_mean_ablation_from_tensors(arch):
    _, tiny = arch
    cache = record(tiny.model, CORRUPT, what=("z",), backend="reference")
    per_pos = cache["z", 0].mean(0)  # [T, H, D]
    overall = cache["z", 1].mean((0, 1))  # [H, D]
    _close(cache.mean_z(1, over_positions=True), overall)
    check(tiny, CLEAN, [Ablate(layer=0, head=3, kind="mean", value=per_pos),
                        Ablate(layer=1, head=[0, 1], positions=[2, 6], kind="mean", value=overall)])


# ---------------------------------------------------------------------------------------------
# (d) activation patching


def test_patch_from_recorded_run(arch):
    _, tiny = arch
    cache = record(tiny.model, CORRUPT, what=("z",), backend="reference")
    ivs = [Patch(layer=0, head=2, source=cache), Patch(layer=1, head=[0, 3], positions=[5, 6, 7], source=cache)]
    got, _ = check(tiny, CLEAN, ivs)
    _assert_effect(tiny, CLEAN, got)


def test_patch_from_single_row_tensor_broadcasts(arch):
    _, tiny = arch
    cache = record(tiny.model, CORRUPT[:1], what=("z",), backend="reference")
    src = cache["z", 1]
    assert src.shape[0] == 1
    check(tiny, CLEAN, [Patch(layer=1, head=1, positions=[0, 7], source=src)])


def test_patch_every_head_of_every_layer(arch):
    """Every head of every layer patched at every position from the corrupted run."""
    _, tiny = arch
    cache = record(tiny.model, CORRUPT, what=("z",), backend="reference")
    check(tiny, CLEAN, [Patch(layer=l, source=cache) for l in range(tm.N_LAYERS)])


# ---------------------------------------------------------------------------------------------
# (e) scaling head outputs, and compositions


@pytest.mark.parametrize("ivs", [
    [Scale(layer=0, head=1, factor=0.5)],
    [Scale(layer=1, head=[0, 2], positions=[1, 2, 3], factor=0.5)],
    [Scale(layer=0, head=0, factor=2.0), Scale(layer=0, head=0, factor=0.5)],  # product 1
    [Scale(layer=0, head=2, factor=0.5), Scale(layer=0, head=2, positions=[4], factor=2.0)],  # factor 1 at pos 4
    [Scale(layer=0, head=None, factor=0.0)],
], ids=["one_head", "heads_positions", "product_one", "partial_product_one", "zero_factor_layer"])
def test_scale_output(arch, ivs):
    _, tiny = arch
    check(tiny, CLEAN, ivs)


def test_compositions_in_order(arch):
    _, tiny = arch
    cache = record(tiny.model, CORRUPT, what=("z",), backend="reference")
    cases = [
        [Patch(layer=0, head=1, source=cache), Scale(layer=0, head=1, factor=0.5)],  # 0.5 * patched
        [Scale(layer=0, head=1, factor=0.5), Patch(layer=0, head=1, positions=[2, 5], source=cache)],
        [Scale(layer=1, head=[0, 1], factor=3.0), Ablate(layer=1, head=1, positions=[6])],
        [Ablate(layer=0, head=3, kind="mean", value=cache), Scale(layer=0, head=[2, 3], factor=-1.0),
         Patch(layer=0, head=2, positions=[0, 1], source=cache)],
    ]
    for ivs in cases:
        check(tiny, CLEAN, ivs)


# ---------------------------------------------------------------------------------------------
# (f) per-row interventions


def test_per_row_ablation_equals_separate_runs(arch):
    _, tiny = arch
    ids = _ids(3, b=tiny.n_heads)
    rows = [[Ablate(layer=0, head=i)] for i in range(tiny.n_heads)]
    got = _run_headint(tiny, ids, rows)
    for i in range(tiny.n_heads):
        want = oracle_logits(tiny, ids[i:i + 1], rows[i])
        _close(got[i:i + 1], want)
        # and it differs from its neighbours' ablations
        other = oracle_logits(tiny, ids[i:i + 1], rows[(i + 1) % tiny.n_heads])
        assert (other - got[i:i + 1]).abs().max() > 1e-4


def test_per_row_mixed_kinds_equal_separate_runs(arch):
    _, tiny = arch
    cache = record(tiny.model, CORRUPT, what=("z", "q", "k", "v"), backend="reference")
    rows = [
        [],
        [Patch(layer=0, head=[1, 2], positions=[3, 4, 5], source=cache), Scale(layer=1, head=0, factor=0.5)],
        [Knockout(queries=[5, 6, 7], keys=[1, 2], layer=0, head=1), Ablate(layer=1, head=3, kind="mean", value=cache)],
    ]
    got = _run_headint(tiny, CLEAN, rows)
    for i, ivs in enumerate(rows):
        want = oracle_logits(tiny, CLEAN[i:i + 1], ivs, row=i)
        _close(got[i:i + 1], want)
    rows2 = [
        [PatchQKV(layer=0, head=1, which="v", positions=[0, 1, 2], source=cache)],
        [Scale(layer=0, head=[0, 3], factor=0.3, target="scores")],
        [PatchQKV(layer=1, head=0, which="k", source=cache), PatchQKV(layer=1, head=2, which="q", positions=[6, 7], source=cache)],
    ]
    got = _run_headint(tiny, CLEAN, rows2)
    for i, ivs in enumerate(rows2):
        want = oracle_logits(tiny, CLEAN[i:i + 1], ivs, row=i)
        _close(got[i:i + 1], want)


def test_per_row_with_shared_equals_plain_list(arch):
    """A per-row list whose rows are all equal behaves like the shared list."""
    _, tiny = arch
    ivs = [Ablate(layer=0, head=2, positions=[1, 2]), Scale(layer=1, head=1, factor=0.5)]
    _close(_run_headint(tiny, CLEAN, [list(ivs) for _ in range(B)]), _run_headint(tiny, CLEAN, ivs))


def test_batch_bool_selectors(arch):
    """``[B, T]`` bool positions / knockout selectors: row ``b`` uses its own row, shared or per-row."""
    _, tiny = arch
    g = torch.Generator().manual_seed(4)
    sel = torch.rand(B, T, generator=g) < 0.5
    sel2 = torch.rand(B, T, generator=g) < 0.5
    cache = record(tiny.model, CORRUPT, what=("z", "v"), backend="reference")
    ivs = [Ablate(layer=0, head=1, positions=sel), Patch(layer=1, head=[0, 3], positions=sel2, source=cache),
           Knockout(queries=sel, keys=sel2, layer=1, head=2), PatchQKV(layer=0, head=0, which="v", positions=sel2, source=cache)]
    got, _ = check(tiny, CLEAN, ivs)
    _assert_effect(tiny, CLEAN, got)
    rows = [ivs[:2], ivs[2:], [ivs[0], ivs[3]]]
    got = _run_headint(tiny, CLEAN, rows)
    for i, r in enumerate(rows):
        _close(got[i:i + 1], oracle_logits(tiny, CLEAN[i:i + 1], r, row=i))


# ---------------------------------------------------------------------------------------------
# (g) padded batches


def test_padded_batch(arch):
    name, tiny = arch
    mask = _padded_mask(name)
    ids, corrupt = _pad_ids(CLEAN, mask), _pad_ids(CORRUPT, mask)
    # no intervention first
    _close(_run_headint(tiny, ids, [], mask), tm.logits(tiny.model, ids, mask), mask)
    cache = record(tiny.model, {"input_ids": corrupt, "attention_mask": mask}, what=("z", "v"), backend="reference")
    assert torch.equal(cache.attention_mask, mask)
    real_everywhere = [p for p in range(T) if bool(mask[:, p].all())]
    ivs = [
        Ablate(layer=0, head=1, positions=real_everywhere[:2]),
        Ablate(layer=0, head=3, positions=mask.bool()),  # every real position of each row
        Patch(layer=1, head=[0, 2], positions=real_everywhere[-1:], source=cache),
        Ablate(layer=1, head=1, kind="mean", value=cache),  # mean over real tokens only
    ]
    got, _ = check(tiny, ids, ivs, mask)
    _assert_effect(tiny, ids, got, mask)
    ivs = [Knockout(queries=real_everywhere, keys=real_everywhere[:1], layer=0, head=[0, 2]),
           PatchQKV(layer=1, head=1, which="v", positions=real_everywhere, source=cache),
           Scale(layer=1, head=3, factor=0.25, target="scores")]
    check(tiny, ids, ivs, mask)


def test_padded_per_row(arch):
    name, tiny = arch
    mask = _padded_mask(name)
    ids = _pad_ids(CLEAN, mask)
    real = [torch.nonzero(mask[i]).flatten().tolist() for i in range(B)]
    rows = [[Ablate(layer=0, head=i, positions=real[i][-2:])] for i in range(B)]
    got = _run_headint(tiny, ids, rows, mask)
    for i in range(B):
        want = oracle_logits(tiny, ids[i:i + 1], rows[i], mask[i:i + 1])
        _close(got[i:i + 1], want, mask[i:i + 1])


# ---------------------------------------------------------------------------------------------
# (h) knockouts


KNOCKOUT_CASES = {
    "one_edge_set": [Knockout(queries=[5, 6, 7], keys=[1, 2], layer=0, head=1)],
    "union_and_layers": [Knockout(queries=[4, 5], keys=[0], layer=0, head=[0, 3]),
                         Knockout(queries=[6], keys=[2, 3, 4, 5], layer=0, head=3),
                         Knockout(queries=None, keys=[1], layer=1, head=None)],
    "all_keys_of_some_queries": [Knockout(queries=[0, 3], keys=None, layer=0, head=2)],
    "diagonal": [Knockout(queries=list(range(T)), keys=list(range(T)), layer=1, head=[1, 2])],
    "bool_selectors": [Knockout(queries=torch.tensor([0, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool),
                                keys=torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool), layer=1, head=0)],
}


@pytest.mark.parametrize("case", list(KNOCKOUT_CASES))
def test_knockout(arch, case):
    _, tiny = arch
    ivs = KNOCKOUT_CASES[case]
    got, _ = check(tiny, CLEAN, ivs)
    _assert_effect(tiny, CLEAN, got)


def test_knockout_pattern_recorded(arch):
    """The recorded pattern has the removed edges at zero and matches the oracle's probs."""
    _, tiny = arch
    ivs = KNOCKOUT_CASES["union_and_layers"] + [Scale(layer=1, head=2, factor=0.5, target="scores")]
    cache = record(tiny.model, CLEAN, what=("pattern",), interventions=ivs, backend="reference")
    spec = tm.OracleSpec()
    spec.removed = {0: [([0, 3], _sel([4, 5], B, T), _sel([0], B, T)), ([3], _sel([6], B, T), _sel([2, 3, 4, 5], B, T))],
                    1: [(list(range(4)), _sel(None, B, T), _sel([1], B, T))]}
    spec.score_factor = {1: {2: 0.5}}
    with tm.oracle_attention(tiny.model, spec):
        tm.logits(tiny.model, CLEAN)
    for l in range(tm.N_LAYERS):
        _close(cache["pattern", l], spec.capture[(l, "probs")])
    assert float(cache["pattern", 0][:, 3, 4:6, 0].abs().max()) == 0.0
    assert float(cache["pattern", 1][:, :, :, 1].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------
# (i) q/k/v patching


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_patch_qkv(arch, which):
    _, tiny = arch
    cache = record(tiny.model, CORRUPT, what=(which,), backend="reference")
    n = tiny.n_heads if which == "q" else tiny.n_kv_heads
    ivs = [PatchQKV(layer=0, head=n - 1, which=which, source=cache),
           PatchQKV(layer=1, head=[0], which=which, positions=[2, 3, 4], source=cache)]
    got, _ = check(tiny, CLEAN, ivs)
    _assert_effect(tiny, CLEAN, got)


def test_patch_qkv_from_tensor_and_all_heads(arch):
    _, tiny = arch
    spec = tm.OracleSpec()
    with tm.oracle_attention(tiny.model, spec):  # an independent recording
        tm.logits(tiny.model, CORRUPT)
    ivs = [PatchQKV(layer=0, head=None, which="k", positions=[0, 1], source=spec.capture[(0, "k")]),
           PatchQKV(layer=0, head=None, which="v", positions=[6, 7], source=spec.capture[(0, "v")]),
           PatchQKV(layer=1, head=[1, 2], which="q", source=spec.capture[(1, "q")][:1])]
    check(tiny, CLEAN, ivs)


# ---------------------------------------------------------------------------------------------
# (j) scaling scores


@pytest.mark.parametrize("factor", [0.5, 3.0, 0.0])
def test_scale_scores(arch, factor):
    _, tiny = arch
    ivs = [Scale(layer=0, head=1, factor=factor, target="scores"), Scale(layer=1, head=[0, 3], factor=factor, target="scores")]
    got, _ = check(tiny, CLEAN, ivs)
    _assert_effect(tiny, CLEAN, got)


def test_scale_scores_composes_multiplicatively(arch):
    _, tiny = arch
    a = _run_headint(tiny, CLEAN, [Scale(layer=0, head=2, factor=2.0, target="scores"),
                                   Scale(layer=0, head=[2, 3], factor=0.25, target="scores")])
    b = oracle_logits(tiny, CLEAN, [Scale(layer=0, head=2, factor=0.5, target="scores"),
                                    Scale(layer=0, head=3, factor=0.25, target="scores")])
    _close(a, b)


# ---------------------------------------------------------------------------------------------
# The default backend agrees with the reference one


def test_auto_backend_agrees_with_reference(arch):
    _, tiny = arch
    cache = record(tiny.model, CORRUPT, what=("z", "v"), backend="reference")
    ivs = [Ablate(layer=0, head=1, positions=[2, 3]), Patch(layer=1, head=2, source=cache),
           Knockout(queries=[5, 6], keys=[1], layer=1, head=0), Scale(layer=0, head=3, factor=0.5, target="scores"),
           PatchQKV(layer=0, head=0, which="v", source=cache)]
    ref = _run_headint(tiny, CLEAN, ivs)
    with intervene(tiny.model, ivs):
        auto = tm.logits(tiny.model, CLEAN)
    _close(auto, ref, atol=1e-4)
