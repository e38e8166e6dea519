"""Whole models with the new attention operands (issue #11), on every kernel backend and the
reference, against an eager oracle of the tests' own:

- tiny Gemma 2 with ``attn_logit_softcapping`` (soft-capping; alternating sliding-window layers),
- tiny gpt-oss (attention sinks, sliding-window layers, GQA),
- tiny DeepSeek-V3 (MLA: value head dim 12, query/key head dim 24 = 16 nope + 8 rope),

all built from ``transformers`` configs. The oracle runs the model with ``transformers``' own
eager attention: head-output edits (``Ablate`` zero / mean, ``Patch``, ``Scale`` output) are
forward pre-hooks on the output projection editing one head's ``v_head_dim`` slice; score edits
(``Scale`` scores, ``Knockout``) go through an attention function registered under another
name that scales the head's query (the scores, before the soft-cap) or adds ``-inf`` to the
removed edges of the mask, then calls the model module's own ``eager_attention_forward``.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
import transformers

import headint
from headint import Ablate, Knockout, Patch, Scale
from headint.integration.structure import model_shape
from headint.ops import BackendUnavailable

B, T, VOCAB = 3, 8, 64
ATOL = 1e-4
BACKENDS = ("reference", "cpu", "triton")
ORACLE = "headint_k11_eager_oracle"


def _common(**extra):
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, initializer_range=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(extra)
    return cfg


def _finish(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_gemma2():
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(**_common(num_key_value_heads=2, head_dim=8, attn_logit_softcapping=1.5,
                                              query_pre_attn_scalar=8, sliding_window=4))
    return _finish(transformers.Gemma2ForCausalLM(cfg))


def make_gpt_oss():
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(**_common(intermediate_size=32, num_key_value_heads=2, head_dim=8,
                                              num_local_experts=4, num_experts_per_tok=2, sliding_window=4))
    model = _finish(transformers.GptOssForCausalLM(cfg))
    g = torch.Generator().manual_seed(5)
    for layer in model.model.layers:  # sinks large enough to matter (the init is ~0.1)
        layer.self_attn.sinks.copy_(torch.randn(4, generator=g) * 1.5)
    return model


def make_deepseek_v3():
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(**_common(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1))
    return _finish(transformers.DeepseekV3ForCausalLM(cfg))


FACTORIES = {"gemma2": make_gemma2, "gpt_oss": make_gpt_oss, "deepseek_v3": make_deepseek_v3}
_MODELS: dict = {}


def get(name):
    if name not in _MODELS:
        _MODELS[name] = FACTORIES[name]()
    return _MODELS[name]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ids(seed):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


CLEAN, CORRUPT = _ids(1), _ids(2)


# ---------------------------------------------------------------------------------------------
# the oracle

def _o_proj(model, layer):
    return model.model.layers[layer].self_attn.o_proj


def _v_head_dim(model):
    return getattr(model.config, "v_head_dim", None) or model.config.head_dim


@contextlib.contextmanager
def _eager(model, attn=None):
    before = model.config._attn_implementation
    model.set_attn_implementation(attn or "eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def _head_edits(model, edits):
    """``edits``: ``{layer: fn(z [B, T, H, Dv]) -> z}`` applied at the input of the output projection."""
    H, Dv = model.config.num_attention_heads, _v_head_dim(model)

    def make(fn):
        def hook(_m, args):
            x = args[0]
            z = fn(x.reshape(x.shape[0], x.shape[1], H, Dv).clone())
            return (z.reshape(x.shape),)
        return hook

    handles = [_o_proj(model, l).register_forward_pre_hook(make(fn)) for l, fn in edits.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


_SCORE_EDITS: list[dict] = []


def _oracle_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention, with this layer's score edits: ``("scale", head, f)``
    scales the head's query (hence its scores, before any soft-cap); ``("knockout", head,
    queries, keys)`` adds ``-inf`` to those edges of the additive mask."""
    edits = _SCORE_EDITS[-1].get(module.layer_idx, [])
    query = query.clone()
    mask = attention_mask[:, :, :, : key.shape[2]].expand(query.shape[0], query.shape[1], -1, -1).clone()
    for e in edits:
        if e[0] == "scale":
            query[:, e[1]] *= e[2]
        else:
            _, h, qs, ks = e
            mask[:, h, qs[:, None], ks[None, :]] = float("-inf")
    eager = sys.modules[type(module).__module__].eager_attention_forward
    kwargs.pop("sliding_window", None)  # already in the mask
    return eager(module, query, key, value, mask, **kwargs)


def _register_oracle():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ORACLE, _oracle_attention)
    AttentionMaskInterface.register(ORACLE, eager_mask)


def _mean_z(cache, layer):
    return cache.tensors[("z", layer)].mean(0)  # [T, H, Dv]: no padding here


def oracle_logits(model, ids, ivs):
    """Logits of ``ids`` under ``ivs`` from the eager model plus hooks / score edits."""
    score_edits: dict[int, list] = {}
    head_edits: dict[int, list] = {}
    for iv in ivs:
        if isinstance(iv, Knockout):
            score_edits.setdefault(iv.layer, []).append(("knockout", iv.head, torch.tensor(iv.queries), torch.tensor(iv.keys)))
        elif isinstance(iv, Scale) and iv.target == "scores":
            score_edits.setdefault(iv.layer, []).append(("scale", iv.head, iv.factor))
        elif isinstance(iv, Scale):
            head_edits.setdefault(iv.layer, []).append((iv.head, lambda z, f=iv.factor: z * f))
        elif isinstance(iv, Ablate) and iv.kind == "zero":
            head_edits.setdefault(iv.layer, []).append((iv.head, lambda z: torch.zeros_like(z)))
        elif isinstance(iv, Ablate):
            head_edits.setdefault(iv.layer, []).append((iv.head, lambda z, m=_mean_z(iv.value, iv.layer): m.expand_as(z)))
        elif isinstance(iv, Patch):
            head_edits.setdefault(iv.layer, []).append(
                (iv.head, lambda z, s=iv.source.tensors[("z", iv.layer)]: s.expand_as(z)))
        else:
            raise AssertionError(f"the oracle does not know {iv}")

    def layer_fn(items):
        def fn(z):
            for head, edit in items:
                z[:, :, head] = edit(z.clone())[:, :, head]
            return z
        return fn

    _register_oracle()
    _SCORE_EDITS.append(score_edits)
    try:
        with _eager(model, ORACLE if score_edits else "eager"), \
                _head_edits(model, {l: layer_fn(items) for l, items in head_edits.items()}), torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        _SCORE_EDITS.pop()


