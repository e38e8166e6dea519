"""Tests for headint.metrics: built-in metrics against hand computations."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headint.metrics import (
    CallableMetric,
    KLFromClean,
    LogitDiff,
    LogProb,
    Loss,
    Metric,
    Prob,
    as_metric,
    last_positions,
    logit_diff,
    normalize,
    select_logits,
)

B, T, V = 4, 6, 11


def make_batch(padding="right", seed=0, lengths=(6, 4, 2, 5)):
    """A batch with per-row real lengths, padded on the given side (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if padding == "right":
            mask[b, :n] = 1
        else:
            mask[b, T - n:] = 1
    ids = ids * mask
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "target": torch.randint(0, V, (len(lengths),), generator=g),
        "contrast": torch.randint(0, V, (len(lengths),), generator=g),
    }


def rand_logits(seed=1, shape=(B, T, V)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def last_index_loop(mask):
    out = []
    for row in mask.tolist():
        out.append(max(i for i, m in enumerate(row) if m))
    return out


# ----------------------------------------------------------------- last_positions


def test_last_positions_right_padding():
    batch = make_batch("right")
    assert last_positions(batch["attention_mask"]).tolist() == [5, 3, 1, 4]


def test_last_positions_left_padding():
    batch = make_batch("left")
    assert last_positions(batch["attention_mask"]).tolist() == [T - 1] * 4


def test_last_positions_bool_and_float_masks():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert last_positions(mask.bool()).tolist() == [1, 0]
    assert last_positions(mask.float()).tolist() == [1, 0]
    assert last_positions(mask).dtype == torch.long


def test_last_positions_errors():
    with pytest.raises(ValueError, match="no real token"):
        last_positions(torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        last_positions(torch.ones(3))
    with pytest.raises(TypeError, match="attention_mask"):
        last_positions([[1, 1]])


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=5),
    left=st.booleans(),
)
def test_last_positions_matches_loop(lengths, left):
    Tm = 7
    mask = torch.zeros(len(lengths), Tm, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, Tm - n:] = 1
        else:
            mask[b, :n] = 1
    assert last_positions(mask).tolist() == last_index_loop(mask)


# ----------------------------------------------------------------- LogitDiff


@pytest.mark.parametrize("padding", ["right", "left"])
def test_logit_diff_hand_computation_and_layouts(padding):
    batch = make_batch(padding)
    full = rand_logits()
    m = LogitDiff()
    last = last_index_loop(batch["attention_mask"])
    expected = torch.tensor(
        [full[b, last[b], batch["target"][b]] - full[b, last[b], batch["contrast"][b]] for b in range(B)]
    )
    selected = select_logits(full, m, batch)
    assert selected.shape == (B, 2)
    ids = m.token_ids(batch)
    assert ids.shape == (B, 2) and ids.dtype == torch.long
    # column k of the selection is the logit of id token_ids[:, k]
    for b in range(B):
        for k in range(2):
            assert selected[b, k] == full[b, last[b], ids[b, k]]
    from_selected = m(selected, batch)
    from_vocab = m(full[torch.arange(B), torch.tensor(last)], batch)
    from_full = m(full, batch)
    assert from_selected.dtype == torch.float32 and from_selected.shape == (B,)
    torch.testing.assert_close(from_selected, expected)
    torch.testing.assert_close(from_vocab, expected)
    torch.testing.assert_close(from_full, expected)


def test_logit_diff_token_specs():
    batch = make_batch()
    full = rand_logits()
    last = last_positions(batch["attention_mask"])
    vocab = full[torch.arange(B), last]
    # int ids
    m = LogitDiff(target=3, contrast=7)
    torch.testing.assert_close(m(vocab, batch), vocab[:, 3] - vocab[:, 7])
    assert m.token_ids(batch).tolist() == [[3, 7]] * B
    # [B] tensors
    t = torch.tensor([0, 1, 2, 3])
    c = torch.tensor([4, 5, 6, 7])
    m = logit_diff(t, c)
    torch.testing.assert_close(m(vocab, batch), vocab[torch.arange(B), t] - vocab[torch.arange(B), c])
    torch.testing.assert_close(m(select_logits(full, m, batch), batch), m(vocab, batch))
    # other batch keys
    batch["answer"], batch["wrong"] = t, c
    m = LogitDiff("answer", "wrong")
    torch.testing.assert_close(m(vocab, batch), vocab[torch.arange(B), t] - vocab[torch.arange(B), c])


