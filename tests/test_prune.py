"""Pruning curves (``headint.prune_curve``): every value against hook-based ablation (one forward
per step), the greedy orders against oracle importances / exact scans, and the induction circuit of
the embedded model surviving the removal of its bystanders."""

from __future__ import annotations

import pytest
import torch

import headint
from headint.metrics import CallableMetric
from headint.tasks.induction import induction_prompts

from scan_oracles import head_dim, logits_with, make_batch, masked_mean_z, model_inputs, n_heads, n_layers, oracle_metric, out_proj, record_z

CIRCUIT = {(0, 0), (0, 1), (1, 0), (1, 2), (1, 3)}
BYSTANDERS = {(0, 2), (0, 3), (1, 1)}


def oracle_curve(model, batch, metric, removed, ablation):
    """``[S + 1, N]``: the metric with each prefix of ``removed`` ablated by hooks."""
    mean = masked_mean_z(record_z(model, batch)[0], batch["attention_mask"]) if ablation == "mean" else None
    rows = []
    for s in range(len(removed) + 1):
        edits = [(l, h, None, None if mean is None else mean[l][:, :, h]) for l, h in removed[:s]]
        rows.append(oracle_metric(metric, logits_with(model, batch, edits), batch, None))
    return torch.stack(rows)


def oracle_importance(model, batch, metric, removed):
    """``mean_i |d metric_i / d m_h|`` ``[L, H]`` with a multiplicative mask on the output
    projection's input (zero ablation), by autograd through hooks."""
    L, H, D = n_layers(model), n_heads(model), head_dim(model)
    N = batch["input_ids"].shape[0]
    m = torch.ones(N, L, H)
    for l, h in removed:
        m[:, l, h] = 0
    m.requires_grad_(True)
    handles = [out_proj(model, l).register_forward_pre_hook(
        lambda _m, args, l=l: ((args[0].view(*args[0].shape[:-1], H, D) * m[:, l][:, None, :, None]).flatten(-2),) + args[1:])
        for l in range(L)]
    try:
        values = oracle_metric(metric, model(**model_inputs(batch)).logits, batch, None)
    finally:
        for h in handles:
            h.remove()
    (g,) = torch.autograd.grad(values.sum(), m)
    return g.abs().mean(0)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_given_order_matches_hooks(model, ablation):
    batch = make_batch(N=3, T=7, pad="left", seed=3)
    order = [(1, 2), (0, 1), (2, 3), (0, 0)]
    curve = headint.prune_curve(model, batch, "logit_diff", order=order, ablation=ablation, progress=False)
    want = oracle_curve(model, batch, "logit_diff", order, ablation)
    torch.testing.assert_close(curve.per_example, want, atol=2e-4, rtol=1e-4)
    assert (want[-1] - want[0]).abs().max() > 1e-2  # the removals matter
    frame = curve.to_frame()
    assert frame["removed"].isna().tolist() == [True] + [False] * 4
    assert list(frame["removed"][1:]) == ["L1H2", "L0H1", "L2H3", "L0H0"]
    assert list(frame["fraction_removed"]) == pytest.approx([s / (n_layers(model) * n_heads(model)) for s in range(5)])


def test_importance_order_is_greedy_on_oracle_gradients(gpt2):
    batch = make_batch(N=3, T=6, seed=5)
    curve = headint.prune_curve(gpt2, batch, "logprob", order="importance", max_steps=4, progress=False)
    assert len(curve.removed) == 4
    for s, head in enumerate(curve.removed):
        imp = oracle_importance(gpt2, batch, "logprob", curve.removed[:s])
        for done in curve.removed[:s]:
            imp[done] = float("inf")
        assert head == tuple(divmod(int(imp.argmin()), n_heads(gpt2))), f"step {s + 1}"
        assert curve.scores[s] == pytest.approx(float(imp.min()), rel=1e-3, abs=1e-6)
    torch.testing.assert_close(curve.per_example, oracle_curve(gpt2, batch, "logprob", curve.removed, "zero"), atol=2e-4, rtol=1e-4)


def test_importance_order_leaves_the_models_weights_alone(gpt2):
    """The importance order differentiates the metric through the model in the scan's private
    replica: weights that require grad keep their flag (seen by a hook of the model's, which runs
    in the replica) and get no gradient; the curve is that of a model whose weights do not."""
    batch = make_batch(N=2, T=5, seed=7)
    want = headint.prune_curve(gpt2, batch, "logprob", order="importance", max_steps=2, progress=False)
    weight = gpt2.transformer.h[0].attn.c_attn.weight
    flag = weight.requires_grad
    weight.requires_grad_(True)
    seen = []
    hook = gpt2.transformer.h[1].register_forward_pre_hook(lambda m, a: seen.append(weight.requires_grad))
    try:
        got = headint.prune_curve(gpt2, batch, "logprob", order="importance", max_steps=2, progress=False)
        assert seen and all(seen)
        assert weight.requires_grad and weight.grad is None
    finally:
        hook.remove()
        weight.requires_grad_(flag)
        weight.grad = None
    assert got.removed == want.removed
    torch.testing.assert_close(got.per_example, want.per_example, atol=0, rtol=0)


