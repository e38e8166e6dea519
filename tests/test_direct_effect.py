"""effect="direct" (every later attention head frozen at the base run's output) and
effect="direct_frozen_ln" (also the final norm's scale frozen at the base run's) against a hook
oracle, and direct vs total effects on the embedded induction model.

Oracle: one forward per intervention, forward pre-hooks on the output projections replace the
scanned head's output and set every head output of every later layer to the base run's
(recorded by a plain forward of the base inputs); for "direct_frozen_ln" a forward hook on the
final norm (GPT-2's ``ln_f``, Llama's ``norm``, named here) replaces its output by the norm
written out by hand (LayerNorm: centred, ``1/sqrt(var + eps)``; RMSNorm: ``1/sqrt(mean(x^2) +
eps)``) with the scale of the base run's input to it.
"""

from __future__ import annotations

import contextlib

import itertools

import pytest
import torch

import headint
from headint.metrics import LogitDiff
from scan_oracles import (
    corrupt_of,
    make_batch,
    masked_mean_z,
    model_inputs,
    n_heads,
    n_layers,
    oracle_metric,
    record_z,
    replace_heads,
    tiny_gpt2,
    tiny_llama,
)
from test_scan_targets import assert_matches, scan_and_oracle

BACKEND = "reference"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return tiny_gpt2() if request.param == "gpt2" else tiny_llama()


def final_norm_module(model):
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


def _hand_norm(model, x, scale):
    """The final norm of ``model`` written out by hand, with the per-token ``scale`` [N, T]."""
    norm = final_norm_module(model)
    if isinstance(norm, torch.nn.LayerNorm):
        return (x - x.mean(-1, keepdim=True)) * scale[..., None] * norm.weight + norm.bias
    if type(norm).__name__ == "GemmaRMSNorm":
        return (1.0 + norm.weight) * (x * scale[..., None])
    return norm.weight * (x * scale[..., None])


def _hand_scale(model, x):
    norm = final_norm_module(model)
    if isinstance(norm, torch.nn.LayerNorm):
        return 1.0 / torch.sqrt(x.var(-1, unbiased=False) + norm.eps)
    eps = norm.eps if type(norm).__name__ == "GemmaRMSNorm" else norm.variance_epsilon
    return 1.0 / torch.sqrt(x.pow(2).mean(-1) + eps)


