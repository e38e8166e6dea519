"""Absolute positions under every KV-cache class ``transformers`` ships (issue 22, item 2).

``Ablate(positions=...)`` and ``Knockout`` inside ``generate(cache_implementation=...)`` and
inside chunked forwards on an explicit cache, against an oracle that shares no code with
headint and uses no cache at all: ``generate(use_cache=False)`` (every step a full forward, so
a token's absolute position is its index) with a forward pre-hook on the output projection
(head outputs zeroed at absolute positions) and an eager attention function of our own that
removes edges between absolute positions. fp32, 1e-4.

The caches (``transformers.cache_utils``): ``DynamicCache`` with ``DynamicLayer`` (Llama),
``DynamicSlidingWindowLayer`` (Mistral, window 4 < the prompt, or 8: filled while generating) and both (Gemma 2, hybrid);
``StaticCache`` with ``StaticLayer`` and ``StaticSlidingWindowLayer`` (also through the
deprecated ``"hybrid"``/``"sliding_window"`` names, the same class); ``QuantizedCache`` with the
``fp8`` backend (the only one that runs without optional packages; its oracle is the model's own
attention with the same quantized cache); the offloaded dynamic and static caches (they need
CUDA streams: run where CUDA is). ``EncoderDecoderCache`` is covered in
``test_cross_attention_positions.py``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers

from headint import Ablate, Knockout, intervene

import tiny_models as tm

PROMPT, NEW = 6, 6  # positions 0..5 prompt, 6..10 generated and fed back
ORACLE = "headint_test_cache_oracle"
TOL = dict(atol=1e-4, rtol=1e-4)

IVS = [
    Ablate(layer=0, head=1, positions=[1, 4, 7, 9]),
    Ablate(layer=1, head=[0, 3], positions=[5, 8, 10]),
    Knockout(queries=[7, 8, 9, 10], keys=[0, 2, 5, 6], layer=1, head=2),
    Knockout(queries=[3, 9], keys=[1, 8], layer=0, head=0),
]
ZEROED = [(0, [1], [1, 4, 7, 9]), (1, [0, 3], [5, 8, 10])]  # (layer, heads, absolute positions)
REMOVED = [(1, 2, [7, 8, 9, 10], [0, 2, 5, 6]), (0, 0, [3, 9], [1, 8])]  # (layer, head, queries, keys)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with tm.one_thread():
        yield


def make_gemma2(seed: int = 0) -> tm.Tiny:
    """Gemma 2: layer 0 sliding-window (4), layer 1 global; soft-capped scores."""
    torch.manual_seed(seed)
    cfg = transformers.Gemma2Config(
        vocab_size=tm.VOCAB, hidden_size=tm.HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
        initializer_range=tm.INIT_RANGE, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = tm._finish(transformers.Gemma2ForCausalLM(cfg))
    return tm.Tiny(model, lambda l: model.model.layers[l].self_attn.o_proj, 8, 4, 2)


_MODELS: dict[str, tm.Tiny] = {}


def tiny(name: str) -> tm.Tiny:
    if name not in _MODELS:
        _MODELS[name] = (make_gemma2() if name == "gemma2" else tm.make_mistral(sliding_window=8) if name == "mistral8"
                         else tm.FACTORIES[name]())
    return _MODELS[name]


# ------------------------------------------------------------------------------------------------
# the oracle: no headint, no cache positions to get wrong

_REMOVED: list = []


def _oracle_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                    sliding_window=None, softcap=None, **kwargs):
    """Eager attention. Queries sit at ``Tk - Tq ..``, keys at ``0 .. Tk - 1`` (a full forward,
    or a full-attention dynamic cache); edges in ``_REMOVED[-1]`` are removed."""
    B, H, Tq, D = query.shape
    Tk = key.shape[2]
    k = key.repeat_interleave(H // key.shape[1], dim=1)
    v = value.repeat_interleave(H // value.shape[1], dim=1)
    scores = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else D ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores, keep = tm.apply_mask(scores, attention_mask, causal=True)
    q_pos = list(range(Tk - Tq, Tk))
    for layer, head, qs, ks in (_REMOVED[-1] if _REMOVED else []):
        if layer == module.layer_idx:
            for i, qp in enumerate(q_pos):
                if qp in qs:
                    keep[:, head, i, [kp for kp in ks if kp < Tk]] = False
    probs = torch.nan_to_num(torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1), nan=0.0)  # padding queries read nothing
    return (probs @ v).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def oracle(t: tm.Tiny, zeroed=ZEROED, removed=REMOVED, full_forwards: bool = True):
    """The model with the oracle attention; head outputs zeroed at absolute positions by a
    pre-hook on each output projection (``full_forwards``: every forward starts at position 0;
    else positions run on across the forwards of one generate call)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ORACLE, _oracle_forward)
    AttentionMaskInterface.register(ORACLE, eager_mask)
    seen = {l: 0 for l in range(2)}

    def make(layer):
        def hook(_m, args):
            x = args[0]
            b, tq, _ = x.shape
            start = 0 if full_forwards else seen[layer]
            seen[layer] = start + tq
            z = x.reshape(b, tq, t.n_heads, -1).clone()
            for l, heads, positions in zeroed:
                for p in positions:
                    if l == layer and start <= p < start + tq:
                        z[:, p - start, heads] = 0
            return (z.reshape(b, tq, -1),)
        return hook

    before = t.model.config._attn_implementation
    handles = [t.out_proj(l).register_forward_pre_hook(make(l)) for l in range(2)]
    _REMOVED.append(removed)
    t.model.set_attn_implementation(ORACLE)
    try:
        yield
    finally:
        t.model.set_attn_implementation(before)
        _REMOVED.pop()
        for h in handles:
            h.remove()


