"""Helpers for the compatibility tests: the matrix script as a module, and tiny models built by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import transformers

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compat_matrix.py"


def matrix():
    """``scripts/compat_matrix.py`` imported as a module."""
    if "compat_matrix" in sys.modules:
        return sys.modules["compat_matrix"]
    spec = importlib.util.spec_from_file_location("compat_matrix", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compat_matrix"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _finish(model):
    """The matrix's tiny-model finish (eval, float32, peaked weights)."""
    return matrix()._finish(model)


def llama_with_head_counts(counts=(4, 8), head_dim=8, hidden=32, kv=2, seed=0):
    """A tiny Llama whose layer ``l`` has ``counts[l]`` query heads (per-layer head counts, as in
    Laguna, without Laguna's output gate): layer projections rebuilt by hand."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=len(counts),
                                   num_attention_heads=counts[0], num_key_value_heads=kv, head_dim=head_dim,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    for l, n in enumerate(counts):
        attn = model.model.layers[l].self_attn
        attn.q_proj = torch.nn.Linear(hidden, n * head_dim, bias=False)
        attn.o_proj = torch.nn.Linear(n * head_dim, hidden, bias=False)
        attn.num_key_value_groups = n // kv
    return _finish(model)


def gemma4_with_global_head_dim(global_head_dim=32, seed=0):
    """A tiny Gemma4 text model whose full-attention layer has a larger head dim (``global_head_dim``)."""
    torch.manual_seed(seed)
    cfg = transformers.Gemma4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        global_head_dim=global_head_dim, layer_types=["sliding_attention", "full_attention"],
                                        sliding_window=4, max_position_embeddings=64, hidden_size_per_layer_input=0,
                                        vocab_size_per_layer_input=64)
    return _finish(transformers.Gemma4ForCausalLM(cfg))


def ids(B=2, T=8, seed=1, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def edit_head(proj, n_heads, head, fn):
    """A forward pre-hook on ``proj`` rewriting head ``head`` of its input ``[B, T, H*Dv]`` as ``fn(z_head)``."""
    def hook(_m, args):
        x = args[0]
        z = x.reshape(*x.shape[:-1], n_heads, -1).clone()
        z[..., head, :] = fn(z[..., head, :])
        return (z.reshape(x.shape),)

    return proj.register_forward_pre_hook(hook)
