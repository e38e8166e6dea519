"""headint.path_patch against a naive multi-pass hook oracle (``scan_oracles.oracle_path_patch``)."""

from __future__ import annotations

import pytest
import torch

import headint
from scan_oracles import corrupt_of, make_batch, oracle_path_patch

ATOL = 1e-5
RTOL = 1e-5
BACKEND = "reference"


@pytest.fixture(scope="module")
def data():
    clean = make_batch(3, 6, seed=3, pad="left", lengths=[6, 4, 5])
    return clean, corrupt_of(clean, seed=4)


SENDERS = [((0, 0),), ((0, 3),), ((1, 2),), ((0, 1), (1, 3))]


def check(model, clean, corrupt, metric, senders, receivers, **kw):
    r = headint.path_patch(model, clean, corrupt, metric, senders=senders, receivers=receivers, backend=BACKEND, **kw)
    expected = oracle_path_patch(model, clean, corrupt, metric, senders=[tuple(s) for s in r.labels], receivers=receivers)
    assert r.axes == ("head_set",)
    assert r.per_example.shape == expected.shape
    torch.testing.assert_close(r.per_example, expected, atol=ATOL, rtol=RTOL)
    return r, expected


@pytest.mark.parametrize("which", ["q", "k", "v", "qkv"])
def test_single_receiver(model, data, which):
    clean, corrupt = data
    r, expected = check(model, clean, corrupt, "logit_diff", SENDERS, [(2, 1, which)])
    assert [list(map(tuple, s)) for s in r.labels] == [list(s) for s in SENDERS]
    # the patch does something: some sender moves the metric away from the clean run
    assert (r.per_example - r.clean_baseline).abs().max() > 1e-3


def test_gqa_kv_head_receiver(llama, data):
    """Under GQA a k/v receiver is a key/value head, shared by query heads 2h and 2h+1."""
    clean, corrupt = data
    for which in ("k", "v"):
        check(llama, clean, corrupt, "logit_diff", SENDERS, [(2, 1, which)])
    check(llama, clean, corrupt, "logit_diff", SENDERS, [(2, 3, "q"), (2, 1, "k"), (1, 0, "v")])
    # key/value head 1 is read by query heads 2 and 3 only: patching it is not patching kv head 0
    a = headint.path_patch(llama, clean, corrupt, "logit_diff", senders=SENDERS, receivers=[(2, 0, "v")], backend=BACKEND)
    b = headint.path_patch(llama, clean, corrupt, "logit_diff", senders=SENDERS, receivers=[(2, 1, "v")], backend=BACKEND)
    assert not torch.allclose(a.per_example, b.per_example)


def test_receivers_in_several_layers(model, data):
    clean, corrupt = data
    check(model, clean, corrupt, "logit_diff", SENDERS, [(2, 0, "qkv"), (1, 1, "k"), (1, 3, "q")])


def test_default_senders_and_flat_pairs(model, data):
    clean, corrupt = data
    r, _ = check(model, clean, corrupt, "logit_diff", None, [(1, 1, "v")])
    assert [list(map(tuple, s)) for s in r.labels] == [[(0, h)] for h in range(4)]
    r2, _ = check(model, clean, corrupt, "logit_diff", [(0, 2), (1, 1)], [(2, 0, "k")])
    assert [list(map(tuple, s)) for s in r2.labels] == [[(0, 2)], [(1, 1)]]


@pytest.mark.parametrize("metric", ["kl", "loss", "prob"])
def test_other_metrics(model, data, metric):
    clean, corrupt = data
    check(model, clean, corrupt, metric, SENDERS[:3], [(2, 1, "qv")])


def test_batch_size_chunks(model, data):
    clean, corrupt = data
    whole = headint.path_patch(model, clean, corrupt, "logit_diff", senders=SENDERS, receivers=[(2, 1, "qkv")], backend=BACKEND)
    for bs in (1, 2, 5):
        r, _ = check(model, clean, corrupt, "logit_diff", SENDERS, [(2, 1, "qkv")], batch_size=bs)
        torch.testing.assert_close(r.per_example, whole.per_example, atol=1e-6, rtol=1e-6)


def test_baselines(gpt2, data):
    clean, corrupt = data
    r = headint.path_patch(gpt2, clean, corrupt, "logit_diff", senders=SENDERS, receivers=[(2, 1, "q")], backend=BACKEND)
    plain = headint.scan(gpt2, clean, "logit_diff", corrupt=corrupt, method="patch", progress=False, backend=BACKEND)
    assert r.clean_baseline == pytest.approx(plain.clean_baseline, abs=1e-6)
    assert r.corrupt_baseline == pytest.approx(plain.corrupt_baseline, abs=1e-6)


def test_bad_receivers_and_senders(gpt2, llama, data):
    clean, corrupt = data
    kw = dict(backend=BACKEND)
    with pytest.raises(ValueError, match="which"):
        headint.path_patch(gpt2, clean, corrupt, receivers=[(2, 1, "o")], **kw)
    with pytest.raises(ValueError, match="which"):
        headint.path_patch(gpt2, clean, corrupt, receivers=[(2, 1, "")], **kw)
    with pytest.raises(ValueError, match=r"layer 3 out of range"):
        headint.path_patch(gpt2, clean, corrupt, receivers=[(3, 1, "q")], **kw)
    with pytest.raises(ValueError, match=r"q head 4 out of range"):
        headint.path_patch(gpt2, clean, corrupt, receivers=[(2, 4, "q")], **kw)
    with pytest.raises(ValueError, match=r"k head 2 out of range.*2 key/value heads"):
        headint.path_patch(llama, clean, corrupt, receivers=[(2, 2, "k")], **kw)
    with pytest.raises(ValueError, match=r"v head 3 out of range"):
        headint.path_patch(llama, clean, corrupt, receivers=[(2, 3, "qv")], **kw)
    with pytest.raises(ValueError, match=r"\(layer, head, which\)"):
        headint.path_patch(gpt2, clean, corrupt, receivers=[(2, 1)], **kw)
    with pytest.raises(ValueError, match="at least one"):
        headint.path_patch(gpt2, clean, corrupt, receivers=[], **kw)
    with pytest.raises(ValueError, match="below the receivers"):
        headint.path_patch(gpt2, clean, corrupt, senders=[((2, 0),)], receivers=[(2, 1, "q")], **kw)
    with pytest.raises(ValueError, match="out of range"):
        headint.path_patch(gpt2, clean, corrupt, senders=[((0, 9),)], receivers=[(2, 1, "q")], **kw)
    with pytest.raises(ValueError, match="corrupt"):
        headint.path_patch(gpt2, clean, None, receivers=[(2, 1, "q")], **kw)
    # q receivers on llama index query heads: head 3 is fine for q
    headint.path_patch(llama, clean, corrupt, senders=[((0, 0),)], receivers=[(2, 3, "q")], **kw)
