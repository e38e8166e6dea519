"""Tiny, seeded ``transformers`` models for the integration tests, plus test-only oracles.

Every factory builds a 2-layer, 4-head, hidden-32 model from its config (no download),
in ``eval()`` mode with the default attention implementation (SDPA), and returns a
:class:`Tiny`: ``(model, out_proj, head_dim, n_heads, n_kv_heads)`` where
``out_proj(layer)`` is the module whose *input* is the concatenation of that layer's head
outputs (GPT-2 ``c_proj``, Llama/Qwen2/Mistral ``o_proj``, BERT ``attention.output.dense``).

The oracles here are deliberately independent of headint:

- :func:`edit_heads` edits head slices at the input of the output projection with
  ``register_forward_pre_hook``;
- :func:`oracle_attention` is a small eager attention function registered in
  ``transformers.AttentionInterface`` under its own name, which can capture q/k/v,
  swap q/k/v slices, scale scores and remove edges explicitly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import torch
import transformers

VOCAB = 64
HIDDEN = 32
N_LAYERS = 2
N_HEADS = 4
INIT_RANGE = 0.25  # larger than the default so attention is peaked and interventions matter


class Tiny(NamedTuple):
    model: torch.nn.Module
    out_proj: Callable[[int], torch.nn.Module]
    head_dim: int
    n_heads: int
    n_kv_heads: int


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded (and do not fight other processes for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_gpt2(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=N_LAYERS, n_head=N_HEADS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=INIT_RANGE,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = _finish(transformers.GPT2LMHeadModel(cfg))
    return Tiny(model, lambda l: model.transformer.h[l].attn.c_proj, HIDDEN // N_HEADS, N_HEADS, N_HEADS)


def _llama_like(cls_cfg, cls_model, seed: int, **extra) -> Tiny:
    torch.manual_seed(seed)
    cfg = cls_cfg(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra,
    )
    model = _finish(cls_model(cfg))
    return Tiny(model, lambda l: model.model.layers[l].self_attn.o_proj, HIDDEN // N_HEADS, N_HEADS, 2)


def make_llama(seed: int = 0) -> Tiny:
    return _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM, seed)


def make_qwen2(seed: int = 0) -> Tiny:
    return _llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, seed)


MISTRAL_WINDOW = 4


def make_mistral(seed: int = 0, sliding_window: int | None = MISTRAL_WINDOW) -> Tiny:
    return _llama_like(transformers.MistralConfig, transformers.MistralForCausalLM, seed, sliding_window=sliding_window)


def make_bert(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=64, initializer_range=INIT_RANGE, pad_token_id=0,
    )
    model = _finish(transformers.BertForMaskedLM(cfg))
    return Tiny(model, lambda l: model.bert.encoder.layer[l].attention.output.dense, HIDDEN // N_HEADS, N_HEADS, N_HEADS)


FACTORIES: dict[str, Callable[..., Tiny]] = {
    "gpt2": make_gpt2,
    "llama": make_llama,
    "qwen2": make_qwen2,
    "mistral": make_mistral,
    "bert": make_bert,
}
DECODERS = ("gpt2", "llama", "qwen2", "mistral")

_CACHE: dict[str, Tiny] = {}


def get(name: str) -> Tiny:
    """A shared instance per architecture (tests must leave it as they found it)."""
    if name not in _CACHE:
        _CACHE[name] = FACTORIES[name]()
    return _CACHE[name]


def is_decoder(name: str) -> bool:
    return name in DECODERS


def logits(model, input_ids, attention_mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


# ---------------------------------------------------------------------------------------------
# Oracle 1: forward pre-hooks at the input of the output projection


@contextlib.contextmanager
def edit_heads(tiny: Tiny, edits: dict[int, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Within the block, ``edits[layer](z)`` rewrites that layer's head outputs.

    ``z`` is ``[B, T, H, D]`` (a copy: the function may edit it in place and return it).
    """
    handles = []

    def make(layer):
        def hook(_module, args):
            (x,) = args
            B, T, _ = x.shape
            z = x.reshape(B, T, tiny.n_heads, tiny.head_dim).clone()
            z = edits[layer](z)
            return (z.reshape(B, T, -1),)

        return hook

    try:
        for layer in edits:
            handles.append(tiny.out_proj(layer).register_forward_pre_hook(make(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_z(tiny: Tiny, store: dict) -> Iterator[None]:
    """``store[layer]``: the head outputs ``[B, T, H, D]`` entering the output projection."""
    def make(layer):
        def hook(_module, args):
            x = args[0]
            store[layer] = x.reshape(x.shape[0], x.shape[1], tiny.n_heads, tiny.head_dim).detach().clone()

        return hook

    handles = [tiny.out_proj(l).register_forward_pre_hook(make(l)) for l in range(N_LAYERS)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Oracle 2: a plain eager attention function of our own, registered under its own name

ORACLE_NAME = "headint_test_oracle"


@dataclass
class OracleSpec:
    """What the oracle attention does (all indices absolute; one full forward, Tq == Tk).

    capture: filled with ``(layer, "q"|"k"|"v"|"probs") -> tensor`` (q ``[B, H, T, D]``,
    k/v ``[B, Hkv, T, D]``, probs ``[B, H, T, T]``).
    swap: ``(layer, which, heads, select [B|1, T] bool, source [B|1, Hx, T, D])``: replace
    those slices of q/k/v before attention.
    score_factor: ``layer -> {head: factor}`` multiplying the scaled scores.
    removed: ``layer -> list of (heads, queries [B|1, T] bool, keys [B|1, T] bool)``: edges
    ``i -> j`` removed where both selectors are true.
    """

    capture: dict = field(default_factory=dict)
    swap: list = field(default_factory=list)
    score_factor: dict = field(default_factory=dict)
    removed: dict = field(default_factory=dict)


_ACTIVE: list[OracleSpec] = []


def apply_mask(scores: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[B, H, Tq, Tk]`` with ``transformers``' 4D mask applied (bool, or additive floats),
    and the bool ``keep [B, H, Tq, Tk]`` of the keys each query may read; without a mask, causal
    (queries at the end of the keys) when ``causal``, else every key."""
    B, H, Tq, Tk = scores.shape
    keep = torch.ones(B, H, Tq, Tk, dtype=torch.bool)
    if attention_mask is not None:
        m = attention_mask[:, :, :, :Tk]
        if m.dtype == torch.bool:
            keep &= m
        else:
            scores = scores + m
            keep &= m > torch.finfo(m.dtype).min / 2
    elif causal:
        keep &= torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    return scores, keep


def _oracle_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                    sliding_window=None, softcap=None, **kwargs):
    spec = _ACTIVE[-1]
    layer = module.layer_idx
    B, H, Tq, D = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    assert Tq == Tk, "the oracle handles full forward passes only"
    tensors = {"q": query.clone(), "k": key.clone(), "v": value.clone()}
    for (l, which, heads, sel, src) in spec.swap:
        if l == layer:
            for h in heads:
                x = tensors[which]
                x[:, h] = torch.where(sel[:, :, None], src[:, h].to(x.dtype), x[:, h])
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    for w in ("q", "k", "v"):
        spec.capture[(layer, w)] = tensors[w].detach().clone()
    group = H // Hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = scaling if scaling is not None else D ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    for h, f in spec.score_factor.get(layer, {}).items():
        scores[:, h] = scores[:, h] * f
    scores, keep = apply_mask(scores, attention_mask, is_causal if is_causal is not None else getattr(module, "is_causal", False))
    for heads, qsel, ksel in spec.removed.get(layer, []):
        for h in heads:
            keep[:, h] &= ~(qsel[:, :, None] & ksel[:, None, :])
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with every key removed: all zeros
    spec.capture[(layer, "probs")] = probs.detach().clone()
    out = probs @ v
    return out.transpose(1, 2).contiguous(), None


def _register_oracle() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ORACLE_NAME, _oracle_forward)
    AttentionMaskInterface.register(ORACLE_NAME, eager_mask)


@contextlib.contextmanager
def oracle_attention(model, spec: OracleSpec) -> Iterator[OracleSpec]:
    """Run ``model`` with the oracle attention inside the block (restores its implementation)."""
    _register_oracle()
    before = model.config._attn_implementation
    _ACTIVE.append(spec)
    model.set_attn_implementation(ORACLE_NAME)
    try:
        yield spec
    finally:
        model.set_attn_implementation(before)
        _ACTIVE.remove(spec)