def test_exact_order_is_greedy_on_exact_scans(llama):
    batch = make_batch(N=2, T=6, seed=6)
    curve = headint.prune_curve(llama, batch, "logit_diff", order="exact", max_steps=3, progress=False)
    L, H = n_layers(llama), n_heads(llama)
    for s, head in enumerate(curve.removed):
        done = curve.removed[:s]
        means = {}
        for c in [(l, h) for l in range(L) for h in range(H) if (l, h) not in done]:
            means[c] = float(oracle_curve(llama, batch, "logit_diff", done + [c], "zero")[-1].mean())
        best = max(means.values())
        assert means[head] == pytest.approx(best, abs=1e-4), f"step {s + 1}"
    # loss is minimised: the opposite choice from the same scans
    down = headint.prune_curve(llama, batch, "loss", order="exact", max_steps=1, progress=False)
    ups = headint.prune_curve(llama, batch, "loss", order="exact", max_steps=1, maximize=True, progress=False)
    assert down.per_example[1].mean() <= ups.per_example[1].mean()


def _copy_batch(n=32):
    model = headint.models.load("induction-2l")
    p = induction_prompts(n, seq_len=32, vocab=model.config.vocab_size, seed=3)
    return model, {"input_ids": p.clean, "target": p.target, "contrast": p.contrast}


ACCURACY = CallableMetric(lambda logits, b: (logits.argmax(-1) == b["target"]).float(), "accuracy", position="last")


@pytest.mark.parametrize("order", ["importance", "exact"])
def test_induction_curve_keeps_accuracy_until_a_circuit_head_goes(tmp_path, order):
    model, batch = _copy_batch()
    curve = headint.prune_curve(model, batch, "logit_diff", order=order, progress=False)
    assert set(curve.removed[:3]) == BYSTANDERS and set(curve.removed[3:]) == CIRCUIT
    m = curve.metric
    assert float(m[3]) > float(m[0]) - 1.0 and float(m[-1]) < 1.0  # logit diff ~16 intact
    # copy accuracy along the same order: near intact until the first circuit head is removed
    acc = headint.prune_curve(model, batch, ACCURACY, order=curve.removed, progress=False).metric
    assert float(acc[0]) >= 0.95 and all(float(a) >= float(acc[0]) - 0.05 for a in acc[:4])
    assert float(acc[-1]) <= 0.2
    fig = curve.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0 and fig.axes[0].get_xlabel() == "fraction of heads removed"


def test_exact_order_with_custom_metric_needs_direction():
    model, batch = _copy_batch(8)
    with pytest.raises(ValueError, match="maximize=True"):
        headint.prune_curve(model, batch, ACCURACY, order="exact")
    curve = headint.prune_curve(model, batch, ACCURACY, order="exact", maximize=True, max_steps=2, progress=False)
    # accuracy is coarse: several heads tie at "no change"; the first of them (by layer, head) goes
    assert curve.removed[0] == (0, 1) and float(curve.metric[2]) == float(curve.metric[0]) == 1.0


def test_errors_name_the_argument(gpt2):
    batch = make_batch(N=2, T=5, seed=1)
    with pytest.raises(ValueError, match="order"):
        headint.prune_curve(gpt2, batch, "logit_diff", order="random")
    with pytest.raises(ValueError, match="twice"):
        headint.prune_curve(gpt2, batch, "logit_diff", order=[(0, 1), (0, 1)])
    with pytest.raises(ValueError, match="out of range"):
        headint.prune_curve(gpt2, batch, "logit_diff", order=[(0, 9)])
    with pytest.raises(TypeError, match=r"order\[0\]"):
        headint.prune_curve(gpt2, batch, "logit_diff", order=[(0.5, 1)])
    with pytest.raises(ValueError, match="empty"):
        headint.prune_curve(gpt2, batch, "logit_diff", order=[])
    with pytest.raises(ValueError, match="ablation"):
        headint.prune_curve(gpt2, batch, "logit_diff", ablation="resample")
    with pytest.raises(ValueError, match="max_steps"):
        headint.prune_curve(gpt2, batch, "logit_diff", max_steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        headint.prune_curve(gpt2, batch, "logit_diff", batch_size=-1)
