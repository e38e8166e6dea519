"""TransformerLens habits on headint's ActivationCache: ``cache["blocks.0.attn.hook_z"]`` is
``cache["z", 0]`` (same tensor, same layout); names that do not map one to one get a KeyError
naming the headint key and the layout, and the advice it gives is right."""

from __future__ import annotations

import pytest
import torch

import headint
from tiny_models import capture_z, make_gpt2, one_thread


@pytest.fixture(scope="module")
def recorded():
    tiny = make_gpt2()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    store: dict = {}
    with one_thread(), capture_z(tiny, store):
        cache = headint.record(tiny.model, ids, what=("z", "pattern", "q", "k", "v"), backend="reference")
    return tiny, cache, store


def test_tl_names_are_the_same_tensors(recorded):
    tiny, cache, store = recorded
    for layer in range(2):
        assert cache[f"blocks.{layer}.attn.hook_z"] is cache["z", layer]
        assert cache[f"blocks.{layer}.attn.hook_pattern"] is cache["pattern", layer]
        # TransformerLens' layouts: hook_z [batch, pos, head_index, d_head] (what enters W_O),
        # hook_pattern [batch, head_index, query_pos, key_pos] (rows sum to 1, causal)
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_z"], store[layer], atol=1e-5, rtol=1e-5)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.shape == (2, tiny.n_heads, 7, 7)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, tiny.n_heads, 7))
        assert float(pattern.triu(1).abs().max()) == 0.0
        assert f"blocks.{layer}.attn.hook_z" in cache and f"blocks.{layer}.attn.hook_pattern" in cache
    assert "blocks.2.attn.hook_z" not in cache and "blocks.0.attn.hook_q" not in cache and ("z", 0) in cache


def test_the_advice_for_q_k_v_is_right(recorded):
    """The KeyError for hook_v says cache['v', l].transpose(1, 2) is TransformerLens' [batch, pos,
    head, d_head]; with it, z = pattern @ v in TransformerLens' einsum holds."""
    tiny, cache, _ = recorded
    for hook, what in (("hook_q", "q"), ("hook_k", "k"), ("hook_v", "v"), ("hook_rot_q", "q"), ("hook_rot_k", "k")):
        with pytest.raises(KeyError, match=rf"cache\['{what}', 1\]\.transpose\(1, 2\)") as e:
            cache[f"blocks.1.attn.{hook}"]
        assert "[batch, pos, head, d_head]" in str(e.value)
    for layer in range(2):
        v_tl = cache["v", layer].transpose(1, 2)  # [batch, pos, head, d_head]
        z = torch.einsum("bhqk,bkhd->bqhd", cache["pattern", layer], v_tl)
        torch.testing.assert_close(z, cache["blocks.%d.attn.hook_z" % layer], atol=1e-5, rtol=1e-5)


def test_unmapped_names_say_what_to_use(recorded):
    _, cache, _ = recorded
    with pytest.raises(KeyError, match=r"does not record attention scores.*cache\['pattern', 0\]"):
        cache["blocks.0.attn.hook_attn_scores"]
    with pytest.raises(KeyError, match=r"cache\['z', 1\] \[B, T, H, D\]"):
        cache["blocks.1.attn.hook_result"]
    with pytest.raises(KeyError, match=r"records the heads' z, q, k, v, pattern only"):
        cache["blocks.0.hook_resid_pre"]
    with pytest.raises(KeyError, match=r"'z' is not a cache key"):
        cache["z"]
    with pytest.raises(KeyError, match=r"index the cache with \(what, layer\)"):
        cache["z", 0, "attn"]
    with pytest.raises(KeyError, match=r"cache has no 'z' for layer 5"):
        cache["blocks.5.attn.hook_z"]