def final_norm_scale(model, batch) -> torch.Tensor:
    """The final norm's per-token scale [N, T] in a plain forward of ``batch``."""
    seen = []
    h = final_norm_module(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(**model_inputs(batch))
    finally:
        h.remove()
    (x,) = seen
    # the hand-written norm reproduces the module with the recomputed scale (the oracle is right)
    with torch.no_grad():
        assert torch.allclose(_hand_norm(model, x, _hand_scale(model, x)), final_norm_module(model)(x), atol=1e-5)
    return _hand_scale(model, x)


@contextlib.contextmanager
def frozen_norm(model, scale):
    h = final_norm_module(model).register_forward_hook(lambda _m, args, out: _hand_norm(model, args[0], scale))
    try:
        yield
    finally:
        h.remove()


def mlp_module(model, layer):
    return model.transformer.h[layer].mlp if hasattr(model, "transformer") else model.model.layers[layer].mlp


def mlp_outputs(model, batch) -> list[torch.Tensor]:
    """Each layer's MLP output [N, T, d] in a plain forward of ``batch``."""
    out = [None] * n_layers(model)
    hs = [mlp_module(model, l).register_forward_hook(lambda _m, _a, y, l=l: out.__setitem__(l, y.detach())) for l in range(len(out))]
    try:
        with torch.no_grad():
            model(**model_inputs(batch))
    finally:
        for h in hs:
            h.remove()
    return out


@contextlib.contextmanager
def frozen_mlps(model, outputs, low):
    """MLPs of layers >= low return ``outputs[l]``."""
    hs = [mlp_module(model, l).register_forward_hook(lambda _m, _a, _y, l=l: outputs[l]) for l in range(low, len(outputs))]
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def oracle_direct(model, batch, metric, *, method, corrupt=None, direction="denoising", per_position=False,
                  heads=None, positions=None, head_sets=None, frozen_ln=False, frozen_mlp=False) -> torch.Tensor:
    L, H = n_layers(model), n_heads(model)
    N, T = batch["input_ids"].shape
    z_clean, clean_logits = record_z(model, batch)
    base = corrupt if (method == "patch" and direction == "denoising") else batch
    z_base = record_z(model, base)[0]
    scale = final_norm_scale(model, base) if frozen_ln else None
    norm = (lambda: frozen_norm(model, scale)) if frozen_ln else contextlib.nullcontext
    mlp_base = mlp_outputs(model, base) if frozen_mlp else None
    if method == "zero":
        src = None
    elif method == "mean":
        src = masked_mean_z(z_clean, batch["attention_mask"])
    else:
        src = z_clean if direction == "denoising" else record_z(model, corrupt)[0]

    def run(cells):
        """cells: (layer, head, position or None) replaced by the source; later layers frozen."""
        low = min(l for l, _, _ in cells)
        own = {(l, h) for l, h, _ in cells}
        edits = [(l2, h2, None, z_base[l2][:, :, h2]) for l2 in range(low + 1, L) for h2 in range(H) if (l2, h2) not in own]
        edits += [(l, h, p, None if src is None else src[l][:, :, h]) for l, h, p in cells]
        mlps = frozen_mlps(model, mlp_base, low) if frozen_mlp else contextlib.nullcontext()
        with torch.no_grad(), replace_heads(model, edits), norm(), mlps:
            logits = model(**model_inputs(base)).logits
        return oracle_metric(metric, logits, base, clean_logits)

    if head_sets is not None:
        return torch.stack([run([(l, h, None) for l, h in s]) for s in head_sets])
    heads = range(H) if heads is None else heads
    if per_position:
        out = torch.full((L, H, T, N), float("nan"))
        for l, h, p in itertools.product(range(L), heads, range(T) if positions is None else positions):
            out[l, h, p] = run([(l, h, p)])
        return out
    out = torch.full((L, H, N), float("nan"))
    for l, h in itertools.product(range(L), heads):
        out[l, h] = run([(l, h, None)])
    return out


@pytest.mark.parametrize("method,direction", [("zero", None), ("mean", None), ("patch", "denoising"), ("patch", "noising")],
                         ids=["zero", "mean", "patch-denoising", "patch-noising"])
def test_direct_per_head_matches_oracle(model, method, direction):
    batch = make_batch(3, 7, seed=31, pad="left", lengths=[7, 5, 6])
    corrupt = corrupt_of(batch) if method == "patch" else None
    kw = dict(corrupt=corrupt, method=method, direction=direction or "denoising")
    r = headint.scan(model, batch, "logit_diff", effect="direct", progress=False, backend=BACKEND, **kw)
    assert r.settings["effect"] == "direct"
    expected = oracle_direct(model, batch, "logit_diff", **kw)
    assert_matches(r, expected)
    total = headint.scan(model, batch, "logit_diff", progress=False, backend=BACKEND, **kw)
    # the last layer has nothing after it: direct == total, bit for bit
    assert torch.equal(r.per_example[-1], total.per_example[-1])
    # below it, freezing later heads changes the values (the test can fail)
    assert (r.per_example[:-1] - total.per_example[:-1]).abs().max() > 1e-3


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_direct_per_position_matches_oracle(model, direction):
    batch = make_batch(2, 6, seed=32)
    corrupt = corrupt_of(batch)
    kw = dict(corrupt=corrupt, method="patch", direction=direction, per_position=True, heads=[2])
    r = headint.scan(model, batch, "kl", effect="direct", progress=False, backend=BACKEND, batch_size=4, **kw)
    expected = oracle_direct(model, batch, "kl", **{k: v for k, v in kw.items()})
    assert_matches(r, expected)


def test_direct_head_sets_match_oracle(model):
    """A set spanning layers: the lower layer's other heads are not frozen; at the upper
    layer the set's own head takes the source value, the others are frozen."""
    batch = make_batch(3, 6, seed=33)
    corrupt = corrupt_of(batch)
    sets = [[(0, 1), (1, 2)], [(0, 0), (0, 3)], [(1, 1), (2, 0)]]
    r = headint.scan(model, batch, "logprob", corrupt=corrupt, method="patch", direction="noising", head_sets=sets,
                     effect="direct", progress=False, backend=BACKEND)
    expected = oracle_direct(model, batch, "logprob", method="patch", corrupt=corrupt, direction="noising", head_sets=sets)
    assert torch.allclose(r.per_example, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["q", "v"])
def test_direct_qkv_matches_oracle(model, which):
    batch = make_batch(3, 6, seed=34)
    result, expected = scan_and_oracle(model, batch, which, "patch", "noising", effect="direct")
    assert_matches(result, expected)


FROZEN = {"direct_frozen_ln": dict(frozen_ln=True), "direct_path": dict(frozen_ln=True, frozen_mlp=True)}


@pytest.mark.parametrize("effect", list(FROZEN))
@pytest.mark.parametrize("method,direction", [("zero", None), ("mean", None), ("patch", "denoising"), ("patch", "noising")],
                         ids=["zero", "mean", "patch-denoising", "patch-noising"])
def test_direct_frozen_ln_per_head_matches_oracle(model, method, direction, effect):
    """Left padding, rows of different lengths; the frozen-scale oracle is the norm by hand."""
    batch = make_batch(3, 7, seed=31, pad="left", lengths=[7, 5, 6])
    corrupt = corrupt_of(batch) if method == "patch" else None
    kw = dict(corrupt=corrupt, method=method, direction=direction or "denoising")
    r = headint.scan(model, batch, "logit_diff", effect=effect, progress=False, backend=BACKEND, **kw)
    assert r.settings["effect"] == effect
    assert r.settings["final_norm"]["kind"] == ("LayerNorm" if hasattr(model, "transformer") else "RMSNorm")
    assert ("frozen_mlps" in r.settings) == (effect == "direct_path")
    expected = oracle_direct(model, batch, "logit_diff", **FROZEN[effect], **kw)
    assert_matches(r, expected)
    direct = headint.scan(model, batch, "logit_diff", effect="direct", progress=False, backend=BACKEND, **kw)
    # freezing the scale changes every layer's values, the last layer's too (the test can fail)
    assert (r.per_example[-1] - direct.per_example[-1]).abs().max() > 1e-4
    # ... and leaves the base run alone: the unintervened value is the same
    assert torch.equal(r.base_per_example, direct.base_per_example)


@pytest.mark.parametrize("effect", list(FROZEN))
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_direct_frozen_ln_per_position_matches_oracle(model, direction, effect):
    """Per position (position reuse and the last-query final block feed the norm and the MLPs
    fewer tokens)."""
    batch = make_batch(2, 6, seed=32)
    corrupt = corrupt_of(batch)
    kw = dict(corrupt=corrupt, method="patch", direction=direction, per_position=True, heads=[2])
    r = headint.scan(model, batch, "logit_diff", effect=effect, progress=False, backend=BACKEND, batch_size=4, **kw)
    expected = oracle_direct(model, batch, "logit_diff", **FROZEN[effect], **kw)
    assert_matches(r, expected)
    r_kl = headint.scan(model, batch, "kl", effect=effect, progress=False, backend=BACKEND, batch_size=4, **kw)
    assert_matches(r_kl, oracle_direct(model, batch, "kl", **FROZEN[effect], **kw))


@pytest.mark.parametrize("effect", list(FROZEN))
def test_direct_frozen_ln_head_sets_and_shortcuts_off(model, effect):
    batch = make_batch(3, 6, seed=33, pad="right", lengths=[6, 4, 5])
    corrupt = corrupt_of(batch)
    sets = [[(0, 1), (1, 2)], [(2, 0)], [(1, 1), (2, 3)]]
    kw = dict(corrupt=corrupt, method="patch", direction="noising", head_sets=sets)
    expected = oracle_direct(model, batch, "logprob", **FROZEN[effect], **kw)
    for shortcuts in (None, dict(clean_attention=False, last_query=False)):
        r = headint.scan(model, batch, "logprob", effect=effect, progress=False, backend=BACKEND, shortcuts=shortcuts, **kw)
        assert torch.allclose(r.per_example, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("effect", list(FROZEN))
def test_direct_frozen_ln_leaves_the_model_alone(model, effect):
    batch = make_batch(2, 5, seed=35)
    norm, mlps = final_norm_module(model), [mlp_module(model, l) for l in range(n_layers(model))]
    before = type(norm), dict(norm._forward_hooks), dict(norm._forward_pre_hooks)
    logits = model(**model_inputs(batch)).logits.detach()
    headint.scan(model, batch, "logit_diff", effect=effect, progress=False, backend=BACKEND)
    assert final_norm_module(model) is norm and (type(norm), dict(norm._forward_hooks), dict(norm._forward_pre_hooks)) == before
    assert [mlp_module(model, l) for l in range(n_layers(model))] == mlps and not any(m._forward_hooks for m in mlps)
    assert torch.equal(model(**model_inputs(batch)).logits, logits)


def test_direct_frozen_ln_gemma_style_norm():
    """An RMSNorm that scales by ``1 + w`` (Gemma's) is observed as such and frozen right."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    model = tiny_llama()
    norm = GemmaRMSNorm(model.config.hidden_size, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5)
    model.model.norm = norm
    batch = make_batch(3, 6, seed=39, pad="left", lengths=[6, 4, 5])
    corrupt = corrupt_of(batch)
    kw = dict(corrupt=corrupt, method="patch", direction="noising")
    r = headint.scan(model, batch, "logit_diff", effect="direct_frozen_ln", progress=False, backend=BACKEND, **kw)
    assert r.settings["final_norm"]["kind"] == "RMSNorm" and r.settings["final_norm"]["weight_offset"] == 1.0
    assert_matches(r, oracle_direct(model, batch, "logit_diff", frozen_ln=True, **kw))


def test_direct_frozen_ln_refuses_an_unknown_final_norm():
    """A final norm that is neither LayerNorm nor RMSNorm is refused, naming its class."""
    from headint.integration.final_norm import FinalNormError

    class ClippedNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x).clamp(-0.5, 0.5)

    model = tiny_gpt2()
    old = model.transformer.ln_f
    model.transformer.ln_f = ClippedNorm(old.normalized_shape, eps=old.eps)
    model.transformer.ln_f.load_state_dict(old.state_dict())
    with pytest.raises(FinalNormError, match="ClippedNorm"):
        headint.scan(model, make_batch(2, 5, seed=36), "logit_diff", effect="direct_frozen_ln", progress=False, backend=BACKEND)


# ------------------------------------------------------------------------ the embedded model


@pytest.fixture(scope="module")
def induction():
    from headint.tasks.induction import induction_prompts

    model = headint.models.load("induction-2l")
    p = induction_prompts(12, seq_len=32, vocab=model.config.vocab_size)
    clean = {"input_ids": p.clean, "target": p.target, "contrast": p.contrast}
    corrupt = {"input_ids": p.corrupted, "target": p.target, "contrast": p.contrast}
    return model, clean, corrupt


@pytest.mark.parametrize("method", ["mean", "patch"])
def test_embedded_direct_vs_total(induction, method):
    """Attention-only, 2 layers: layer-1 heads have nothing after them (direct == total); L0H0,
    the previous-token head the induction heads read, acts almost only through them."""
    model, clean, corrupt = induction
    kw = dict(method=method, corrupt=corrupt if method == "patch" else None, direction="noising")
    both = headint.direct_vs_total(model, clean, LogitDiff(), progress=False, **kw)
    assert torch.equal(both.direct.per_example[1], both.total.per_example[1])
    assert torch.equal(both.indirect[1], torch.zeros(4))
    total, direct = float(both.total.effect[0, 0]), float(both.direct.effect[0, 0])
    assert total < -3.0, total
    assert abs(direct) < 0.2 * abs(total), (direct, total)
    assert float(both.indirect[0, 0]) == pytest.approx(total - direct)
    frame = both.to_frame()
    # columns named for what they hold: L0H0's total effect flows through the induction heads
    # (indirect), which is amplification, not self-repair
    assert list(frame.columns) == ["layer", "head", "direct", "total", "indirect", "direct_frozen_ln", "final_norm",
                                   "direct_path", "through_mlps"] and len(frame) == 8
    # attention-only (its MLPs are zero): nothing flows through them
    assert both.direct_path.settings["effect"] == "direct_path" and not both.skipped
    assert torch.allclose(both.through_mlps, torch.zeros(2, 4), atol=1e-6)
    if method == "patch":
        # noising the induction heads: the recomputed final-LN scale takes back a share of their direct
        # effect (the frozen-scale effect is larger); see bench/results/direct_frozen_ln_induction.txt
        for h in (0, 2, 3):
            frozen, d = float(both.direct_frozen_ln.effect[1, h]), float(both.direct.effect[1, h])
            assert frozen < d < 0 and 0.2 < (d - frozen) / -frozen < 0.7, (h, frozen, d)
    assert frame.loc[0, "total"] == pytest.approx(total)
    assert frame.loc[0, "indirect"] == pytest.approx(total - direct) and frame.loc[0, "indirect"] < -3.0
    assert not hasattr(both, "self_repair")


def test_direct_vs_total_decomposition(model):
    """On models with MLPs: four scans, each source the difference of two, summing to the total."""
    batch = make_batch(3, 6, seed=37)
    corrupt = corrupt_of(batch)
    kw = dict(corrupt=corrupt, method="patch", direction="noising", progress=False, backend=BACKEND)
    both = headint.direct_vs_total(model, batch, "logit_diff", **kw)
    assert not both.skipped and both.direct_path is not both.direct_frozen_ln
    assert both.direct_path.settings["effect"] == "direct_path"
    parts = both.direct_path.effect + both.through_mlps + both.final_norm + both.through_heads
    assert torch.allclose(parts, both.total.effect, atol=1e-6)
    assert both.through_mlps.abs().max() > 1e-3 and both.final_norm.abs().max() > 1e-4
    expected = oracle_direct(model, batch, "logit_diff", method="patch", corrupt=corrupt, direction="noising",
                             frozen_ln=True, frozen_mlp=True)
    assert_matches(both.direct_path, expected)
    frame = both.to_frame()
    assert frame["through_mlps"].to_numpy() == pytest.approx(both.through_mlps.reshape(-1).numpy())


def test_direct_vs_total_skips_what_the_model_does_not_allow():
    """A final norm headint cannot freeze: by default the frozen scans are skipped, saying why;
    asked for, the error."""
    from headint.integration.final_norm import FinalNormError

    class ClippedNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x).clamp(-0.5, 0.5)

    model = tiny_gpt2()
    old = model.transformer.ln_f
    model.transformer.ln_f = ClippedNorm(old.normalized_shape, eps=old.eps)
    model.transformer.ln_f.load_state_dict(old.state_dict())
    batch = make_batch(2, 5, seed=38)
    both = headint.direct_vs_total(model, batch, "logit_diff", method="zero", progress=False, backend=BACKEND)
    assert both.direct_frozen_ln is None and both.direct_path is None
    assert set(both.skipped) == {"direct_frozen_ln", "direct_path"} and "ClippedNorm" in both.skipped["direct_frozen_ln"]
    assert list(both.to_frame().columns) == ["layer", "head", "direct", "total", "indirect"]
    with pytest.raises(ValueError, match="direct_frozen_ln"):
        both.final_norm
    for kw in (dict(frozen_ln=True), dict(frozen_mlps=True)):
        with pytest.raises(FinalNormError, match="ClippedNorm"):
            headint.direct_vs_total(model, batch, "logit_diff", method="zero", progress=False, backend=BACKEND, **kw)


def test_direct_vs_total_arguments(induction):
    model, clean, _ = induction
    with pytest.raises(TypeError, match="frozen_ln must be"):
        headint.direct_vs_total(model, clean, LogitDiff(), frozen_ln="yes")
    with pytest.raises(ValueError, match="frozen_ln=False contradicts"):
        headint.direct_vs_total(model, clean, LogitDiff(), frozen_ln=False, frozen_mlps=True)
    with pytest.raises(TypeError, match="do not pass effect="):
        headint.direct_vs_total(model, clean, LogitDiff(), effect="direct")
    with pytest.raises(ValueError, match="head_sets are not supported"):
        headint.direct_vs_total(model, clean, LogitDiff(), head_sets=[[(0, 0)]])
