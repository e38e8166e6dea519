"""Automatic batch sizes and out-of-memory retries (``headint.scans.batching``).

The row cost counts everything a row allocates, the logits the metric reads times the
vocabulary included (a full-logits metric on a 50257-token vocabulary once asked for one
13.2 GB allocation); the CPU allocator's out-of-memory ``RuntimeError`` is retried in halves
like CUDA's, in exact scans, attribution and path patching, with unchanged values.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import headint
import headint.scans.batching as batching
import headint.scans.runner as runner_mod
from headint.metrics import CallableMetric, as_metric
from headint.plan import ModelShape
from headint.scans.batching import RowGeometry, auto_rows, is_oom, metric_logits_per_row, row_bytes
from scan_oracles import call_metric_full, corrupt_of, make_batch, oracle_scan
from test_scan_exact import assert_matches

BACKEND = "reference"
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
           "13207541760 bytes. Error code 12 (Cannot allocate memory)")
GPT2_SMALL = ModelShape(n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64)


def geometry(vocab: int, metric, T: int = 64, restricted: bool = True) -> RowGeometry:
    batch = {"input_ids": torch.zeros(2, T, dtype=torch.long), "target": torch.tensor([1, 2]), "contrast": torch.tensor([3, 4])}
    logits = metric_logits_per_row(as_metric(metric), batch, T, vocab, restricted)
    return RowGeometry(GPT2_SMALL, T, 768, 3072, vocab, logits)


# ------------------------------------------------------------------------------------ sizing


def test_row_cost_grows_with_vocab_when_the_metric_needs_full_logits():
    full = CallableMetric(call_metric_full)  # position "all": [T, V] logits per row
    small, big = row_bytes(geometry(1000, full)), row_bytes(geometry(50257, full))
    assert big - small >= 64 * (50257 - 1000) * 4  # at least the float32 logits themselves
    # last-position full-vocabulary metrics grow with V too, by less
    lp_small, lp_big = row_bytes(geometry(1000, "logprob")), row_bytes(geometry(50257, "logprob"))
    assert 50257 * 4 <= lp_big - lp_small < big - small
    # a logit difference reads two logits: the vocabulary does not matter
    assert row_bytes(geometry(1000, "logit_diff")) == row_bytes(geometry(50257, "logit_diff"))
    # unless the model's logits cannot be restricted: then every position's full logits are computed
    assert row_bytes(geometry(50257, "logit_diff", restricted=False)) >= 64 * 50257 * 4


def test_metric_logits_per_row():
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "target": torch.tensor([1, 2]), "contrast": torch.tensor([3, 4])}
    assert metric_logits_per_row(as_metric("logit_diff"), batch, 5, 100, True) == 2
    assert metric_logits_per_row(as_metric("kl"), batch, 5, 100, True) == 100
    assert metric_logits_per_row(as_metric("loss"), batch, 5, 100, True) == 500
    assert metric_logits_per_row(as_metric("logit_diff"), batch, 5, 100, False) == 500


def test_the_13_gb_case_fits_the_budget():
    """Full-logits callable metric, vocabulary 50257, 64 tokens: rows x row cost stays within the budget."""
    g = geometry(50257, CallableMetric(call_metric_full))
    budget = 2 << 30
    rows = auto_rows(g, budget)
    assert 1 <= rows and rows * row_bytes(g) <= budget
    assert rows < auto_rows(geometry(50257, "logit_diff"), budget)
    assert auto_rows(g, 1) == 1  # never zero rows
    assert auto_rows(g, float(budget)) == rows  # a float budget (e.g. 8e9) is a number of bytes
    assert auto_rows(g, torch.tensor(budget).numpy()) == rows
    assert auto_rows(geometry(10, "logit_diff", T=2), 1 << 50) == batching.MAX_ROWS


def test_row_cost_counts_attention_and_kept_graph():
    g = geometry(50257, "logit_diff", T=64)
    g2 = geometry(50257, "logit_diff", T=128)
    assert row_bytes(g2) > 2 * row_bytes(g)  # the T x T attention scratch grows quadratically
    kept = RowGeometry(**{**g.__dict__, "keeps_graph": True})
    assert row_bytes(kept) > row_bytes(g)


@pytest.mark.parametrize("budget", [0, -5, 0.5, float("nan"), "1GB", True])
def test_bad_memory_budget(gpt2, budget):
    batch = make_batch(3, 6, seed=201)
    with pytest.raises(ValueError, match=r"memory_budget must be a positive number of bytes \(at least 1\), got"):
        headint.scan(gpt2, batch, "logit_diff", memory_budget=budget, progress=False, backend=BACKEND)


def test_default_budget_reads_available_memory(monkeypatch):
    cpu = torch.device("cpu")
    avail = batching._available_host_memory()
    budget = batching.default_memory_budget(cpu)
    if avail is not None:
        assert budget == int(avail * batching.BUDGET_SHARE)
        if Path("/proc/meminfo").exists():
            total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemTotal:"))
            assert 0 < budget <= total
    monkeypatch.setattr(batching, "_available_host_memory", lambda: None)
    assert batching.default_memory_budget(cpu) == batching.FALLBACK_BUDGET


def test_scan_sizes_batches_from_the_budget(gpt2):
    """With a budget of k rows' cost the scan runs k rows per forward, and values are unchanged."""
    batch = make_batch(3, 6, seed=202, pad="left", lengths=[6, 4, 5])
    kw = dict(method="zero", progress=False, backend=BACKEND)
    probe = headint.scan(gpt2, batch, "logit_diff", **kw)
    from headint.scans.setup import prepare_scan

    setup = prepare_scan(gpt2, batch, None, "logit_diff", kind="exact", backend=BACKEND)
    with setup.base_runs() as runs:
        per_row = row_bytes(setup.row_geometry(runs.clean))
    r = headint.scan(gpt2, batch, "logit_diff", memory_budget=5 * per_row, **kw)
    assert r.settings["batch_rows"] == 5
    assert r.settings["cost"]["runs"] > probe.settings["cost"]["runs"]
    assert_matches(r, oracle_scan(gpt2, batch, "logit_diff", method="zero"))
    # the same budget buys fewer rows of a full-logits metric
    full = headint.scan(gpt2, batch, call_metric_full, memory_budget=5 * per_row, **kw)
    assert full.settings["batch_rows"] < 5
    assert_matches(full, oracle_scan(gpt2, batch, call_metric_full, method="zero"))