def test_logit_diff_errors():
    batch = make_batch()
    vocab = rand_logits(shape=(B, V))
    with pytest.raises(KeyError, match="missing"):
        LogitDiff("missing")(vocab, batch)
    with pytest.raises(ValueError, match=r"expected \[B\]"):
        LogitDiff(torch.tensor([1, 2]), 3).token_ids(batch)
    with pytest.raises(TypeError, match="integer"):
        LogitDiff(torch.tensor([1.0, 2.0, 3.0, 4.0]), 3).token_ids(batch)
    with pytest.raises(TypeError, match="target"):
        LogitDiff(target=1.5)
    with pytest.raises(ValueError, match="out of range"):
        LogitDiff(target=V + 3, contrast=0)(vocab, batch)
    with pytest.raises(ValueError, match="logits has shape"):
        LogitDiff()(rand_logits(shape=(B + 1, V)), batch)


# ----------------------------------------------------------------- LogProb / Prob


@pytest.mark.parametrize("padding", ["right", "left"])
def test_logprob_and_prob(padding):
    batch = make_batch(padding)
    full = rand_logits(seed=5)
    last = last_index_loop(batch["attention_mask"])
    tgt = batch["target"]
    expected = []
    for b in range(B):
        row = full[b, last[b]].double().numpy()
        row = row - row.max()
        expected.append(row[tgt[b]] - math.log(np.exp(row).sum()))
    expected = torch.tensor(expected, dtype=torch.float32)
    for metric, fn in ((LogProb(), lambda x: x), (Prob(), torch.exp), (as_metric("prob"), torch.exp)):
        assert metric.position == "last" and metric.token_ids(batch) is None and not metric.needs_clean
        selected = select_logits(full, metric, batch)
        assert selected.shape == (B, V)
        out = metric(selected, batch)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fn(expected), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(metric(full, batch), out)


def test_prob_sums_to_one_over_vocab():
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2)}
    vocab = rand_logits(shape=(1, V))
    total = sum(Prob(target=i)(vocab, batch) for i in range(V))
    torch.testing.assert_close(total, torch.ones(1))


# ----------------------------------------------------------------- KL


@pytest.mark.parametrize("padding", ["right", "left"])
def test_kl_from_clean_hand_computation(padding):
    batch = make_batch(padding)
    patched, clean = rand_logits(seed=2), rand_logits(seed=3)
    m = KLFromClean()
    assert m.needs_clean and m.position == "last" and m.token_ids(batch) is None
    last = last_index_loop(batch["attention_mask"])
    expected = []
    for b in range(B):
        p = torch.softmax(clean[b, last[b]].double(), -1).numpy()
        q = torch.softmax(patched[b, last[b]].double(), -1).numpy()
        expected.append(float(np.sum(p * np.log(p / q))))
    out = m(select_logits(patched, m, batch), batch, select_logits(clean, m, batch))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-4)
    assert (out > 0).all()
    same = m(select_logits(clean, m, batch), batch, select_logits(clean, m, batch))
    torch.testing.assert_close(same, torch.zeros(B), atol=1e-6, rtol=0)


def test_kl_handles_zero_probabilities_and_errors():
    batch = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "attention_mask": torch.ones(1, 1)}
    clean = torch.tensor([[0.0, float("-inf"), 1.0]])
    patched = torch.tensor([[1.0, 2.0, 0.0]])
    p = torch.softmax(clean, -1)
    q = torch.softmax(patched, -1)
    expected = p[0, 0] * torch.log(p[0, 0] / q[0, 0]) + p[0, 2] * torch.log(p[0, 2] / q[0, 2])
    out = KLFromClean()(patched, batch, clean)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected.reshape(1))
    with pytest.raises(ValueError, match="clean_logits"):
        KLFromClean()(patched, batch)
    with pytest.raises(ValueError, match="clean_logits has shape"):
        KLFromClean()(patched, batch, torch.zeros(1, 4))


# ----------------------------------------------------------------- Loss


def loss_loop(full, batch, labels=None):
    ids = batch["input_ids"] if labels is None else labels
    mask = batch["attention_mask"]
    out = []
    for b in range(full.shape[0]):
        terms = []
        for t in range(full.shape[1] - 1):
            if mask[b, t] and mask[b, t + 1] and ids[b, t + 1] != -100:
                logp = torch.log_softmax(full[b, t].double(), -1)
                terms.append(-float(logp[ids[b, t + 1]]))
        out.append(sum(terms) / len(terms))
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_loss_hand_computation(padding):
    batch = make_batch(padding)
    full = rand_logits(seed=4)
    m = Loss()
    assert m.position == "all" and m.token_ids(batch) is None
    assert select_logits(full, m, batch) is full
    out = m(full, batch)
    assert out.shape == (B,) and out.dtype == torch.float32
    torch.testing.assert_close(out, loss_loop(full, batch), atol=1e-5, rtol=1e-5)
    # padding content must not matter
    noisy = full.clone()
    noisy[batch["attention_mask"] == 0] = 100.0
    torch.testing.assert_close(m(noisy, batch), out)


