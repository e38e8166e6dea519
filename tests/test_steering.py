"""Steering during ``model.generate()`` (greedy, KV cache): suppressing the induction heads of the
embedded model stops it from repeating, generation after the block is unchanged, and a user-defined
additive steering intervention (``AttentionCall.add_output``) matches a hook that adds the same
vector to the head's slice of the output projection's input."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import headint

NEW = 8
INDUCTION = [0, 2, 3]  # layer-1 induction heads of induction-2l


def repeat_prompts(n: int = 16, seed: int = 0):
    """``[n, 23]`` prompts ``background(4) A(12) background(4) A[:3]`` of distinct tokens and the
    copying continuation ``A[3:3+NEW]`` ``[n, NEW]``."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.rand(n, 128, generator=g).argsort(1)[:, :20]
    bg1, seg, bg2 = toks[:, :4], toks[:, 4:16], toks[:, 16:20]
    return torch.cat([bg1, seg, bg2, seg[:, :3]], 1), seg[:, 3 : 3 + NEW]


def generate(model, ids):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, num_beams=1, use_cache=True, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


def repeated_fraction(generated, continuation) -> float:
    """Fraction of continuations that repeat the earlier segment token for token."""
    return float((generated == continuation).all(1).float().mean())


@pytest.fixture(scope="module")
def induction_model():
    return headint.models.load("induction-2l")


def test_suppressing_induction_heads_stops_repetition(induction_model):
    model = induction_model
    ids, cont = repeat_prompts()
    before = generate(model, ids)
    with headint.intervene(model, [headint.Scale(layer=1, head=INDUCTION, factor=0.0)]):
        steered = generate(model, ids)
    after = generate(model, ids)
    assert repeated_fraction(before, cont) >= 0.9
    assert repeated_fraction(steered, cont) <= 0.1
    assert float((steered == cont).float().mean()) <= 0.2  # token level too
    assert torch.equal(after, before)  # the model is left exactly as it was
    # one induction head suppressed: the others still copy
    with headint.intervene(model, [headint.Scale(layer=1, head=0, factor=0.0)]):
        assert repeated_fraction(generate(model, ids), cont) >= 0.9


@dataclass(frozen=True, eq=False)
class AddToHead(headint.Intervention):
    """Add ``vector`` ``[D]`` to the output of ``head`` at ``layer`` at every position."""

    layer: int
    head: int
    vector: torch.Tensor

    def lower(self, call):
        call.add_output(call.select(self.head, None), self.vector)


def test_additive_steering_matches_a_hook(induction_model):
    model = induction_model
    ids, _ = repeat_prompts(4, seed=1)
    D = model.config.n_embd // model.config.n_head
    vec = torch.randn(D, generator=torch.Generator().manual_seed(0)) * 4.0

    def hook(_m, args):
        x = args[0].clone()
        x[..., 3 * D : 4 * D] += vec
        return (x,) + args[1:]

    handle = model.transformer.h[1].attn.c_proj.register_forward_pre_hook(hook)
    try:
        want = generate(model, ids)
    finally:
        handle.remove()
    with headint.intervene(model, [AddToHead(layer=1, head=3, vector=vec)]):
        got = generate(model, ids)
    assert torch.equal(got, want)
    assert not torch.equal(got, generate(model, ids))  # the vector changes what is generated
