"""Steering during ``model.generate()`` (greedy, KV cache): headint's Ablate/Scale at absolute
positions, some in the prompt and some in generated tokens, against a hook-based generation.

The oracle is a forward pre-hook on each layer's output projection that keeps its own count of
the absolute positions seen so far in this ``generate`` call (the prompt, then one token per
decoding step) and edits the head slices at the selected absolute positions.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from headint import Ablate, Scale, intervene

import tiny_models as tm

PROMPT = 6
NEW = 6  # positions 6..10 are generated tokens that are fed back (11 is never processed)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with tm.one_thread():
        yield


def _prompt(b: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, tm.VOCAB, (b, PROMPT), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, mask=None):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
            max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, num_beams=1, use_cache=True,
            output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
        )


@contextlib.contextmanager
def hook_steering(tiny, edits):
    """``edits``: list of ``(layer, heads, abs_positions, fn)``, ``fn(z_slice) -> z_slice``.

    Each layer's pre-hook tracks the absolute offset across decoding steps; a fresh set of
    counters is made for every use of this context (one ``generate`` call).
    """
    offsets = {l: 0 for l in range(tm.N_LAYERS)}
    seen = {l: [] for l in range(tm.N_LAYERS)}

    def make(layer):
        def hook(_module, args):
            x = args[0]
            b, tq, _ = x.shape
            start = offsets[layer]
            offsets[layer] += tq
            seen[layer].append(tq)
            z = x.reshape(b, tq, tiny.n_heads, tiny.head_dim).clone()
            for l, heads, positions, fn in edits:
                if l != layer:
                    continue
                for p in positions:
                    if start <= p < start + tq:
                        for h in heads:
                            z[:, p - start, h] = fn(z[:, p - start, h])
            return (z.reshape(b, tq, -1),)

        return hook

    handles = [tiny.out_proj(l).register_forward_pre_hook(make(l)) for l in range(tm.N_LAYERS)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _compare(got, want):
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores) == NEW
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


ARCHS = ["gpt2", "llama"]

CASES = {
    # (headint interventions, hook edits)
    "ablate": (
        [Ablate(layer=0, head=1, positions=[1, 4, 7, 9]), Ablate(layer=1, head=[0, 3], positions=[5, 6, 10])],
        [(0, [1], [1, 4, 7, 9], torch.zeros_like), (1, [0, 3], [5, 6, 10], torch.zeros_like)],
    ),
    "scale": (
        [Scale(layer=1, head=[0, 2], positions=[3, 6, 8], factor=0.5), Scale(layer=0, head=3, positions=[0, 2, 9, 10], factor=3.0)],
        [(1, [0, 2], [3, 6, 8], lambda z: z * 0.5), (0, [3], [0, 2, 9, 10], lambda z: z * 3.0)],
    ),
    "generated_only": (
        [Ablate(layer=0, head=None, positions=[6, 7, 8, 9, 10])],
        [(0, [0, 1, 2, 3], [6, 7, 8, 9, 10], torch.zeros_like)],
    ),
    "mixed": (
        [Scale(layer=0, head=2, positions=list(range(11)), factor=0.25), Ablate(layer=0, head=2, positions=[8])],
        [(0, [2], list(range(11)), lambda z: z * 0.25), (0, [2], [8], torch.zeros_like)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ARCHS)
def test_generate_steering_matches_hooks(name, case):
    tiny = tm.get(name)
    ivs, edits = CASES[case]
    ids = _prompt()
    plain = _generate(tiny.model, ids)
    with hook_steering(tiny, edits) as seen:
        want = _generate(tiny.model, ids)
    # the oracle really ran once over the prompt, then one token per step
    assert seen[0] == [PROMPT] + [1] * (NEW - 1)
    with intervene(tiny.model, ivs, backend="reference"):
        got = _generate(tiny.model, ids)
    _compare(got, want)
    # not vacuous: the steering changed the scores
    assert max(float((a - b).abs().max()) for a, b in zip(got.scores, plain.scores)) > 1e-3
    # and a second generate inside a fresh block gives the same (positions restart at 0)
    with intervene(tiny.model, ivs, backend="reference"):
        again = _generate(tiny.model, ids)
    _compare(again, want)


@pytest.mark.parametrize("name", ARCHS)
def test_generate_without_interventions_matches_plain(name):
    tiny = tm.get(name)
    ids = _prompt()
    plain = _generate(tiny.model, ids)
    with intervene(tiny.model, [], backend="reference"):
        got = _generate(tiny.model, ids)
    _compare(got, plain)


@pytest.mark.parametrize("name", ARCHS)
def test_generate_left_padded_batch(name):
    """Positions are absolute in the padded input (padding included)."""
    tiny = tm.get(name)
    ids = _prompt(b=2, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    ivs = [Ablate(layer=0, head=[0, 1], positions=[3, 7, 9]), Scale(layer=1, head=2, positions=[5, 8], factor=0.5)]
    edits = [(0, [0, 1], [3, 7, 9], torch.zeros_like), (1, [2], [5, 8], lambda z: z * 0.5)]
    with hook_steering(tiny, edits):
        want = _generate(tiny.model, ids, mask)
    with intervene(tiny.model, ivs, backend="reference"):
        got = _generate(tiny.model, ids, mask)
    _compare(got, want)


@pytest.mark.parametrize("name", ARCHS)
def test_generate_bool_positions_shorter_than_sequence(name):
    """A bool position selector ``[T]`` covering only the prompt leaves generated tokens alone."""
    tiny = tm.get(name)
    ids = _prompt()
    sel = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)
    with hook_steering(tiny, [(1, [1], [1, 2, 4], torch.zeros_like)]):
        want = _generate(tiny.model, ids)
    with intervene(tiny.model, [Ablate(layer=1, head=1, positions=sel)], backend="reference"):
        got = _generate(tiny.model, ids)
    _compare(got, want)


def test_generate_sliding_window_cache_positions():
    """Mistral with a sliding window (4) smaller than the generated length: its KV cache keeps
    only the last window of keys, so positions must still count from the start of the input."""
    tiny = tm.get("mistral")
    ids = _prompt()
    ivs = [Ablate(layer=0, head=[1, 2], positions=[1, 7, 9]), Scale(layer=1, head=0, positions=[4, 8, 10], factor=0.5)]
    edits = [(0, [1, 2], [1, 7, 9], torch.zeros_like), (1, [0], [4, 8, 10], lambda z: z * 0.5)]
    with hook_steering(tiny, edits):
        want = _generate(tiny.model, ids)
    with intervene(tiny.model, ivs, backend="reference"):
        got = _generate(tiny.model, ids)
    _compare(got, want)
