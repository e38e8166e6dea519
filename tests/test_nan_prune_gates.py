"""NaN metric rows in ``prune_curve`` and ``learn_gates`` follow the scans' rule: aggregates over
each cell's finite examples with one ``NaNMetricWarning`` naming how many and which, or a refusal
where no finite value remains. Never a silently wrong order, gate or curve.

The poisoned metrics are NaN (or have a non-finite gradient) on example 0 only; the reference
is the same call on the batch without example 0, where nothing is NaN.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import headint
from headint import NaNMetricWarning
from headint.metrics import CallableMetric
from scan_oracles import make_batch

NAN = float("nan")


def _batch(N=4, T=6, seed=5):
    b = make_batch(N, T, seed=seed)
    b["poison"] = torch.arange(N) == 0
    return b


def _without_first(batch):
    return {k: v[1:] for k, v in batch.items()}


def _metric(kind: str) -> CallableMetric:
    """A logit difference (ids 1 vs 2, last position) poisoned on the rows with ``batch['poison']``:
    ``where``: NaN through ``torch.where`` (finite gradient); ``arith``: times NaN (NaN gradient);
    ``grad``: a finite value whose gradient is infinite; ``clean``: never poisoned."""

    def metric(logits, batch):
        ld = logits[:, 1].float() - logits[:, 2].float()
        p = batch["poison"].to(ld.device)
        if kind == "where":
            return torch.where(p, torch.full_like(ld, NAN), ld)
        if kind == "arith":
            return ld * torch.where(p, NAN, 1.0)
        if kind == "grad":  # sqrt(|0|) on poisoned rows: value + 0, gradient inf; sqrt(|1|) * 0 elsewhere
            return ld + (ld - ld.detach() + (~p).float()).abs().sqrt() * p.float()
        return ld

    return CallableMetric(metric, name=f"ld_{kind}", position="last", maximize=True)


def _nan_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, NaNMetricWarning)]


# ----------------------------------------------------------------------------------------------- prune_curve


def test_prune_exact_with_a_nan_row_ranks_by_the_finite_examples(gpt2):
    batch = _batch()
    ref = headint.prune_curve(gpt2, _without_first(batch), _metric("clean"), order="exact", max_steps=4, progress=False)
    assert ref.removed != [(0, 0), (0, 1), (0, 2), (0, 3)], "the reference must not be index order for this test to bite"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = headint.prune_curve(gpt2, batch, _metric("where"), order="exact", max_steps=4, progress=False)
    assert got.removed == ref.removed
    torch.testing.assert_close(got.metric, ref.metric, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got.scores), torch.tensor(ref.scores), rtol=1e-6, atol=1e-6)
    assert bool(torch.isnan(got.per_example[:, 0]).all()) and bool(torch.isfinite(got.per_example[:, 1:]).all())
    assert got.n.tolist() == [3] * 5 and got.to_frame()["n"].tolist() == [3] * 5
    msgs = _nan_warnings(record)
    assert len(msgs) == 1, msgs
    assert "prune_curve: metric 'ld_where' is NaN or infinite" in msgs[0] and "among the candidate removals" in msgs[0]
    assert "in the curve at steps [0, 1, 2, 3, 4] (examples [0])" in msgs[0]


@pytest.mark.parametrize("kind", ["arith", "grad"])
def test_prune_importance_leaves_out_rows_whose_value_or_gradient_is_not_finite(gpt2, kind):
    batch = _batch()
    ref = headint.prune_curve(gpt2, _without_first(batch), _metric("clean"), order="importance", max_steps=3, progress=False)
    with pytest.warns(NaNMetricWarning, match=r"\(value or gradient\) in the importance estimates at steps \[0, 1, 2\] \(examples \[0\]\)"):
        got = headint.prune_curve(gpt2, batch, _metric(kind), order="importance", max_steps=3, progress=False)
    assert got.removed == ref.removed
    torch.testing.assert_close(torch.tensor(got.scores), torch.tensor(ref.scores), rtol=1e-5, atol=1e-6)
    if kind == "grad":  # the values themselves are finite: the curve keeps every example
        assert bool(torch.isfinite(got.per_example).all()) and got.n.tolist() == [4] * 4
    else:
        torch.testing.assert_close(got.metric, ref.metric, rtol=1e-6, atol=1e-6)


def test_prune_given_order_warns_and_uses_the_finite_examples(gpt2):
    batch = _batch()
    order = [(1, 2), (0, 1), (2, 3)]
    ref = headint.prune_curve(gpt2, _without_first(batch), _metric("clean"), order=order, progress=False)
    with pytest.warns(NaNMetricWarning, match=r"in the curve at steps \[0, 1, 2, 3\] \(examples \[0\]\)"):
        got = headint.prune_curve(gpt2, batch, _metric("where"), order=order, progress=False)
    torch.testing.assert_close(got.metric, ref.metric, rtol=1e-6, atol=1e-6)


def test_prune_refuses_when_no_example_is_finite(gpt2):
    batch = _batch()
    batch["poison"][:] = True
    for order in ("exact", "importance", [(0, 1)]):
        with pytest.raises(ValueError, match=r"prune_curve: metric 'ld_where' is NaN or infinite for every example with no "
                                             r"head removed \(examples \[0, 1, 2, 3\]\)"):
            headint.prune_curve(gpt2, batch, _metric("where"), order=order, progress=False)


def _nan_after(calls: int, name="late") -> CallableMetric:
    """Finite for the first ``calls`` calls, NaN for every row after."""
    seen = [0]

    def metric(logits, batch):
        seen[0] += 1
        ld = logits[:, 1] - logits[:, 2]
        return ld if seen[0] <= calls else ld * NAN

    return CallableMetric(metric, name=name, position="last", maximize=True)


def test_prune_exact_refuses_a_step_where_every_candidate_is_nan(gpt2):
    with pytest.raises(ValueError, match=r"at step 1, removing any of the 12 remaining heads leaves the metric 'late' NaN"):
        headint.prune_curve(gpt2, _batch(), _nan_after(1), order="exact", progress=False)


def test_prune_importance_refuses_a_step_without_any_finite_gradient(gpt2):
    with pytest.raises(ValueError, match=r"or its gradient is NaN or infinite for every example with 0 heads removed"):
        headint.prune_curve(gpt2, _batch(), _nan_after(1), order="importance", progress=False)


def test_prune_without_nan_warns_nothing(gpt2):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaNMetricWarning)
        headint.prune_curve(gpt2, _batch(), _metric("clean"), order="exact", max_steps=2, progress=False)


# ----------------------------------------------------------------------------------------------- learn_gates


def test_gates_with_an_arithmetic_nan_row_train_on_the_finite_rows(gpt2):
    """Before: every gate NaN, open_heads == closed_heads == []. Now: the gates trained on the other rows."""
    batch = _batch()
    kw = dict(kind="sigmoid", steps=15, lr=0.3, penalty_weight=0.05, progress=False)
    ref = headint.learn_gates(gpt2, _without_first(batch), _metric("clean"), **kw)
    with pytest.warns(NaNMetricWarning) as record:
        got = headint.learn_gates(gpt2, batch, _metric("arith"), **kw)
    assert bool(torch.isfinite(got.params).all()) and bool(torch.isfinite(got.gates).all())
    torch.testing.assert_close(got.params, ref.params, rtol=1e-4, atol=1e-5)
    assert len(got.open_heads) + len(got.closed_heads) == 12 and got.open_heads == ref.open_heads
    assert got.intact == pytest.approx(ref.intact, rel=1e-6) and got.final == pytest.approx(ref.final, rel=1e-5)
    assert got.curve["n"].tolist() == [3] * 15 and bool(got.curve["metric"].notna().all())
    msg = " ".join(_nan_warnings(record))
    assert "learn_gates: metric 'ld_arith' is NaN or infinite for" in msg
    assert "of the intact model (examples [0])" in msg and "in training minibatches at steps [0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in msg
    assert "with the closed heads ablated" in msg
    assert got.settings["finite_examples"] == dict(intact=3, final=3, of=4)


def test_gates_with_a_where_nan_row_keep_intact_final_and_curve_finite(gpt2):
    """Before: intact, final and the curve's metric NaN. Now: means over the finite examples."""
    batch = _batch()
    with pytest.warns(NaNMetricWarning, match="intact is their mean over the finite examples"):
        got = headint.learn_gates(gpt2, batch, _metric("where"), steps=5, progress=False)
    with torch.no_grad():
        ref_intact = float(_metric("clean")(gpt2(batch["input_ids"][1:]).logits[:, -1], _without_first(batch)).mean())
    assert got.intact == pytest.approx(ref_intact, rel=1e-5)
    assert torch.isfinite(torch.tensor([got.intact, got.final])).all()
    assert bool(got.curve["metric"].notna().all()) and bool(got.curve["objective"].notna().all())


