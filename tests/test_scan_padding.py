"""Padding never changes a result: each example scanned alone gives the values it gives in a
left-padded batch (to 1e-5), for exact scans (per head, per position with and without
position reuse), attribution and path patching, on tiny GPT-2 (learned absolute positions:
without position ids derived from the mask, left padding shifts them) and tiny Llama (RoPE).
"""

from __future__ import annotations

import pytest
import torch

import headint
from headint.scans.positions import is_left_padded, position_ids_from_mask, with_position_ids
from scan_oracles import corrupt_of, make_batch, oracle_scan

ATOL = 1e-5
BACKEND = "reference"
T = 7
LENGTHS = [7, 4, 5]


@pytest.fixture(scope="module")
def data():
    clean = make_batch(3, T, seed=101, pad="left", lengths=LENGTHS)
    return clean, corrupt_of(clean, seed=102)


def alone(batch: dict, n: int) -> dict:
    """Example ``n`` on its own, its padding cut off."""
    off = T - LENGTHS[n]
    return {k: (v[n : n + 1, off:] if v.dim() == 2 else v[n : n + 1]) for k, v in batch.items()}


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    assert torch.allclose(a, b, atol=ATOL, rtol=0), f"{what}: max |padded - alone| = {diff:.3g}"


def test_gpt2_left_padding_shifts_positions_without_position_ids(gpt2, data):
    """The bug these tests guard against is real on this model: the plain padded forward differs."""
    clean, _ = data
    n = 1
    a = alone(clean, n)
    with torch.no_grad():
        ref = gpt2(input_ids=a["input_ids"], attention_mask=a["attention_mask"]).logits[0, -1]
        naive = gpt2(input_ids=clean["input_ids"], attention_mask=clean["attention_mask"]).logits[n, -1]
        fixed = gpt2(input_ids=clean["input_ids"], attention_mask=clean["attention_mask"],
                     position_ids=position_ids_from_mask(clean["attention_mask"])).logits[n, -1]
    assert (naive - ref).abs().max() > 1e-2
    torch.testing.assert_close(fixed, ref, atol=ATOL, rtol=0)


EXACT = [("zero", None), ("patch", "noising"), ("patch", "denoising")]


@pytest.mark.parametrize("method,direction", EXACT, ids=["zero", "patch-noising", "patch-denoising"])
def test_exact_per_head(model, data, method, direction):
    clean, corrupt = data
    kw = dict(method=method, direction=direction or "denoising", progress=False, backend=BACKEND, batch_size=5)
    padded = headint.scan(model, clean, "logit_diff", corrupt=corrupt if method == "patch" else None, **kw)
    for n in range(3):
        single = headint.scan(model, alone(clean, n), "logit_diff", corrupt=alone(corrupt, n) if method == "patch" else None, **kw)
        close(padded.per_example[..., n], single.per_example[..., 0], f"{method} example {n}")
        close(padded.base_per_example[n : n + 1], single.base_per_example, f"{method} base {n}")


@pytest.mark.parametrize("metric", ["logit_diff", "loss"], ids=["position-reuse", "no-position-reuse"])
@pytest.mark.parametrize("method,direction", EXACT[:2], ids=["zero", "patch-noising"])
def test_exact_per_position(model, data, metric, method, direction):
    """Position ``p`` of a padded row is position ``p - pad`` of the prompt alone; patching a
    padding position changes nothing (its value is the base value)."""
    clean, corrupt = data
    kw = dict(method=method, direction=direction or "denoising", per_position=True, heads=[0, 3], progress=False,
              backend=BACKEND, batch_size=7)
    padded = headint.scan(model, clean, metric, corrupt=corrupt if method == "patch" else None, **kw)
    assert padded.settings["position_reuse"] == (metric == "logit_diff")
    pe = padded.per_example[:, [0, 3]]
    for n in range(3):
        off = T - LENGTHS[n]
        single = headint.scan(model, alone(clean, n), metric, corrupt=alone(corrupt, n) if method == "patch" else None, **kw)
        close(pe[:, :, off:, n], single.per_example[:, [0, 3], :, 0], f"{metric} example {n}")
        base = padded.base_per_example[n].expand_as(pe[:, :, :off, n])
        close(pe[:, :, :off, n], base, f"{metric} example {n} padding positions")


@pytest.mark.parametrize("per_position", [False, True], ids=["head", "head-position"])
@pytest.mark.parametrize("method,direction", [("patch", "noising"), ("patch", "denoising"), ("mask", "noising")],
                         ids=["patch-noising", "patch-denoising", "mask"])
