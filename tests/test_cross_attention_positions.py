"""Cross-attention positions (issue 22, item 3): on ``stack="decoder.cross"`` a call's queries
are decoder positions and its keys encoder positions, whatever the two lengths.

The oracle shares no code with headint: forward pre-hooks on the cross-attention output
projections (head outputs edited at decoder positions) and an eager attention function of our
own that removes edges between decoder queries and encoder keys; in ``generate`` it runs without
a cache (every step a full decoder forward). fp32, 1e-4. A tiny BART, encoder 8 tokens,
decoder 5 (so an offset of encoder minus decoder length would show).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers

import headint
from headint import Ablate, Knockout, Patch, intervene

import tiny_models as tm

T_ENC, T_DEC = 8, 5
ORACLE = "headint_test_cross_oracle"
TOL = dict(atol=1e-4, rtol=1e-4)
H, D = 4, 8


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with tm.one_thread():
        yield


@pytest.fixture(scope="module")
def bart():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=tm.VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=H,
        decoder_attention_heads=H, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=tm.INIT_RANGE,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None,
    )
    return tm._finish(transformers.BartForConditionalGeneration(cfg))


def cross(model, layer):
    return model.model.decoder.layers[layer].encoder_attn


def self_attn(model, layer):
    return model.model.decoder.layers[layer].self_attn


def inputs(seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(3, tm.VOCAB, (B, T_ENC), generator=g),
                decoder_input_ids=torch.randint(3, tm.VOCAB, (B, T_DEC), generator=g))


def logits(model, inp):
    with torch.no_grad():
        return model(**inp, use_cache=False).logits


_SPEC: list = []


def _oracle_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Eager attention; self-attention queries at ``Tk - Tq ..``; for the modules in the spec
    (cross-attention: queries at decoder positions ``0 ..``, keys at encoder positions) the listed
    edges are removed."""
    B, Hq, Tq, Dh = query.shape
    Tk = key.shape[2]
    scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else Dh ** -0.5)
    scores, keep = tm.apply_mask(scores, attention_mask, is_causal if is_causal is not None else getattr(module, "is_causal", False))
    for mod, head, qs, ks in (_SPEC[-1] if _SPEC else []):
        if mod is module:
            for q in qs:
                if q < Tq:
                    keep[:, head, q, ks] = False
    probs = torch.nan_to_num(torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1), nan=0.0)
    return (probs @ value).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def oracle(model, edits=(), removed=()):
    """``edits``: ``(module, fn(z [B, Tq, H, D]) -> z)`` at the module's output projection's input
    (decoder positions: a full decoder forward); ``removed``: ``(module, head, queries, keys)``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ORACLE, _oracle_forward)
    AttentionMaskInterface.register(ORACLE, eager_mask)

    def make(fn):
        def hook(_m, args):
            x = args[0]
            return (fn(x.reshape(*x.shape[:2], H, D).clone()).reshape(x.shape),)
        return hook

    handles = [mod.out_proj.register_forward_pre_hook(make(fn)) for mod, fn in edits]
    _SPEC.append(list(removed))
    before = model.config._attn_implementation
    model.set_attn_implementation(ORACLE)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
        _SPEC.pop()
        for h in handles:
            h.remove()


def at(positions, head, fn):
    def edit(z):
        for p in positions:
            if p < z.shape[1]:
                z[:, p, head] = fn(z[:, p, head], p)
        return z
    return edit


def test_oracle_reproduces_the_model(bart):
    x = inputs()
    with oracle(bart):
        torch.testing.assert_close(logits(bart, x), logits(bart, x), **TOL)


def test_ablate_at_decoder_positions(bart):
    x = inputs()
    with intervene(bart, [Ablate(layer=1, head=2, positions=[3, 4], stack="decoder.cross")], backend="reference"):
        got = logits(bart, x)
    with oracle(bart, edits=[(cross(bart, 1), at([3, 4], 2, lambda z, p: torch.zeros_like(z)))]):
        want = logits(bart, x)
    torch.testing.assert_close(got, want, **TOL)
    assert (got - logits(bart, x)).abs().max() > 1e-2


def test_knockout_decoder_queries_encoder_keys(bart):
    x = inputs()
    ivs = [Knockout(queries=[3, 4], keys=[0, 5, 6], layer=0, head=1, stack="decoder.cross"),
           Knockout(queries=[0], keys=[7], layer=1, head=3, stack="decoder.cross")]
    with intervene(bart, ivs, backend="reference"):
        got = logits(bart, x)
    with oracle(bart, removed=[(cross(bart, 0), 1, [3, 4], [0, 5, 6]), (cross(bart, 1), 3, [0], [7])]):
        want = logits(bart, x)
    torch.testing.assert_close(got, want, **TOL)
    assert (got - logits(bart, x)).abs().max() > 1e-3


def _z_of(model, inp, module):
    store = {}

    def grab(_m, args):
        store["z"] = args[0].reshape(*args[0].shape[:2], H, D).clone()

    h = module.out_proj.register_forward_pre_hook(grab)
    try:
        logits(model, inp)
    finally:
        h.remove()
    return store["z"]


def test_patch_and_mean_ablate_from_a_cross_recording(bart):
    x, other = inputs(0), inputs(7)
    cache = headint.record(bart, other, what=("z",), stack="decoder.cross")
    zo = _z_of(bart, other, cross(bart, 1))
    torch.testing.assert_close(cache["z", 1], zo, **TOL)
    with intervene(bart, [Patch(layer=1, head=0, positions=[2, 4], source=cache, stack="decoder.cross")], backend="reference"):
        got = logits(bart, x)
    with oracle(bart, edits=[(cross(bart, 1), at([2, 4], 0, lambda z, p: zo[:, p, 0]))]):
        want = logits(bart, x)
    torch.testing.assert_close(got, want, **TOL)
    with intervene(bart, [Ablate(layer=1, head=3, kind="mean", value=cache, stack="decoder.cross")], backend="reference"):
        got = logits(bart, x)
    with oracle(bart, edits=[(cross(bart, 1), at(range(T_DEC), 3, lambda z, p: zo[:, p, 3].mean(0)))]):
        want = logits(bart, x)
    torch.testing.assert_close(got, want, **TOL)


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, num_beams=1, output_scores=True, return_dict_in_generate=True,
                              eos_token_id=None, **kw)


@pytest.mark.parametrize("impl", [None, "static"])
def test_generate_cross_and_self_positions(bart, impl):
    """generate (decoder positions 0, 1, ... one per step) with a dynamic or static
    ``EncoderDecoderCache``: cross-attention ablated and knocked out at decoder positions, the
    decoder's self-attention ablated at absolute positions."""
    ids = inputs()["input_ids"]
    ivs = [Ablate(layer=0, head=1, positions=[1, 3, 5], stack="decoder.cross"),
           Knockout(queries=[2, 4], keys=[1, 6], layer=1, head=2, stack="decoder.cross"),
           Ablate(layer=1, head=0, positions=[2, 4])]
    with oracle(bart, edits=[(cross(bart, 0), at([1, 3, 5], 1, lambda z, p: torch.zeros_like(z))),
                             (self_attn(bart, 1), at([2, 4], 0, lambda z, p: torch.zeros_like(z)))],
                removed=[(cross(bart, 1), 2, [2, 4], [1, 6])]):
        want = _generate(bart, ids, use_cache=False)
    kw = {} if impl is None else {"cache_implementation": impl}
    with intervene(bart, ivs, backend="reference"):
        got = _generate(bart, ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    plain = _generate(bart, ids, **kw)
    assert max(float((a - b).abs().max()) for a, b in zip(got.scores, plain.scores)) > 1e-2
