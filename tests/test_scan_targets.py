"""headint.scan(target="q" | "k" | "v") against a hook oracle: one forward per intervention,
the head's slice of the q/k/v projection output replaced (GPT-2 ``c_attn``, Llama
``q_proj``/``k_proj``/``v_proj``). Llama's projections sit before rotary embeddings, the scan
edits after them; rotation is linear and per position, so with every example at the same
positions (unpadded, or clean and corrupt padded alike) the two are the same edit.

Tiny GPT-2 (3 layers, 4 heads) and tiny Llama with grouped-query attention (4 query heads,
2 key/value heads: k/v scans are over the 2 key/value heads).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import headint
from scan_oracles import (
    _qkv_modules,
    _qkv_slices,
    corrupt_of,
    derangement,
    head_dim,
    make_batch,
    model_inputs,
    n_heads,
    n_kv_heads,
    n_layers,
    oracle_metric,
    record_z,
    replace_heads,
    tiny_gpt2,
    tiny_llama,
)

ATOL = 1e-5
RTOL = 1e-5
BACKEND = "reference"
METHODS = [("zero", None), ("mean", None), ("resample", None), ("patch", "denoising"), ("patch", "noising")]
METHOD_IDS = ["zero", "mean", "resample", "patch-denoising", "patch-noising"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return tiny_gpt2() if request.param == "gpt2" else tiny_llama()


def n_target_heads(model, which: str) -> int:
    return n_heads(model) if which == "q" else n_kv_heads(model)


def record_qkv(model, batch: dict, which: str) -> dict[int, torch.Tensor]:
    """``{layer: [N, T, Hx, D]}``: the ``which`` projection outputs of one plain forward."""
    out = {}
    D, Hx = head_dim(model), n_target_heads(model, which)
    handles = []
    for l in range(n_layers(model)):
        key, _ = _qkv_slices(model, which, 0)
        cols = slice(_qkv_slices(model, which, 0)[1].start, _qkv_slices(model, which, Hx - 1)[1].stop)

        def fwd(_m, _a, y, l=l, cols=cols):
            out[l] = y[..., cols].detach().clone().view(*y.shape[:-1], Hx, D)
        handles.append(_qkv_modules(model, l)[key].register_forward_hook(fwd))
    try:
        with torch.no_grad():
            model(**model_inputs(batch))
    finally:
        for h in handles:
            h.remove()
    return out


def qkv_edit_hooks(model, which: str, edits):
    """Hooks replacing ``(layer, head, position or None, value [N or 1, T, D] or None)`` slices."""
    handles = []
    for l, h, p, v in edits:
        key, cols = _qkv_slices(model, which, h)

        def fwd(_m, _a, y, p=p, v=v, cols=cols):
            y = y.clone()
            pos = slice(None) if p is None else slice(p, p + 1)
            y[:, pos, cols] = 0.0 if v is None else v.to(y.dtype).expand(y.shape[0], -1, -1)[:, pos]
            return y
        handles.append(_qkv_modules(model, l)[key].register_forward_hook(fwd))
    return handles


def oracle_qkv_scan(model, batch, metric, which, *, method, corrupt=None, direction="denoising", per_position=False,
                    heads=None, positions=None, seed=0, direct=False) -> torch.Tensor:
    """``[L, Hx, N]`` / ``[L, Hx, T, N]`` (NaN where not scanned). ``direct``: every head output of
    every later layer frozen at the base run's (with forward pre-hooks on the output projection)."""
    L, Hx = n_layers(model), n_target_heads(model, which)
    N, T = batch["input_ids"].shape
    _, clean_logits = record_z(model, batch)
    base = corrupt if (method == "patch" and direction == "denoising") else batch
    acts = record_qkv(model, base, which)
    if method == "zero":
        src = None
    elif method == "mean":
        src = {l: x.double().mean(0, keepdim=True).float() for l, x in acts.items()}  # unpadded inputs only
    elif method == "resample":
        src = {l: x[derangement(N, seed)] for l, x in acts.items()}
    else:
        src = record_qkv(model, batch if direction == "denoising" else corrupt, which)
    z_base = record_z(model, base)[0] if direct else None

    def run(l, h, p):
        value = None if src is None else src[l][:, :, h]
        handles = qkv_edit_hooks(model, which, [(l, h, p, value)])
        frozen = [(l2, h2, None, z_base[l2][:, :, h2]) for l2 in range(l + 1, L) for h2 in range(n_heads(model))] if direct else []
        try:
            with torch.no_grad(), replace_heads(model, frozen):
                logits = model(**model_inputs(base)).logits
        finally:
            for hd in handles:
                hd.remove()
        return oracle_metric(metric, logits, base, clean_logits)

    heads = range(Hx) if heads is None else heads
    if per_position:
        out = torch.full((L, Hx, T, N), float("nan"))
        for l, h, p in itertools.product(range(L), heads, range(T) if positions is None else positions):
            out[l, h, p] = run(l, h, p)
        return out
    out = torch.full((L, Hx, N), float("nan"))
    for l, h in itertools.product(range(L), heads):
        out[l, h] = run(l, h, None)
    return out


