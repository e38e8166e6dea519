"""``learn_gates(tolerance=x)``: the penalty searched until the kept set is the smallest that keeps
faithfulness >= x. On induction-2l it must find a true minimal set, checked against all 256
head subsets (one batched circuit_faithfulness call per ablation), for zero and for mean
ablation; the kept set's reported faithfulness against hooks; ``prune_curve(order=gates)``
removes the heads by the learned order (kept set last); argument errors."""

from __future__ import annotations

import itertools

import pytest
import torch

import headint
from headint.scans.faithfulness import circuit_faithfulness
from headint.tasks.induction import induction_prompts

from scan_oracles import logits_with, masked_mean_z, oracle_metric, record_z

HEADS = [(l, h) for l in range(2) for h in range(4)]


@pytest.fixture(scope="module")
def induction():
    model = headint.models.load("induction-2l")
    p = induction_prompts(32, seq_len=32, vocab=model.config.vocab_size, seed=3)
    return model, {"input_ids": p.clean, "attention_mask": torch.ones_like(p.clean), "target": p.target, "contrast": p.contrast}


def exhaustive(model, batch, ablation):
    """``{frozenset(kept): faithfulness}`` over all 2^8 head subsets."""
    subsets = [list(c) for k in range(9) for c in itertools.combinations(HEADS, k)]
    res = circuit_faithfulness(model, batch, subsets, ablation=ablation, batch_size=512)
    return {frozenset(s): float(f) for s, f in zip(subsets, res.faithfulness())}


def oracle_faithfulness(model, batch, kept, ablation):
    zs, _ = record_z(model, batch)
    src = masked_mean_z(zs, batch["attention_mask"]) if ablation == "mean" else None

    def value(keep):
        edits = [(l, h, None, None if src is None else src[l][:, :, h]) for l, h in HEADS if (l, h) not in keep]
        return oracle_metric("logit_diff", logits_with(model, batch, edits), batch, None).double().mean()

    return float((value(set(kept)) - value(set())) / (value(set(HEADS)) - value(set())))


@pytest.mark.parametrize("ablation,tolerance", [("zero", 0.9), pytest.param("mean", 0.8, marks=pytest.mark.slow)])
def test_tolerance_finds_a_true_minimal_set(induction, ablation, tolerance):
    model, batch = induction
    table = exhaustive(model, batch, ablation)
    assert len(table) == 256
    minimum = min(len(s) for s, f in table.items() if f >= tolerance)
    assert minimum == {"zero": 4, "mean": 3}[ablation]  # the exhaustive numbers
    res = headint.learn_gates(model, batch, "logit_diff", ablation=ablation, tolerance=tolerance, penalty_weight=0.1,
                              steps=60, progress=False)
    kept = frozenset(res.open_heads)
    assert len(kept) == minimum, (res.open_heads, res.path)
    assert res.faithfulness >= tolerance
    assert abs(res.faithfulness - table[kept]) < 1e-6
    assert abs(res.faithfulness - oracle_faithfulness(model, batch, kept, ablation)) < 1e-4
    path = res.path
    assert path["keeps"].any() and (~path["keeps"]).any() and int(path["chosen"].sum()) == 1
    assert res.settings["tolerance"] == tolerance and res.settings["runs"] == len(path) <= 12
    # prune_curve by the learned order: the kept set goes last, so the curve keeps the tolerance
    # until a kept head is removed
    order = res.order()
    assert set(order[-len(kept):]) == kept
    curve = headint.prune_curve(model, batch, "logit_diff", order=res, ablation=ablation, progress=False)
    assert curve.removed == order
    frame = res.to_frame()
    assert set(map(tuple, frame.loc[frame["open"], ["layer", "head"]].values.tolist())) == kept


def test_order_is_by_logits_not_clamped_gates(induction):
    """Hard-Concrete gates clamp at 1; the order reads log_alpha, so it is total and puts the
    heads that matter most last."""
    model, batch = induction
    res = headint.learn_gates(model, batch, "logit_diff", kind="sigmoid", penalty_weight=0.6, steps=60, progress=False)
    order = res.order()
    params = [float(res.params[h]) for h in order]
    assert params == sorted(params)
    assert res.kept is None and res.faithfulness is None


def test_tolerance_errors(induction):
    model, batch = induction
    with pytest.raises(ValueError, match="tolerance"):
        headint.learn_gates(model, batch, "logit_diff", tolerance=1.5, steps=1, progress=False)
    with pytest.raises(ValueError, match="tolerance"):
        headint.learn_gates(model, batch, "logit_diff", tolerance=0.0, steps=1, progress=False)
    with pytest.raises(ValueError, match="max_runs"):
        headint.learn_gates(model, batch, "logit_diff", tolerance=0.9, max_runs=1, steps=1, progress=False)
    with pytest.raises(ValueError, match="penalty_weight"):
        headint.learn_gates(model, batch, "logit_diff", tolerance=0.9, penalty_weight=0.0, steps=1, progress=False)
    with pytest.raises(TypeError, match="refine"):
        headint.learn_gates(model, batch, "logit_diff", tolerance=0.9, refine="yes", steps=1, progress=False)
