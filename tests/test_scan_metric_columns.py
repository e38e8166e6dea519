"""Callable metrics reading a few vocabulary columns: variants unembed only those columns.

After the last-position probe (``test_scan_speedpaths.py``) accepts a callable, the column probe
(:func:`headint.scans.metric_logits.column_form`) finds the columns it reads; variants unembed only
those into a NaN-filled ``[R, V]`` and check every batch (:func:`column_values`). Each test here
tries to make that path give a wrong number: whole-vocabulary metrics, per-example columns,
columns read only behind a branch the base runs never take, columns read with zero gradient.
The oracle is ``scan_oracles.oracle_scan`` (one hooked forward per intervention, full logits);
the full path is the same callable with ``probe_last=False``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import headint
import headint.scans.metric_logits as metric_logits
from headint.metrics import CallableMetric
from headint.scans.metric_logits import ColumnsOf, LastPositionOf, column_form, column_values
from scan_oracles import VOCAB, corrupt_of, make_batch, oracle_scan, record_z

BACKEND = "reference"


def scan(model, batch, metric, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("backend", BACKEND)
    return headint.scan(model, batch, metric, **kw)


def assert_close(got, want, tol):
    assert got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    fin = ~torch.isnan(want)
    diff = float((got[fin] - want[fin]).detach().abs().max())
    assert diff <= tol, f"max |got - want| = {diff:.3g} > {tol}"


def full_path(model, batch, fn, **kw):
    return scan(model, batch, CallableMetric(fn, probe_last=False), **kw)


@pytest.fixture
def column_calls(monkeypatch):
    """Counts the variant batches computed on the column path."""
    calls = []
    real = metric_logits.column_values

    def spy(*a, **k):
        calls.append(a[1].shape[0])
        return real(*a, **k)

    import headint.scans.runner as runner
    monkeypatch.setattr(runner, "column_values", spy)
    return calls


# ------------------------------------------------------------------------------ the fast path


def two_columns(logits, batch):
    return logits[:, -1, 3] - logits[:, -1, 5]


@pytest.mark.parametrize("per_position", [False, True])
def test_two_columns_take_the_column_path_and_match(model, per_position, column_calls):
    batch = make_batch(3, 7, seed=201, pad="left", lengths=[7, 5, 6])
    corrupt = corrupt_of(batch)
    kw = dict(corrupt=corrupt, method="patch", per_position=per_position, heads=[1, 3] if per_position else None)
    r = scan(model, batch, two_columns, **kw)
    assert r.settings["metric_logits"] == f"last position, form single, columns 2 of {VOCAB}", r.settings["metric_logits"]
    assert column_calls, "no variant batch took the column path"
    assert_close(r.per_example, full_path(model, batch, two_columns, **kw).per_example, 1e-6)
    assert_close(r.per_example, oracle_scan(model, batch, two_columns, corrupt=corrupt, method="patch",
                                            per_position=per_position, heads=kw["heads"]), 1e-5)


@pytest.mark.parametrize("name,fn", [
    ("softmax", lambda logits, batch: logits[:, -1].softmax(-1)[:, 3]),
    ("log_softmax", lambda logits, batch: logits[:, -1].log_softmax(-1)[:, 3]),
    ("logsumexp", lambda logits, batch: logits[:, -1].logsumexp(-1)),
    ("argmax", lambda logits, batch: (logits[:, -1].argmax(-1) == 3).float()),
    ("max", lambda logits, batch: logits[:, -1].max(-1).values - logits[:, -1, 3]),
    ("comparison", lambda logits, batch: (logits[:, -1] > logits[:, -1, 3:4]).sum(-1).float()),
    ("transposed reduction", lambda logits, batch: logits[:, -1].T.amax(0)),
])
def test_whole_vocabulary_metrics_keep_the_full_vocabulary(gpt2, name, fn, column_calls):
    batch = make_batch(3, 6, seed=202)
    r = scan(gpt2, batch, fn, method="zero")
    path = r.settings["metric_logits"]
    assert path.startswith("last position, form single, full vocabulary ("), path
    assert not column_calls
    assert_close(r.per_example, oracle_scan(gpt2, batch, fn, method="zero"), 1e-5)


def test_columns_that_depend_on_the_example_are_the_union(gpt2):
    batch = make_batch(4, 6, seed=203)
    batch["target"] = torch.tensor([3, 7, 3, 11])
    corrupt = dict(corrupt_of(batch), target=batch["target"])

    def own_target(logits, batch):
        return logits[torch.arange(logits.shape[0]), -1, batch["target"]]

    r = scan(gpt2, batch, own_target, corrupt=corrupt, method="patch")
    assert r.settings["metric_logits"] == f"last position, form single, columns 3 of {VOCAB}", r.settings["metric_logits"]
    assert_close(r.per_example, full_path(gpt2, batch, own_target, corrupt=corrupt, method="patch").per_example, 1e-6)
    assert_close(r.per_example, oracle_scan(gpt2, batch, own_target, corrupt=corrupt, method="patch"), 1e-5)


# ------------------------------------------------------------------------------ columns the base runs do not show


def _last(model, batch):
    _, full = record_z(model, batch)
    return full[torch.arange(full.shape[0]), batch["attention_mask"].sum(1) - 1]


def test_a_branch_the_base_run_never_takes_falls_back_per_batch(gpt2):
    """Reads column 9 only where column 5 exceeds a threshold no base row reaches: the probe
    accepts column 5 alone; variants that cross it see NaN and are recomputed in full."""
    batch = make_batch(3, 6, seed=204)
    thr = float(_last(gpt2, batch)[:, 5].max())

    def branch(logits, batch):
        x5 = logits[:, -1, 5]
        return torch.where(x5 > thr, logits[:, -1, 9], x5)

    crossed = oracle_scan(gpt2, batch, lambda lg, b: (lg[:, -1, 5] > thr).float(), method="zero")
    assert crossed.nansum() > 0, "test premise: some variant must cross the threshold"
    r = scan(gpt2, batch, branch, method="zero")
    path = r.settings["metric_logits"]
    assert path.startswith(f"last position, form single, columns 1 of {VOCAB} (") and "full vocabulary" in path, path
    assert_close(r.per_example, oracle_scan(gpt2, batch, branch, method="zero"), 1e-5)
    assert_close(r.per_example, full_path(gpt2, batch, branch, method="zero").per_example, 1e-6)


def test_a_step_on_a_column_with_zero_gradient_is_not_missed(gpt2):
    """Column 7 enters through a step (zero gradient everywhere): the extreme fills see it on the
    base run, whichever side of the step the base rows lie."""
    batch = make_batch(3, 6, seed=205)
    last = _last(gpt2, batch)
    for thr in (float(last[:, 7].max()) + 1e3, float(last[:, 7].min()) - 1e3):  # no row / every row above, beyond any noise
        def step(logits, batch, thr=thr):
            return (logits[:, -1, 7] > thr).float() + logits[:, -1, 3]

        r = scan(gpt2, batch, step, method="zero")
        path = r.settings["metric_logits"]
        assert path.startswith("last position, form single, full vocabulary (its values change"), path
        assert_close(r.per_example, oracle_scan(gpt2, batch, step, method="zero"), 1e-5)


def test_a_constant_metric_reads_no_column(gpt2, column_calls):
    batch = make_batch(3, 6, seed=206)
    def constant(logits, batch):
        return torch.ones(logits.shape[0])

    r = scan(gpt2, batch, constant, method="zero")
    assert r.settings["metric_logits"] == f"last position, form single, columns 0 of {VOCAB}"
    assert column_calls
    assert_close(r.per_example, oracle_scan(gpt2, batch, constant, method="zero"), 1e-6)


# ------------------------------------------------------------------------------ the pieces


def _columns_metric(fn, cols):
    return ColumnsOf(LastPositionOf(CallableMetric(fn)), torch.tensor(cols))


@pytest.mark.parametrize("bias", [False, True])
def test_column_values_equal_the_full_unembedding(bias):
    torch.manual_seed(0)
    unembed = nn.Linear(16, 40, bias=bias)
    hidden = torch.randn(5, 4, 16)
    rows = dict(input_ids=torch.zeros(5, 4, dtype=torch.long),
                attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]))
    m = _columns_metric(lambda lg: lg[:, -1, 2] * 2 - lg[:, -1, 31], [2, 31])
    got = column_values(m, hidden, rows, 0, unembed)
    want = m(unembed(hidden[:, -1]), rows)
    assert_close(got, want, 1e-6)
    assert m.fallback_rows == 0


@pytest.mark.parametrize("name,fn", [
    ("NaN shows", lambda lg: lg[:, -1, 2] + lg[:, -1, 9]),
    ("step hides NaN", lambda lg: lg[:, -1, 2] + (lg[:, -1, 9] > 0).float()),
    ("nan_to_num hides NaN", lambda lg: lg[:, -1, 2] + lg[:, -1, 9].nan_to_num(0.0).clamp(-1, 1)),
    ("index from a column", lambda lg: lg[torch.arange(lg.shape[0]), -1, lg[:, -1, 9].long().clamp(0, 39)]),
])
def test_column_values_fall_back_when_a_variant_reads_another_column(name, fn):
    """Column 9 was not in the accepted set: every way of reading it is seen and the batch is
    recomputed on the full vocabulary (never a value from a filled column)."""
    torch.manual_seed(1)
    unembed = nn.Linear(16, 40)
    hidden = torch.randn(3, 2, 16)
    rows = dict(input_ids=torch.zeros(3, 2, dtype=torch.long), attention_mask=torch.ones(3, 2, dtype=torch.long))
    m = _columns_metric(fn, [2])
    got = column_values(m, hidden, rows, 0, unembed)
    want = m(unembed(hidden[:, -1]), rows)
    assert_close(got, want, 1e-6)
    assert m.fallback_rows == 3


def test_column_form_refusals(gpt2):
    batch = make_batch(3, 6, seed=207)
    last = _last(gpt2, batch)
    single = LastPositionOf(CallableMetric(two_columns))
    use, path = column_form(single, [last], [batch])
    assert isinstance(use, ColumnsOf) and use.columns.tolist() == [3, 5] and path == f"columns 2 of {VOCAB}"
    use, path = column_form(single, [last], [batch], restricted=False)
    assert use is single and path.startswith("full vocabulary (the model's logits are not")
    builtin = CallableMetric(two_columns)
    assert column_form(builtin, [last], [batch]) == (builtin, "declared")
    nonfinite = LastPositionOf(CallableMetric(lambda lg: lg[:, -1, 3] / 0 * 0))
    assert "not all finite" in column_form(nonfinite, [last], [batch])[1]
    with pytest.raises(TypeError, match="LastPositionOf"):
        ColumnsOf(builtin, torch.tensor([1]))
    with pytest.raises(ValueError, match="1-d"):
        ColumnsOf(single, torch.tensor([[1]]))


def test_a_metric_with_clean_logits_reads_two_columns_of_each(gpt2):
    """The clean reference stays whole (variants get it whole); only the variant logits are cut."""
    batch = make_batch(3, 6, seed=208)
    corrupt = corrupt_of(batch)
    _, clean_full = record_z(gpt2, batch)

    def drop(logits, batch, clean):
        return (clean[:, -1, 3] - clean[:, -1, 5]) - (logits[:, -1, 3] - logits[:, -1, 5])

    r = scan(gpt2, batch, CallableMetric(drop, needs_clean=True), corrupt=corrupt, method="patch", direction="noising")
    assert r.settings["metric_logits"] == f"last position, form single, columns 2 of {VOCAB}", r.settings["metric_logits"]
    oracle = oracle_scan(gpt2, batch, lambda lg, b: drop(lg, b, clean_full), corrupt=corrupt, method="patch", direction="noising")
    assert_close(r.per_example, oracle, 1e-5)