def _prompt(seed: int = 5) -> torch.Tensor:
    return torch.randint(3, tm.VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, num_beams=1, output_scores=True, return_dict_in_generate=True,
                              pad_token_id=0, eos_token_id=None, **kw)


def assert_same(got, want):
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def _oracle_reproduces_model(t, ids):
    plain = generate(t.model, ids, use_cache=False)
    with oracle(t, zeroed=[], removed=[]):
        assert_same(generate(t.model, ids, use_cache=False), plain)


# ------------------------------------------------------------------------------------------------
# generate(cache_implementation=...)

CASES = [
    ("llama", None), ("llama", "dynamic"), ("llama", "static"),
    ("mistral", None), ("mistral", "static"), ("mistral", "sliding_window"),
    ("mistral8", "static"),  # window 8: the static sliding layer fills up during generation
    ("gemma2", None), ("gemma2", "static"), ("gemma2", "hybrid"),
]


@pytest.mark.parametrize("name,impl", CASES)
def test_generate_positions_under_each_cache(name, impl):
    t = tiny(name)
    ids = _prompt()
    _oracle_reproduces_model(t, ids)
    with oracle(t):
        want = generate(t.model, ids, use_cache=False)
    kw = {} if impl is None else {"cache_implementation": impl}
    with intervene(t.model, IVS, backend="reference"):
        got = generate(t.model, ids, **kw)
    assert_same(got, want)
    # not vacuous: the interventions change the scores
    plain = generate(t.model, ids, **kw)
    assert max(float((a - b).abs().max()) for a, b in zip(got.scores, plain.scores)) > 1e-2
    # and without interventions the cache gives the model's own generation
    with intervene(t.model, [], backend="reference"):
        assert_same(generate(t.model, ids, **kw), plain)


def test_static_cache_from_generation_config():
    """``cache_implementation`` set in the model's generation config, a cache larger than needed
    (``max_cache_len``), and the default (auto) backend."""
    t = tiny("llama")
    ids = _prompt(seed=11)
    with oracle(t):
        want = generate(t.model, ids, use_cache=False)
    gc = t.model.generation_config
    saved = (gc.cache_implementation, gc.max_cache_len)
    gc.cache_implementation, gc.max_cache_len = "static", 40
    try:
        with intervene(t.model, IVS):
            got = generate(t.model, ids)
    finally:
        gc.cache_implementation, gc.max_cache_len = saved
    assert_same(got, want)


def test_quantized_fp8_cache():
    """``QuantizedCache(backend="fp8")``: the oracle is the model's own eager attention with the same
    quantized cache (keys and values are rounded alike), positions counted across the forwards."""
    t = tiny("llama")
    ids = _prompt(seed=3)
    kw = dict(cache_implementation="quantized", cache_config={"backend": "fp8"})
    with oracle(t, full_forwards=False):
        want = generate(t.model, ids, **kw)
    with intervene(t.model, IVS, backend="reference"):
        got = generate(t.model, ids, **kw)
    assert_same(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloaded caches prefetch on CUDA streams")
@pytest.mark.parametrize("impl", ["offloaded", "offloaded_static"])
def test_offloaded_caches(impl):
    t = tiny("llama")
    model = t.model.cuda()
    try:
        ids = _prompt().cuda()
        with oracle(t):
            want = generate(model, ids, use_cache=False)
        with intervene(model, IVS, backend="reference"):
            got = generate(model, ids, cache_implementation=impl)
        assert_same(got, want)
    finally:
        t.model.cpu()


# ------------------------------------------------------------------------------------------------
# chunked forwards on an explicit cache: several new tokens after a prefill


@pytest.mark.parametrize("name", ["llama", "mistral", "mistral8", "gemma2"])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_chunked_forwards_on_an_explicit_cache(name, kind):
    """Forwards of 5, 3, 1 and 2 tokens on one cache (a static sliding layer that is already full
    takes several new tokens), each chunk's logits against one full forward of the oracle."""
    t = tiny(name)
    ids = torch.randint(3, tm.VOCAB, (2, 11), generator=torch.Generator().manual_seed(8))
    with oracle(t), torch.no_grad():
        want = t.model(input_ids=ids, use_cache=False).logits
    cfg = t.model.config
    cache = transformers.DynamicCache(config=cfg) if kind == "dynamic" else transformers.StaticCache(config=cfg, max_cache_len=16)
    outs, start = [], 0
    with intervene(t.model, IVS, backend="reference"), torch.no_grad():
        for n in (5, 3, 1, 2):
            chunk = ids[:, start : start + n]
            mask = torch.ones(2, start + n, dtype=torch.long)
            outs.append(t.model(input_ids=chunk, attention_mask=mask, cache=cache, use_cache=True).logits)
            start += n
    torch.testing.assert_close(torch.cat(outs, 1), want, **TOL)


@pytest.mark.parametrize("name", ["llama", "mistral8"])
def test_left_padded_batch_with_a_static_cache(name):
    """Positions count the padding (absolute indices of the padded input), as with a dynamic cache."""
    t = tiny(name)
    ids = _prompt(seed=7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    kw = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, num_beams=1,
              output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    with oracle(t), torch.no_grad():
        want = t.model.generate(input_ids=ids, use_cache=False, **kw)
    with intervene(t.model, IVS, backend="reference"), torch.no_grad():
        got = t.model.generate(input_ids=ids, cache_implementation="static", **kw)
    assert_same(got, want)