def assert_matches(result, expected):
    got = result.per_example
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    fin = ~torch.isnan(expected)
    diff = (got[fin] - expected[fin]).abs().max()
    assert torch.allclose(got[fin], expected[fin], atol=ATOL, rtol=RTOL), f"max |scan - oracle| = {float(diff):.3g}"


def scan_and_oracle(model, batch, which, method, direction, metric="logit_diff", **kw):
    corrupt = corrupt_of(batch) if method == "patch" else None
    result = headint.scan(model, batch, metric, corrupt=corrupt, method=method, direction=direction or "denoising",
                          target=which, progress=False, backend=BACKEND, **kw)
    okw = {k: v for k, v in kw.items() if k in ("per_position", "heads", "positions", "seed")}
    if kw.get("effect") == "direct":
        okw["direct"] = True
    expected = oracle_qkv_scan(model, batch, metric, which, method=method, corrupt=corrupt, direction=direction or "denoising", **okw)
    return result, expected


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("method,direction", METHODS, ids=METHOD_IDS)
def test_per_head_matches_oracle(model, which, method, direction):
    batch = make_batch(3, 7, seed=21)
    result, expected = scan_and_oracle(model, batch, which, method, direction)
    assert result.axes == ("layer", "head")
    assert result.grid_shape == (n_layers(model), n_target_heads(model, which))
    assert result.settings["target"] == which
    assert result.settings["head_kind"] == ("query" if which == "q" else "key/value")
    assert_matches(result, expected)
    # the edits move the metric: the test could fail
    assert (expected - result.base_per_example).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_per_position_matches_oracle(model, which, direction):
    """Per position: a q position is a query, a k/v position a key (read by every later query)."""
    batch = make_batch(2, 6, seed=22)
    result, expected = scan_and_oracle(model, batch, which, "patch", direction, per_position=True, heads=[1])
    assert result.axes == ("layer", "head", "position")
    assert result.settings["position_reuse"] is True
    assert_matches(result, expected)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_left_padded_patch_and_small_batches(model, which):
    """Left padding (clean and corrupt padded alike) and one row per forward change nothing."""
    batch = make_batch(3, 7, seed=23, pad="left", lengths=[7, 5, 4])
    result, expected = scan_and_oracle(model, batch, which, "patch", "noising", batch_size=1)
    assert_matches(result, expected)
    result, expected = scan_and_oracle(model, batch, which, "patch", "denoising", per_position=True, heads=[0], batch_size=3)
    assert_matches(result, expected)


