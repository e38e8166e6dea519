"""Knockout along a route (``headint.scans.route.route_knockout_scan``): (source, target) pairs
with different targets in one result, each cell against the eager oracle of
tests/test_knockout_scan.py; the induction route of the embedded model (the layer-0 edge that the
default last-token scan hides); argument errors."""

from __future__ import annotations

import pytest
import torch

import headint
from headint.scans.route import route_knockout_scan
from headint.tasks.induction import induction_prompts

from scan_oracles import make_batch
from test_knockout_scan import oracle_knockout


@pytest.mark.parametrize("pad", [None, "left"])
def test_pairs_match_eager_oracle(model, pad):
    batch = make_batch(N=3, T=7, pad=pad, seed=4)
    N, T = batch["input_ids"].shape
    mask = batch["attention_mask"]
    last = torch.tensor([int(mask[n].nonzero().max()) for n in range(N)])
    prev = torch.zeros(N, T, dtype=torch.bool)
    prev[torch.arange(N), last - 2] = True
    one = torch.zeros(N, T, dtype=torch.bool)
    one[torch.arange(N), last - 1] = True
    pairs = {"last<-prev2": (prev, -1), "mid<-prev2": (prev, (last - 1).tolist()), "last<-prev1": (one, -1)}
    res = route_knockout_scan(model, batch, "logit_diff", pairs, window=1, per_head=True, progress=False)
    assert res.sources == list(pairs) and res.per_example.shape[-2] == 3 and res.settings["scans"] == 2
    for j, (sources, target) in enumerate(pairs.values()):
        cols = last if target == -1 else torch.tensor(target)
        want = oracle_knockout(model, batch, "logit_diff", sets=[sources], targets=cols, window=1, per_head=True)
        torch.testing.assert_close(res.per_example[..., j, :], want[..., 0, :], atol=2e-4, rtol=1e-4)
    assert (res.per_example - res.base_per_example).abs().max() > 1e-2


def test_induction_route_shows_the_layer0_edge():
    model = headint.models.load("induction-2l")
    p = induction_prompts(16, seq_len=32, vocab=model.config.vocab_size, seed=3)
    batch = {"input_ids": p.clean, "target": p.target, "contrast": p.contrast}
    N, T = p.clean.shape
    copy = p.src + p.n_repeated  # the first occurrence of the token to copy

    def at(cols):
        m = torch.zeros(N, T, dtype=torch.bool)
        m[torch.arange(N), cols] = True
        return m

    res = route_knockout_scan(model, batch, "logit_diff", {"copy<-prev": (at(copy - 1), copy.tolist()),
                                                           "last<-copy": (at(copy), -1)}, progress=False)
    eff = res.effect  # [W=2, P=2]
    assert float(eff[0, 0]) < -10 and abs(float(eff[1, 0])) < 1e-3  # previous-token step: layer 0 only
    assert float(eff[1, 1]) < -10 and abs(float(eff[0, 1])) < 0.5  # induction step: layer 1
    default = headint.knockout_scan(model, batch, "logit_diff", sources={"all": torch.ones(N, T, dtype=torch.bool)},
                                    progress=False)
    assert abs(float(default.effect[0, 0])) < 0.5  # what the default target shows of layer 0


def test_errors(gpt2):
    batch = make_batch(N=2, T=5)
    with pytest.raises(ValueError, match="empty"):
        route_knockout_scan(gpt2, batch, "logit_diff", {})
    with pytest.raises(TypeError, match="sources, target"):
        route_knockout_scan(gpt2, batch, "logit_diff", {"a": 3})
    with pytest.raises(TypeError, match="pairs must be"):
        route_knockout_scan(gpt2, batch, "logit_diff", 3)