def test_gates_drop_rows_with_a_non_finite_gradient_only(gpt2):
    batch = _batch()
    kw = dict(kind="sigmoid", steps=5, lr=0.3, progress=False)
    ref = headint.learn_gates(gpt2, _without_first(batch), _metric("clean"), **kw)
    with pytest.warns(NaNMetricWarning, match=r"\(value or gradient\) in training minibatches"):
        got = headint.learn_gates(gpt2, batch, _metric("grad"), **kw)
    torch.testing.assert_close(got.params, ref.params, rtol=1e-4, atol=1e-5)


def test_gates_refuse_when_no_example_is_finite(gpt2):
    batch = _batch()
    batch["poison"][:] = True
    with pytest.raises(ValueError, match=r"learn_gates: metric 'ld_where' is NaN or infinite for every example of the intact model"):
        headint.learn_gates(gpt2, batch, _metric("where"), steps=2, progress=False)


def test_gates_refuse_a_training_step_without_finite_rows(gpt2):
    with pytest.raises(ValueError, match=r"every example of training step 0's minibatch \(examples \["):
        headint.learn_gates(gpt2, _batch(), _nan_after(1), steps=3, progress=False)


def test_gates_refuse_a_nan_gradient_that_reaches_every_row(gpt2):
    """``torch.where`` leaves the NaN branch out of the value but not out of the gradient
    (``0 * inf``): every row's gradient is NaN; refused, not trained on NaN."""

    def metric(logits, batch):
        ld = logits[:, 1] - logits[:, 2]
        return torch.where(batch["poison"].to(ld.device), (ld - ld.detach()).abs().sqrt(), ld)

    with pytest.raises(ValueError, match=r"at training step 0 the gradient of metric 'trap' is NaN or infinite for every example"):
        headint.learn_gates(gpt2, _batch(), CallableMetric(metric, name="trap", position="last", maximize=True),
                            steps=2, progress=False)


def test_gates_final_without_finite_values_is_nan_and_said(gpt2):
    steps = 3
    with pytest.warns(NaNMetricWarning, match=r"4 values with the closed heads ablated .*final is their mean over the finite "
                                              r"examples \(NaN if none is\)"):
        got = headint.learn_gates(gpt2, _batch(), _nan_after(1 + steps), steps=steps, progress=False)
    assert got.final != got.final and got.intact == got.intact  # final NaN, intact finite
    assert got.settings["finite_examples"] == dict(intact=4, final=0, of=4)