def test_loss_uses_labels_with_ignore_index():
    batch = make_batch("right")
    full = rand_logits(seed=6)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(9))
    labels[:, 2] = -100
    batch["labels"] = labels
    torch.testing.assert_close(Loss()(full, batch), loss_loop(full, batch, labels), atol=1e-5, rtol=1e-5)


def test_loss_matches_cross_entropy_without_padding():
    batch = make_batch(lengths=(T, T, T, T))
    full = rand_logits(seed=7)
    ce = torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, V), batch["input_ids"][:, 1:].reshape(-1), reduction="none"
    ).view(B, -1).mean(1)
    torch.testing.assert_close(Loss()(full, batch), ce)


def test_loss_errors():
    batch = make_batch(lengths=(6, 1, 3, 3))
    with pytest.raises(ValueError, match=r"examples \[1\]"):
        Loss()(rand_logits(), batch)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        Loss()(rand_logits(shape=(B, V)), make_batch())
    bad = make_batch()
    bad["labels"] = torch.zeros(B, T + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        Loss()(rand_logits(), bad)


# ----------------------------------------------------------------- callables and as_metric


def test_callable_metric_one_and_two_args():
    batch = make_batch()
    full = rand_logits()

    def mean_logit(logits):
        return logits.mean(dim=(1, 2))

    m = CallableMetric(mean_logit)
    assert m.name == "mean_logit" and m.position == "all" and m.token_ids(batch) is None
    torch.testing.assert_close(m(select_logits(full, m, batch), batch), full.mean(dim=(1, 2)))

    m2 = as_metric(lambda logits, batch: logits[:, 0, 0] + batch["target"])
    assert isinstance(m2, CallableMetric) and m2.name == "custom"
    out = m2(full, batch)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, full[:, 0, 0] + batch["target"].float())

    last = CallableMetric(lambda x: x.max(-1).values, name="maxlogit", position="last")
    assert select_logits(full, last, batch).shape == (B, V)


def test_callable_metric_errors():
    batch = make_batch()
    with pytest.raises(ValueError, match=r"expected per-example values \[B\]"):
        CallableMetric(lambda x: x.mean())(rand_logits(), batch)
    with pytest.raises(TypeError, match="callable"):
        CallableMetric(3)
    with pytest.raises(ValueError, match="position"):
        CallableMetric(lambda x: x, position="first")


def test_as_metric_names_and_errors():
    assert isinstance(as_metric("logit_diff"), LogitDiff)
    assert isinstance(as_metric("logprob"), LogProb)
    assert isinstance(as_metric("prob"), Prob)
    assert isinstance(as_metric("kl"), KLFromClean)
    assert isinstance(as_metric("loss"), Loss)
    assert as_metric("LogProb", target=5).target == 5
    m = LogitDiff()
    assert as_metric(m) is m
    with pytest.raises(ValueError, match="unknown metric name"):
        as_metric("accuracy")
    with pytest.raises(TypeError, match="metric must be"):
        as_metric(3)
    assert issubclass(CallableMetric, Metric)


def test_select_logits_errors():
    batch = make_batch()
    with pytest.raises(ValueError, match="full_logits has shape"):
        select_logits(rand_logits(shape=(B, V)), "logit_diff", batch)
    with pytest.raises(ValueError, match="out of range"):
        select_logits(rand_logits(), LogitDiff(V, 0), batch)


# ----------------------------------------------------------------- normalize


def test_normalize():
    v = torch.tensor([2.0, 0.5, -1.0, 3.5])
    torch.testing.assert_close(normalize(v, clean=3.0, corrupt=-1.0), (v + 1.0) / 4.0)
    assert normalize(torch.tensor([3.0]), 3.0, -1.0).item() == 1.0
    assert normalize(torch.tensor([-1.0]), 3.0, -1.0).item() == 0.0
    assert normalize(v.double(), 3.0, -1.0).dtype == torch.float64
    torch.testing.assert_close(
        normalize(v, torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.0), v / torch.tensor([1.0, 2.0, 3.0, 4.0])
    )
    with pytest.raises(ValueError, match="clean .* equals corrupt"):
        normalize(v, 2.0, 2.0)
