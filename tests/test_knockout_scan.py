"""Attention-knockout scans (``headint.knockout_scan``) against an independent oracle: an eager
attention function that removes the edges from the scores (tests/tiny_models.py), one forward per
variant; plus the induction circuit of the embedded model and argument errors."""

from __future__ import annotations

import pytest
import torch

import headint
from headint.metrics import CallableMetric
from headint.tasks.induction import induction_prompts

import tiny_models as tm
from scan_oracles import make_batch, model_inputs, n_heads, n_layers, oracle_metric


def oracle_knockout(model, batch, metric, *, sets, targets, window, per_head):
    """``[W, (H,) S, N]`` by one eager forward per variant, edges removed in the scores."""
    N, T = batch["input_ids"].shape
    L, H = n_layers(model), n_heads(model)
    qsel = torch.zeros(N, T, dtype=torch.bool)
    qsel[torch.arange(N), targets] = True
    heads_axis = [[h] for h in range(H)] if per_head else [list(range(H))]
    out = torch.zeros(L - window + 1, len(heads_axis), len(sets), N)
    for w in range(L - window + 1):
        for hi, heads in enumerate(heads_axis):
            for s, ksel in enumerate(sets):
                spec = tm.OracleSpec(removed={l: [(heads, qsel, ksel)] for l in range(w, w + window)})
                with torch.no_grad(), tm.oracle_attention(model, spec):
                    logits = model(**model_inputs(batch)).logits
                out[w, hi, s] = oracle_metric(metric, logits, batch, None)
    return out if per_head else out[:, 0]


@pytest.mark.parametrize("window,per_head", [(1, True), (2, False)])
@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_matches_eager_oracle(model, window, per_head, pad):
    batch = make_batch(N=3, T=7, pad=pad, seed=4)
    N, T = batch["input_ids"].shape
    mask = batch["attention_mask"]
    last = torch.tensor([int(mask[n].nonzero().max()) for n in range(N)])
    sets = {"first": torch.zeros(N, T, dtype=torch.bool), "two": torch.zeros(N, T, dtype=torch.bool)}
    sets["first"][:, 0] = True
    for n in range(N):  # per-example sets: the two real tokens before the target
        sets["two"][n, last[n] - 2 : last[n]] = True
    res = headint.knockout_scan(model, batch, "logit_diff", sources=sets, window=window, per_head=per_head, progress=False)
    want = oracle_knockout(model, batch, "logit_diff", sets=list(sets.values()), targets=last, window=window, per_head=per_head)
    assert res.per_example.shape == want.shape
    torch.testing.assert_close(res.per_example, want, atol=2e-4, rtol=1e-4)
    # the knockouts change something (the test can fail) and the base run is the plain model
    assert (res.per_example - res.base_per_example).abs().max() > 1e-2
    base = oracle_metric("logit_diff", model(**model_inputs(batch)).logits.detach(), batch, None)
    torch.testing.assert_close(res.base_per_example, base, atol=2e-4, rtol=1e-4)


def test_each_position_and_explicit_target(gpt2):
    batch = make_batch(N=2, T=6, seed=2)
    N, T = batch["input_ids"].shape
    target = 3  # an earlier query: the metric still reads the last position
    res = headint.knockout_scan(gpt2, batch, "logprob", sources="each", target_position=target, window=1, progress=False)
    assert res.sources == list(range(T)) and res.per_example.shape == (n_layers(gpt2), T, N)
    sets = [torch.nn.functional.one_hot(torch.full((N,), p), T).bool() for p in range(T)]
    want = oracle_knockout(gpt2, batch, "logprob", sets=sets, targets=torch.full((N,), target), window=1, per_head=False)
    torch.testing.assert_close(res.per_example, want, atol=2e-4, rtol=1e-4)
    # keys after the (causal) target are not edges: blocking them changes nothing
    torch.testing.assert_close(res.per_example[:, target + 1 :], res.base_per_example.expand(n_layers(gpt2), T - target - 1, N))
    # batch size does not change a number
    small = headint.knockout_scan(gpt2, batch, "logprob", sources="each", target_position=target, batch_size=1, progress=False)
    torch.testing.assert_close(small.per_example, res.per_example, atol=1e-5, rtol=1e-5)
    frame = res.to_frame()
    assert len(frame) == n_layers(gpt2) * T and {"layer", "layers", "source", "value", "effect", "effect_stderr", "n"} <= set(frame)


def test_induction_circuit_needs_layer1_edges(tmp_path):
    """Blocking the final position's edges to the token after the earlier occurrence of the current
    token destroys copying in layer 1 (where the induction heads read it) and not in layer 0."""
    model = headint.models.load("induction-2l")
    p = induction_prompts(24, seq_len=32, vocab=model.config.vocab_size, seed=11)
    batch = {"input_ids": p.clean, "target": p.target, "contrast": p.contrast}
    after_prev = torch.nn.functional.one_hot(p.src + p.n_repeated, 32).bool()  # the token after A_{k-1}'s first occurrence
    accuracy = CallableMetric(lambda logits, b: (logits.argmax(-1) == b["target"]).float(), "accuracy", position="last")
    res = headint.knockout_scan(model, batch, accuracy, sources={"after_prev": after_prev, "bos": [0]}, progress=False)
    assert float(res.base_per_example.mean()) >= 0.9
    layer0, layer1 = res.values[0], res.values[1]
    assert float(layer0[0]) >= 0.9 and float(layer1[0]) <= 0.2
    assert float(layer1[1]) >= 0.9  # blocking an unrelated key does not
    ld = headint.knockout_scan(model, batch, "logit_diff", sources={"after_prev": after_prev}, progress=False)
    assert float(ld.effect[1, 0]) < -10 and abs(float(ld.effect[0, 0])) < 0.5
    fig = ld.heatmap(tmp_path / "ko.png")
    assert (tmp_path / "ko.png").stat().st_size > 0 and fig.axes


def test_errors_name_the_argument(gpt2):
    batch = make_batch(N=2, T=6, seed=1, pad="left", lengths=[6, 4])
    with pytest.raises(ValueError, match="window"):
        headint.knockout_scan(gpt2, batch, "logit_diff", window=n_layers(gpt2) + 1)
    with pytest.raises(ValueError, match="window"):
        headint.knockout_scan(gpt2, batch, "logit_diff", window=0)
    with pytest.raises(ValueError, match="sources positions \\[6\\] out of range"):
        headint.knockout_scan(gpt2, batch, "logit_diff", sources=[6])
    with pytest.raises(ValueError, match="sources"):
        headint.knockout_scan(gpt2, batch, "logit_diff", sources="all")
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        headint.knockout_scan(gpt2, batch, "logit_diff", sources=torch.zeros(3, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="sources"):
        headint.knockout_scan(gpt2, batch, "logit_diff", sources=[1.5])
    with pytest.raises(ValueError, match="points at padding in examples \\[1\\]"):
        headint.knockout_scan(gpt2, batch, "logit_diff", target_position=0)
    with pytest.raises(ValueError, match="target_position"):
        headint.knockout_scan(gpt2, batch, "logit_diff", target_position=[5])
    with pytest.raises(TypeError, match="target_position"):
        headint.knockout_scan(gpt2, batch, "logit_diff", target_position=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        headint.knockout_scan(gpt2, batch, "logit_diff", batch_size=0)
    with pytest.raises(TypeError, match="per_head"):
        headint.knockout_scan(gpt2, batch, "logit_diff", per_head="yes")