def test_targets_are_different_interventions(model):
    """Different targets are different interventions (guards against a target being ignored).
    (Zero queries and zero keys both give uniform attention, zero values a zero output: the
    pairs compared are the ones that must differ.)"""
    batch = make_batch(3, 7, seed=24)
    got = {t: headint.scan(model, batch, "logit_diff", method="zero", target=t, heads=[0], progress=False, backend=BACKEND).per_example
           for t in ("z", "q", "v")}
    assert not torch.allclose(got["z"][:, 0], got["q"][:, 0])
    assert not torch.allclose(got["q"][:, 0], got["v"][:, 0])


def test_gqa_kv_heads_are_validated():
    model = tiny_llama()
    batch = make_batch(2, 5, seed=25)
    with pytest.raises(ValueError, match=r"heads: 3 out of range; the model has 2 key/value heads"):
        headint.scan(model, batch, "logit_diff", method="zero", target="k", heads=[3], progress=False)
    r = headint.scan(model, batch, "logit_diff", method="zero", target="v", heads=[1], progress=False, backend=BACKEND)
    assert r.grid_shape == (3, 2) and torch.isnan(r.per_example[:, 0]).all() and not torch.isnan(r.per_example[:, 1]).any()


def test_argument_errors():
    model = tiny_gpt2()
    batch = make_batch(2, 5, seed=26)
    with pytest.raises(ValueError, match=r"target must be one of .*got 'pattern_x'"):
        headint.scan(model, batch, "logit_diff", target="pattern_x", progress=False)
    with pytest.raises(ValueError, match=r"effect must be one of .*got 'indirect'"):
        headint.scan(model, batch, "logit_diff", effect="indirect", progress=False)
    with pytest.raises(ValueError, match=r"head_sets are scanned with target='z' only, got target='q'"):
        headint.scan(model, batch, "logit_diff", target="q", head_sets=[[(0, 1)]], progress=False)


# ------------------------------------------------------------------------------ pattern patching

PATTERN_ORACLE = "m15b_pattern_oracle"
_PATTERN_SPECS: list = []


def _pattern_oracle_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Plain eager attention: records each layer's probabilities ``[B, H, T, T]`` and replaces
    ``(layer, head, query position or None) -> probs [B, T, T]`` rows when asked."""
    spec = _PATTERN_SPECS[-1]
    layer = module.layer_idx
    B, H, T, D = query.shape
    group = H // key.shape[1]
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else D ** -0.5)
    if attention_mask is not None:
        m = attention_mask[:, :, :, : k.shape[2]]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    else:
        scores = scores.masked_fill(~torch.ones(T, k.shape[2], dtype=torch.bool).tril(), float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)
    spec["record"][layer] = probs.detach().clone()
    for (l, h, p), src in spec["edits"].items():
        if l == layer:
            rows = slice(None) if p is None else slice(p, p + 1)
            probs[:, h, rows] = src.expand(B, -1, -1)[:, rows]
    return (probs @ v).transpose(1, 2).contiguous(), None


def pattern_run(model, batch, edits=None):
    """``(logits, {layer: probs [N, H, T, T]})`` of one forward with the oracle attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(PATTERN_ORACLE, _pattern_oracle_forward)
    AttentionMaskInterface.register(PATTERN_ORACLE, eager_mask)
    spec = {"record": {}, "edits": dict(edits or {})}
    before = model.config._attn_implementation
    _PATTERN_SPECS.append(spec)
    model.set_attn_implementation(PATTERN_ORACLE)
    try:
        with torch.no_grad():
            logits = model(**model_inputs(batch)).logits
    finally:
        model.set_attn_implementation(before)
        _PATTERN_SPECS.remove(spec)
    return logits, spec["record"]


