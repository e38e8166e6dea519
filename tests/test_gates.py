"""Learned head gates (``headint.learn_gates``): the mask gradient they train on against autograd
through hooks, determinism, frozen-and-restored weights, the induction circuit of the embedded
model, and argument errors."""

from __future__ import annotations

import pytest
import torch

import headint
from headint.scans.masking import ablation_patches, mask_plan
from headint.scans.setup import prepare_scan
from headint.tasks.induction import copy_accuracy, induction_prompts

from scan_oracles import head_dim, make_batch, model_inputs, n_heads, n_layers, oracle_metric, out_proj

CIRCUIT = {(0, 0), (0, 1), (1, 0), (1, 2), (1, 3)}
BYSTANDERS = {(0, 2), (0, 3), (1, 1)}


def oracle_masked(model, batch, metric, gates):
    """Metric ``[N]`` with head outputs multiplied by ``gates [N, L, H]`` at the output projection's input."""
    L, H, D = n_layers(model), n_heads(model), head_dim(model)
    handles = [out_proj(model, l).register_forward_pre_hook(
        lambda _m, args, l=l: ((args[0].view(*args[0].shape[:-1], H, D) * gates[:, l][:, None, :, None]).flatten(-2),) + args[1:])
        for l in range(L)]
    try:
        return oracle_metric(metric, model(**model_inputs(batch)).logits, batch, None)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_mask_gradient_matches_autograd_through_hooks(model, backend):
    """What learn_gates differentiates: the metric under per-row gates in the kernels' head mask."""
    batch = make_batch(N=3, T=7, pad="left", seed=8)
    N, L, H = 3, n_layers(model), n_heads(model)
    gates = torch.rand(N, L, H, generator=torch.Generator().manual_seed(0))
    setup = prepare_scan(model, batch, None, "logit_diff", kind="test", backend=backend)
    with setup.base_runs() as runs:
        g = gates.clone().requires_grad_(True)
        plan = mask_plan([g[:, l] for l in range(L)], ablation_patches(runs.clean, "zero"))
        with torch.enable_grad():
            values = runs.clean.run_differentiable(torch.arange(N), plan)
            (grad,) = torch.autograd.grad(values.sum(), g)
    o = gates.clone().requires_grad_(True)
    want = oracle_masked(model, batch, "logit_diff", o)
    (want_grad,) = torch.autograd.grad(want.sum(), o)
    torch.testing.assert_close(values.detach(), want.detach(), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(grad, want_grad, atol=2e-4, rtol=1e-3)
    assert want_grad.abs().max() > 1e-2


def _prompts(n=32):
    model = headint.models.load("induction-2l")
    p = induction_prompts(n, seq_len=32, vocab=model.config.vocab_size, seed=3)
    return model, {"input_ids": p.clean, "target": p.target, "contrast": p.contrast}


@pytest.mark.parametrize("kind,weight,steps,init", [("hard_concrete", 2.0, 60, 2.0), ("sigmoid", 0.6, 60, 3.0)])
def test_induction_gates_keep_the_circuit_and_close_the_bystanders(tmp_path, kind, weight, steps, init):
    """L0H3 counts as a bystander in training.json but is a weak third previous-token head (zero-ablating it
    costs ~0.2 logit difference alone, ~0.6 with L0H0 gone): the penalty must outweigh that."""
    model, batch = _prompts()
    res = headint.learn_gates(model, batch, "logit_diff", kind=kind, penalty_weight=weight, steps=steps, init=init, progress=False)
    assert set(res.open_heads) == CIRCUIT and set(res.closed_heads) == BYSTANDERS, res.gates
    assert res.final > res.intact - 0.5  # logit difference ~16 intact
    assert res.curve["open_heads"].iloc[0] == 8 and res.curve["open_heads"].iloc[-1] == 5
    assert res.curve["penalty"].iloc[-1] < res.curve["penalty"].iloc[0]
    # copy accuracy on fresh copy-task sequences with the closed heads ablated
    intact, _ = copy_accuracy(model, batch=64)
    with headint.intervene(model, [headint.Ablate(layer=l, head=h) for l, h in res.closed_heads]):
        pruned, _ = copy_accuracy(model, batch=64)
    assert intact >= 0.95 and pruned >= intact - 0.02
    frame = res.to_frame()
    assert len(frame) == 8 and set(frame.loc[frame["open"], "name"]) == {"L0H0", "L0H1", "L1H0", "L1H2", "L1H3"}
    res.heatmap(tmp_path / "gates.png")
    res.plot_curve(tmp_path / "curve.png")
    assert (tmp_path / "gates.png").stat().st_size > 0 and (tmp_path / "curve.png").stat().st_size > 0
    # the gate order drives a pruning curve: bystanders first
    curve = headint.prune_curve(model, batch, "logit_diff", order=res, progress=False)
    assert set(curve.removed[:3]) == BYSTANDERS and curve.order == "gates"


def test_seeded_and_deterministic(gpt2):
    batch = make_batch(N=4, T=6, seed=2)
    kw = dict(steps=6, batch_size=2, lr=0.3, penalty_weight=0.05, progress=False)
    a = headint.learn_gates(gpt2, batch, "logprob", seed=1, **kw)
    b = headint.learn_gates(gpt2, batch, "logprob", seed=1, **kw)
    c = headint.learn_gates(gpt2, batch, "logprob", seed=2, **kw)
    assert torch.equal(a.params, b.params) and a.curve.equals(b.curve)
    assert not torch.equal(a.params, c.params)
    s1 = headint.learn_gates(gpt2, batch, "logprob", kind="sigmoid", seed=1, **kw)
    s2 = headint.learn_gates(gpt2, batch, "logprob", kind="sigmoid", seed=1, **kw)
    assert torch.equal(s1.params, s2.params)


def test_weights_frozen_during_and_restored_after(gpt2):
    batch = make_batch(N=2, T=5, seed=3)
    flags = {n: p.requires_grad for n, p in gpt2.named_parameters()}
    before = {n: p.detach().clone() for n, p in gpt2.named_parameters()}
    gpt2.transformer.h[0].attn.c_attn.weight.requires_grad_(True)
    gpt2.train()
    from headint.integration.structure import model_structure

    # the structure probe (once per model, before any training) is not this test's subject: run it
    # first, so the test does not depend on whether another test met this model before
    model_structure(gpt2)
    seen = []
    hook = gpt2.transformer.h[0].register_forward_pre_hook(
        lambda m, a: seen.append((gpt2.transformer.h[0].attn.c_attn.weight.requires_grad, m.training or not gpt2.training)))  # eval in the scan's replica; the model's own flags untouched
    try:
        headint.learn_gates(gpt2, batch, "logprob", steps=2, progress=False)
    finally:
        hook.remove()
    # the model's requires_grad flags are never switched (other threads see them), and no gradient reaches it
    assert seen and all(s == (True, False) for s in seen)
    assert gpt2.training and gpt2.transformer.h[0].attn.c_attn.weight.requires_grad
    assert gpt2.transformer.h[0].attn.c_attn.weight.grad is None
    assert all(torch.equal(p, before[n]) for n, p in gpt2.named_parameters())
    for n, p in gpt2.named_parameters():
        p.requires_grad_(flags[n])
    gpt2.eval()
    # and on error (a metric that fails) too
    gpt2.transformer.h[0].attn.c_attn.weight.requires_grad_(True)
    with pytest.raises(ValueError):
        headint.learn_gates(gpt2, batch, lambda logits: logits[:, 0, :3], maximize=True, steps=1, progress=False)
    assert gpt2.transformer.h[0].attn.c_attn.weight.requires_grad
    gpt2.transformer.h[0].attn.c_attn.weight.requires_grad_(flags["transformer.h.0.attn.c_attn.weight"])


def test_mean_ablation_gates_run(gpt2):
    batch = make_batch(N=3, T=6, seed=4)
    res = headint.learn_gates(gpt2, batch, "loss", ablation="mean", steps=3, progress=False)
    assert res.settings["ablation"] == "mean" and res.settings["maximize"] is False
    assert torch.isfinite(torch.tensor(res.curve["loss"].to_numpy())).all()


def test_errors_name_the_argument(gpt2):
    batch = make_batch(N=2, T=5, seed=1)
    with pytest.raises(ValueError, match="kind"):
        headint.learn_gates(gpt2, batch, "loss", kind="l0")
    with pytest.raises(ValueError, match="maximize=True"):
        headint.learn_gates(gpt2, batch, lambda logits: logits[:, -1, 0])
    with pytest.raises(TypeError, match="maximize"):
        headint.learn_gates(gpt2, batch, "loss", maximize="yes")
    with pytest.raises(ValueError, match="stretch"):
        headint.learn_gates(gpt2, batch, "loss", stretch=(0.1, 1.1))
    with pytest.raises(ValueError, match="steps"):
        headint.learn_gates(gpt2, batch, "loss", steps=0)
    with pytest.raises(ValueError, match="lr"):
        headint.learn_gates(gpt2, batch, "loss", lr=0)
    with pytest.raises(ValueError, match="penalty_weight"):
        headint.learn_gates(gpt2, batch, "loss", penalty_weight=-1)
    with pytest.raises(ValueError, match="threshold"):
        headint.learn_gates(gpt2, batch, "loss", threshold=2)
    with pytest.raises(ValueError, match="ablation"):
        headint.learn_gates(gpt2, batch, "loss", ablation="patch")