def headint_logits(model, ids, ivs, backend):
    with headint.intervene(model, ivs, backend=backend), torch.no_grad():
        out = model(input_ids=ids).logits
    assert headint.last_backend() == backend
    return out


def _require(backend):
    if backend == "reference":
        return
    reason = headint.ops.backends.unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


# ---------------------------------------------------------------------------------------------
# tests

NAMES = list(FACTORIES)


@pytest.mark.parametrize("name", NAMES)
def test_model_shape_carries_the_value_head_dim(name):
    s = model_shape(get(name))
    assert (s.n_layers, s.n_heads) == (2, 4)
    assert (s.head_dim, s.v_head_dim) == ((24, 12) if name == "deepseek_v3" else (8, 8))
    assert s.n_kv_heads == (4 if name == "deepseek_v3" else 2)


@pytest.mark.parametrize("name", NAMES)
def test_oracle_reproduces_the_model(name):
    """The eager oracle without edits is the model; score edits of factor 1 change nothing."""
    model = get(name)
    with _eager(model), torch.no_grad():
        plain = model(input_ids=CLEAN).logits
    torch.testing.assert_close(oracle_logits(model, CLEAN, []), plain)
    torch.testing.assert_close(oracle_logits(model, CLEAN, [Scale(layer=0, head=1, target="scores", factor=1.0)]), plain,
                               atol=1e-6, rtol=1e-6)


def _interventions(model):
    cache = headint.record(model, CORRUPT, what=("z",), backend="reference")
    return {
        "ablate_zero": [Ablate(layer=1, head=2)],
        "ablate_mean": [Ablate(layer=0, head=1, kind="mean", value=cache)],
        "patch": [Patch(layer=1, head=0, source=cache)],
        "scale_output": [Scale(layer=0, head=3, factor=0.3)],
        "scale_scores": [Scale(layer=1, head=1, target="scores", factor=2.5)],
        "knockout": [Knockout(queries=[T - 1, T - 2, T - 3], keys=[0, 1, 2, 4], layer=0, head=2)],
        "all": [Ablate(layer=0, head=0), Patch(layer=1, head=3, source=cache), Scale(layer=0, head=2, factor=1.7),
                Scale(layer=1, head=1, target="scores", factor=0.4),
                Knockout(queries=[5, 6, 7], keys=[0, 1], layer=1, head=2)],
    }


KINDS = ["ablate_zero", "ablate_mean", "patch", "scale_output", "scale_scores", "knockout", "all"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_interventions_match_the_eager_oracle(name, backend, kind):
    _require(backend)
    model = get(name)
    ivs = _interventions(model)[kind]
    want = oracle_logits(model, CLEAN, ivs)
    try:
        got = headint_logits(model, CLEAN, ivs, backend)
    except BackendUnavailable as e:  # pragma: no cover - every backend here takes these operands
        pytest.fail(f"{backend} refused {name}: {e}")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    plain = oracle_logits(model, CLEAN, [])
    assert (got - plain).abs().max() > 1e-3, "the intervention changed nothing: a vacuous comparison"


@pytest.mark.parametrize("name", NAMES)
def test_recorded_head_outputs_have_the_value_head_dim(name):
    model = get(name)
    cache = headint.record(model, CLEAN, what=("z",), backend="reference")
    seen = {}

    def grab(layer):
        def fn(z):
            seen[layer] = z.clone()
            return z
        return fn

    with _eager(model), _head_edits(model, {0: grab(0), 1: grab(1)}), torch.no_grad():
        model(input_ids=CLEAN)
    for layer in (0, 1):
        z = cache.tensors[("z", layer)]
        assert z.shape == (B, T, 4, _v_head_dim(model))
        torch.testing.assert_close(z, seen[layer], atol=1e-5, rtol=1e-5)


def _oracle_zero_scan(model, ids, target, contrast):
    """``[L, H, N]`` logit differences at the last position with one head zero-ablated per run."""
    out = torch.empty(2, 4, ids.shape[0])
    rows = torch.arange(ids.shape[0])
    for layer in range(2):
        for head in range(4):
            logits = oracle_logits(model, ids, [Ablate(layer=layer, head=head)])[:, -1]
            out[layer, head] = logits[rows, target] - logits[rows, contrast]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_scan_matches_the_eager_oracle(name, backend):
    _require(backend)
    model = get(name)
    g = torch.Generator().manual_seed(9)
    target, contrast = torch.randint(3, VOCAB, (B,), generator=g), torch.randint(3, VOCAB, (B,), generator=g)
    batch = {"input_ids": CLEAN, "target": target, "contrast": contrast}
    result = headint.scan(model, batch, "logit_diff", method="zero", progress=False, backend=backend)
    want = _oracle_zero_scan(model, CLEAN, target, contrast)
    got = result.per_example
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