# ------------------------------------------------------------------------------------ out of memory


def test_is_oom():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError(CPU_OOM))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape '[2, 3]' is invalid for input of size 5"))
    assert not is_oom(ValueError("can't allocate memory"))  # only allocator errors (RuntimeError) count


def _cpu_oom_over(monkeypatch, method_name: str, max_rows: int) -> list[int]:
    sizes = []
    orig = getattr(runner_mod.VariantRunner, method_name)

    def patched(self, ex, *args, **kwargs):
        sizes.append(len(ex))
        if len(ex) > max_rows:
            raise RuntimeError(CPU_OOM)
        return orig(self, ex, *args, **kwargs)

    monkeypatch.setattr(runner_mod.VariantRunner, method_name, patched)
    return sizes


@pytest.mark.parametrize("per_position", [False, True])
def test_exact_scan_retries_cpu_oom(model, monkeypatch, per_position):
    batch = make_batch(3, 6, seed=203, pad="left", lengths=[6, 4, 5])
    kw = dict(method="patch", corrupt=corrupt_of(batch), per_position=per_position, heads=[1, 2], progress=False, backend=BACKEND)
    reference = headint.scan(model, batch, "logit_diff", batch_size=6, **kw)
    with monkeypatch.context() as mp:
        sizes = _cpu_oom_over(mp, "run", max_rows=2)
        result = headint.scan(model, batch, "logit_diff", batch_size=6, **kw)
    assert 6 in sizes and max(s for s in sizes if s <= 2) >= 1
    assert torch.equal(torch.isnan(result.per_example), torch.isnan(reference.per_example))
    torch.testing.assert_close(result.per_example, reference.per_example, atol=1e-6, rtol=1e-6, equal_nan=True)