def oracle_pattern_scan(model, batch, metric, *, method, corrupt=None, direction="denoising", per_position=False, heads=None, seed=0):
    L, H = n_layers(model), n_heads(model)
    N, T = batch["input_ids"].shape
    clean_logits, clean_probs = pattern_run(model, batch)
    base = corrupt if (method == "patch" and direction == "denoising") else batch
    base_probs = pattern_run(model, base)[1]
    if method == "mean":
        w = batch["attention_mask"].double()[:, None, :, None]
        src = {l: ((x.double() * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp_min(1)).float() for l, x in base_probs.items()}
    elif method == "resample":
        src = {l: x[derangement(N, seed)] for l, x in base_probs.items()}
    else:
        src = clean_probs if direction == "denoising" else pattern_run(model, corrupt)[1]
    heads = range(H) if heads is None else heads
    cells = itertools.product(range(L), heads, range(T)) if per_position else itertools.product(range(L), heads, [None])
    out = torch.full((L, H, T, N) if per_position else (L, H, N), float("nan"))
    for l, h, p in cells:
        logits, _ = pattern_run(model, base, {(l, h, p): src[l][:, h]})
        out[(l, h, p) if per_position else (l, h)] = oracle_metric(metric, logits, base, clean_logits)
    return out


@pytest.mark.parametrize("method,direction", METHODS[1:], ids=METHOD_IDS[1:])
def test_pattern_per_head_matches_oracle(model, method, direction):
    """Unpadded for mean/resample (patterns of differently padded examples do not transfer:
    see test_pattern_padding_mismatch_is_refused); left-padded for patch (padded alike)."""
    pad = dict(pad="left", lengths=[7, 6, 5]) if method == "patch" else {}
    batch = make_batch(3, 7, seed=41, **pad)
    corrupt = corrupt_of(batch) if method == "patch" else None
    kw = dict(corrupt=corrupt, method=method, direction=direction or "denoising")
    r = headint.scan(model, batch, "logit_diff", target="pattern", progress=False, backend=BACKEND, **kw)
    expected = oracle_pattern_scan(model, batch, "logit_diff", **kw)
    assert_matches(r, expected)
    assert (expected - r.base_per_example).abs().max() > 1e-3


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_pattern_per_position_matches_oracle(model, direction):
    batch = make_batch(2, 6, seed=42)
    corrupt = corrupt_of(batch)
    kw = dict(corrupt=corrupt, method="patch", direction=direction, per_position=True, heads=[1])
    r = headint.scan(model, batch, "kl", target="pattern", progress=False, backend=BACKEND, batch_size=5, **kw)
    assert r.settings["position_reuse"] is True
    assert_matches(r, oracle_pattern_scan(model, batch, "kl", **kw))


def test_pattern_on_default_backend_and_direct(model):
    """The pattern edit rides on the kernels' head-output replacement: any backend gives the
    oracle's values; with effect='direct' the last layer equals the total effect."""
    batch = make_batch(2, 6, seed=43)
    corrupt = corrupt_of(batch)
    kw = dict(corrupt=corrupt, method="patch", direction="noising")
    r = headint.scan(model, batch, "logit_diff", target="pattern", progress=False, **kw)
    assert_matches(r, oracle_pattern_scan(model, batch, "logit_diff", **kw))
    d = headint.scan(model, batch, "logit_diff", target="pattern", effect="direct", progress=False, backend=BACKEND, **kw)
    assert torch.allclose(d.per_example[-1], r.per_example[-1], atol=1e-5)


def test_pattern_zero_is_refused():
    with pytest.raises(ValueError, match="target='pattern' takes method 'patch', 'mean' or 'resample'"):
        headint.scan(tiny_gpt2(), make_batch(2, 5), "logit_diff", target="pattern", method="zero", progress=False)


@pytest.mark.parametrize("method", ["mean", "resample"])
def test_pattern_padding_mismatch_is_refused(method):
    batch = make_batch(3, 7, seed=44, pad="left", lengths=[7, 6, 5])
    with pytest.raises(ValueError, match=rf"target='pattern' with method='{method}': the source attention pattern for example \d+ \(layer 0\) puts weight on keys that are padding"):
        headint.scan(tiny_gpt2(), batch, "logit_diff", target="pattern", method=method, progress=False, backend=BACKEND)