def test_attribution(model, data, method, direction, per_position):
    clean, corrupt = data
    kw = dict(method=method, direction=direction, per_position=per_position, backend=BACKEND)
    padded = headint.attribution_scan(model, clean, corrupt if method == "patch" else None, "logit_diff", **kw)
    for n in range(3):
        single = headint.attribution_scan(model, alone(clean, n), alone(corrupt, n) if method == "patch" else None,
                                          "logit_diff", **kw)
        got = padded.per_example[..., n]
        if per_position:
            off = T - LENGTHS[n]
            close(got[:, :, :off], padded.base_per_example[n].expand_as(got[:, :, :off]), f"example {n} padding positions")
            got = got[:, :, off:]
        close(got, single.per_example[..., 0], f"example {n}")


def test_path_patching(model, data):
    clean, corrupt = data
    kw = dict(senders=[((0, 0),), ((0, 3),), ((1, 2),), ((0, 1), (1, 3))], receivers=[(2, 1, "qkv"), (1, 0, "k")],
              backend=BACKEND, batch_size=3)
    padded = headint.path_patch(model, clean, corrupt, "logit_diff", **kw)
    assert (padded.per_example - padded.base_per_example).abs().max() > 1e-3
    for n in range(3):
        single = headint.path_patch(model, alone(clean, n), alone(corrupt, n), "logit_diff", **kw)
        close(padded.per_example[..., n], single.per_example[..., 0], f"example {n}")


def test_mean_inputs_left_padded(gpt2, data):
    """Mean ablation over left-padded reference prompts numbers them from 0 too (oracle agrees)."""
    clean, _ = data
    ref = make_batch(4, T, seed=103, pad="left", lengths=[7, 3, 5, 6])
    r = headint.scan(gpt2, clean, "logit_diff", method="mean", mean_inputs=ref, progress=False, backend=BACKEND)
    expected = oracle_scan(gpt2, clean, "logit_diff", method="mean", mean_batch=ref)
    torch.testing.assert_close(r.per_example, expected, atol=ATOL, rtol=1e-5)


# ------------------------------------------------------------------------------------ position ids


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert is_left_padded(mask)
    assert not is_left_padded(mask[1:3])  # right padding and none
    assert is_left_padded(mask[3:])  # padding in the middle counts: a real token follows it
    assert position_ids_from_mask(mask.bool()).dtype == torch.long


def test_batches_without_left_padding_and_given_position_ids_are_kept(gpt2):
    right = make_batch(2, 5, seed=104, pad="right", lengths=[5, 3])
    assert "position_ids" not in with_position_ids(gpt2, right)
    left = make_batch(2, 5, seed=104, pad="left", lengths=[5, 3])
    mine = torch.arange(5).expand(2, 5) + 1
    assert with_position_ids(gpt2, {**left, "position_ids": mine})["position_ids"] is mine
    assert with_position_ids(gpt2, left)["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]


def _no_position_ids_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    class NoPositionIds(GPT2LMHeadModel):
        """A model whose forward has no position_ids argument (positions always 0..T-1)."""

        def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, token_type_ids=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache)

    torch.manual_seed(0)
    return NoPositionIds(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16)).eval()


def test_left_padding_refused_for_a_model_without_position_ids(data):
    model = _no_position_ids_model()
    clean, corrupt = data
    with pytest.raises(ValueError, match=r"inputs are left-padded, but NoPositionIds\.forward takes no position_ids.*pad on the right"):
        headint.scan(model, clean, "logit_diff", progress=False, backend=BACKEND)
    with pytest.raises(ValueError, match=r"clean are left-padded"):
        headint.attribution_scan(model, clean, corrupt, "logit_diff", backend=BACKEND)
    with pytest.raises(ValueError, match=r"clean are left-padded"):
        headint.path_patch(model, clean, corrupt, "logit_diff", receivers=[(1, 0, "q")], backend=BACKEND)
    # right padding is fine for such a model: each example gives its values alone
    right = make_batch(2, 6, seed=105, pad="right", lengths=[6, 4])
    r = headint.scan(model, right, "logit_diff", progress=False, backend=BACKEND)
    single = {k: (v[1:2, :4] if v.dim() == 2 else v[1:2]) for k, v in right.items()}
    s = headint.scan(model, single, "logit_diff", progress=False, backend=BACKEND)
    close(r.per_example[..., 1], s.per_example[..., 0], "right padding")