def test_attribution_retries_cpu_oom(model, monkeypatch):
    batch = make_batch(4, 6, seed=204, pad="left", lengths=[6, 4, 5, 3])
    corrupt = corrupt_of(batch)
    reference = headint.attribution_scan(model, batch, corrupt, "logit_diff", per_position=True, backend=BACKEND)
    with monkeypatch.context() as mp:
        sizes = _cpu_oom_over(mp, "run_differentiable", max_rows=1)
        result = headint.attribution_scan(model, batch, corrupt, "logit_diff", per_position=True, batch_size=4, backend=BACKEND)
    assert sizes.count(1) == 4 and 4 in sizes
    torch.testing.assert_close(result.per_example, reference.per_example, atol=1e-6, rtol=1e-6)
    assert result.settings["cost"]["backward_passes"] == 4


def test_path_patch_retries_cpu_oom(model, monkeypatch):
    batch = make_batch(3, 6, seed=205, pad="left", lengths=[6, 4, 5])
    corrupt = corrupt_of(batch)
    kw = dict(senders=[((0, 0),), ((1, 2),), ((0, 1), (1, 3))], receivers=[(2, 1, "qk")], backend=BACKEND)
    reference = headint.path_patch(model, batch, corrupt, "logit_diff", batch_size=1, **kw)
    with monkeypatch.context() as mp:
        sizes = _cpu_oom_over(mp, "run_differentiable", max_rows=2)
        result = headint.path_patch(model, batch, corrupt, "logit_diff", batch_size=9, **kw)
    assert 9 in sizes
    torch.testing.assert_close(result.per_example, reference.per_example, atol=1e-6, rtol=1e-6)


def test_single_row_cpu_oom_and_other_errors_propagate(gpt2, monkeypatch):
    batch = make_batch(3, 6, seed=206)
    with monkeypatch.context() as mp:
        _cpu_oom_over(mp, "run", max_rows=0)
        with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
            headint.scan(gpt2, batch, "logit_diff", method="zero", batch_size=4, progress=False, backend=BACKEND)
    with monkeypatch.context() as mp:
        _cpu_oom_over(mp, "run_differentiable", max_rows=0)
        with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
            headint.attribution_scan(gpt2, batch, corrupt_of(batch), "logit_diff", backend=BACKEND)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "4"])
def test_bad_batch_size_attribution_and_path(gpt2, batch_size):
    batch = make_batch(3, 6, seed=207)
    with pytest.raises(ValueError, match=r"batch_size must be a positive int or None"):
        headint.attribution_scan(gpt2, batch, corrupt_of(batch), batch_size=batch_size, backend=BACKEND)
    with pytest.raises(ValueError, match=r"batch_size must be a positive int or None"):
        headint.path_patch(gpt2, batch, corrupt_of(batch), receivers=[(2, 0, "q")], batch_size=batch_size, backend=BACKEND)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "8", None])
def test_bad_batch_size_exact(gpt2, batch_size):
    batch = make_batch(3, 6, seed=208)
    with pytest.raises(ValueError, match=r"batch_size must be a positive int or 'auto', got"):
        headint.scan(gpt2, batch, "logit_diff", batch_size=batch_size, progress=False, backend=BACKEND)


def test_numpy_integer_batch_size(gpt2):
    batch = make_batch(3, 6, seed=209)
    r = headint.scan(gpt2, batch, "logit_diff", batch_size=torch.tensor(5).numpy(), progress=False, backend=BACKEND)
    assert r.settings["batch_rows"] == 5
    assert_matches(r, oracle_scan(gpt2, batch, "logit_diff", method="zero"))


def test_cpu_forwards_are_capped_to_cache_sized_token_counts(gpt2):
    """On CPU an exact scan's auto batches hold at most CPU_TOKENS_PER_FORWARD tokens; on CUDA
    the memory-sized rows stand. Values are unchanged."""
    assert batching.cpu_row_cap(4096, 32, "cpu") == batching.CPU_TOKENS_PER_FORWARD // 32
    assert batching.cpu_row_cap(4096, 4 * batching.CPU_TOKENS_PER_FORWARD, "cpu") == 1
    assert batching.cpu_row_cap(5, 32, "cpu") == 5
    assert batching.cpu_row_cap(4096, 32, "cuda") == 4096
    T = 12
    batch = make_batch(24, T, seed=210)
    r = headint.scan(gpt2, batch, "logit_diff", method="zero", progress=False, backend=BACKEND)
    assert r.settings["batch_rows"] == batching.CPU_TOKENS_PER_FORWARD // T  # the scan has more rows than that
    assert_matches(r, oracle_scan(gpt2, batch, "logit_diff", method="zero"))
