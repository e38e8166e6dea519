"""headint.scan against the naive oracle: one hooked forward per intervention.

Tiny GPT-2 (3 layers, 4 heads, d=32) and a tiny Llama with grouped-query attention (4 query
heads, 2 key/value heads), fp32, built from configs. Every per-example value of every scan
must equal the hook loop of ``scan_oracles`` within float tolerance.
"""

from __future__ import annotations


import pytest
import torch

import headint
import headint.scans.exact as exact
import headint.scans.runner as runner_mod
from headint.metrics import CallableMetric
from scan_oracles import (
    all_head_pairs,
    call_metric_full,
    corrupt_of,
    derangement,
    make_batch,
    oracle_baseline,
    oracle_scan,
)

ATOL = 1e-5
RTOL = 1e-5
BACKEND = "reference"
L, H = 3, 4

METHODS = [
    ("zero", None),
    ("mean", None),
    ("resample", None),
    ("patch", "denoising"),
    ("patch", "noising"),
]
METHOD_IDS = ["zero", "mean", "resample", "patch-denoising", "patch-noising"]
METRICS = ["logit_diff", "logprob", "prob", "kl", "loss", "callable"]


def metric_args(name):
    """(what scan gets, what the oracle gets)."""
    if name == "callable":
        return call_metric_full, call_metric_full
    return name, name


def run_both(model, batch, metric_name, method, direction, **kw):
    corrupt = corrupt_of(batch) if method == "patch" else None
    m_scan, m_oracle = metric_args(metric_name)
    result = headint.scan(model, batch, m_scan, corrupt=corrupt, method=method, direction=direction or "denoising",
                          progress=False, backend=BACKEND, **kw)
    okw = {k: v for k, v in kw.items() if k not in ("batch_size",)}
    if "mean_inputs" in okw:
        okw["mean_batch"] = okw.pop("mean_inputs")
    expected = oracle_scan(model, batch, m_oracle, method=method, corrupt=corrupt, direction=direction or "denoising", **okw)
    return result, expected, corrupt


def assert_matches(result, expected):
    got = result.per_example
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), "NaN cells differ from the oracle's unscanned cells"
    fin = ~torch.isnan(expected)
    diff = (got[fin] - expected[fin]).abs().max() if fin.any() else torch.tensor(0.0)
    assert torch.allclose(got[fin], expected[fin], atol=ATOL, rtol=RTOL), f"max |scan - oracle| = {float(diff):.3g}"


# ------------------------------------------------------------------------------------ per head


@pytest.mark.parametrize("metric_name", METRICS)
@pytest.mark.parametrize("method,direction", METHODS, ids=METHOD_IDS)
def test_per_head_matches_oracle(model, method, direction, metric_name):
    batch = make_batch(3, 7, seed=11)
    result, expected, corrupt = run_both(model, batch, metric_name, method, direction)
    assert result.axes == ("layer", "head")
    assert_matches(result, expected)
    # baselines: clean and corrupted runs
    m = metric_args(metric_name)[1]
    assert result.clean_baseline == pytest.approx(float(oracle_baseline(model, batch, m).mean()), abs=ATOL)
    if corrupt is not None:
        assert result.corrupt_baseline == pytest.approx(float(oracle_baseline(model, corrupt, m, clean=batch).mean()), abs=ATOL)
    else:
        assert result.corrupt_baseline is None


@pytest.mark.parametrize("metric_name", ["logit_diff", "kl", "loss"])
@pytest.mark.parametrize("method,direction", METHODS, ids=METHOD_IDS)
def test_per_head_left_padded(model, method, direction, metric_name):
    batch = make_batch(4, 7, seed=12, pad="left", lengths=[7, 5, 4, 6])
    result, expected, _ = run_both(model, batch, metric_name, method, direction)
    assert_matches(result, expected)


def test_last_position_metric_callable(model):
    """A callable metric on last-position logits (position='last') with the batch."""
    fn = lambda logits, batch: logits[torch.arange(logits.shape[0]), batch["target"]] - logits.logsumexp(-1)  # noqa: E731
    metric = CallableMetric(fn, position="last")

    def full(logits, batch):
        return fn(logits[:, -1], batch)

    batch = make_batch(3, 6, seed=13, pad="left", lengths=[6, 4, 5])
    result = headint.scan(model, batch, metric, method="zero", progress=False, backend=BACKEND)
    assert_matches(result, oracle_scan(model, batch, full, method="zero"))
    result = headint.scan(model, batch, metric, method="zero", per_position=True, heads=[2], progress=False, backend=BACKEND)
    assert result.settings["position_reuse"] is True
    assert_matches(result, oracle_scan(model, batch, full, method="zero", per_position=True, heads=[2]))


def test_loss_with_labels(model):
    """Loss reads batch['labels'] (aligned with input_ids, -100 ignored) when present."""
    batch = make_batch(3, 7, seed=14, pad="left", lengths=[7, 5, 6])
    labels = batch["input_ids"].clone()
    labels[:, 3] = -100
    labels[0, 5] = (labels[0, 5] + 7) % 50
    batch["labels"] = labels
    result, expected, _ = run_both(model, batch, "loss", "patch", "noising")
    assert_matches(result, expected)


# ------------------------------------------------------------------------------------ per position


@pytest.mark.parametrize("metric_name", ["logit_diff", "loss"])
@pytest.mark.parametrize("method,direction", METHODS, ids=METHOD_IDS)
def test_per_position_matches_oracle(model, method, direction, metric_name):
    batch = make_batch(3, 6, seed=21, pad="left", lengths=[6, 4, 5])
    result, expected, _ = run_both(model, batch, metric_name, method, direction, per_position=True)
    assert result.axes == ("layer", "head", "position")
    assert_matches(result, expected)
    assert result.settings["position_reuse"] == (metric_name == "logit_diff")


@pytest.mark.parametrize("metric_name", ["prob", "kl", "callable"])
def test_per_position_other_metrics(model, metric_name):
    batch = make_batch(3, 6, seed=22)
    result, expected, _ = run_both(model, batch, metric_name, "patch", "noising", per_position=True, heads=[1, 2])
    assert_matches(result, expected)


@pytest.mark.parametrize("method,direction", [("zero", None), ("patch", "denoising"), ("mean", None)], ids=["zero", "patch-denoising", "mean"])
def test_per_position_right_padded(model, method, direction):
    """Right padding: the metric's last real token sits before some patched positions."""
    batch = make_batch(3, 6, seed=23, pad="right", lengths=[6, 3, 4])
    result, expected, _ = run_both(model, batch, "logit_diff", method, direction, per_position=True)
    assert_matches(result, expected)


def test_positions_subset_leaves_nan(gpt2):
    batch = make_batch(3, 6, seed=24)
    result, expected, _ = run_both(gpt2, batch, "logit_diff", "zero", None, per_position=True, positions=[1, 4], layers=[0, 2])
    assert_matches(result, expected)
    pe = result.per_example
    assert torch.isnan(pe[:, :, [0, 2, 3, 5]]).all()
    assert torch.isnan(pe[1]).all()
    assert not torch.isnan(pe[[0, 2]][:, :, [1, 4]]).any()


# ------------------------------------------------------------------------------------ head sets


@pytest.mark.parametrize("method,direction", METHODS, ids=METHOD_IDS)
def test_all_pairs_matches_oracle(model, method, direction):
    shape = headint.integration.structure.model_shape(model)
    pairs = headint.all_pairs(shape)
    assert [tuple(map(tuple, p)) for p in pairs] == all_head_pairs(L, H)
    batch = make_batch(3, 6, seed=31, pad="left", lengths=[6, 5, 3])
    result, expected, _ = run_both(model, batch, "logit_diff", method, direction, head_sets=pairs, batch_size=50)
    assert result.axes == ("head_set",)
    assert [tuple(map(tuple, s)) for s in result.labels] == all_head_pairs(L, H)
    assert_matches(result, expected)
    # depth reuse: a set starts at its lowest layer
    N = batch["input_ids"].shape[0]
    clean_passes = 2 if method == "patch" else 1
    expected_cost = clean_passes * N * L + sum(N * (L - min(l for l, _ in s)) for s in pairs)
    # + the final block's second call (last query) of every row, and of the 2 rows the check runs,
    # + one capture of the clean rows' q/k/v per start layer (counted as a layer-forward of N rows)
    captures = result.settings["cost"]["captures"]
    assert captures == len({min(l for l, _ in s) for s in pairs})
    assert result.settings["cost"]["layer_forwards"] == expected_cost + len(pairs) * N + 2 * min(N, 2) + captures * N
    assert result.settings["cost"]["last_query_rows"] == len(pairs) * N + min(N, 2)


@pytest.mark.parametrize("metric_name", ["kl", "loss", "callable"])
def test_head_sets_mixed_layers(model, metric_name):
    sets = [[(2, 1), (0, 3)], [(1, 0), (1, 1), (1, 2), (1, 3)], [(0, 0)], [(2, 3), (1, 2), (0, 1)]]
    batch = make_batch(3, 6, seed=32)
    result, expected, _ = run_both(model, batch, metric_name, "patch", "denoising", head_sets=sets)
    assert_matches(result, expected)
    # a single-head set equals that cell of the per-head scan
    per_head = headint.scan(model, batch, metric_args(metric_name)[0], corrupt=corrupt_of(batch), method="patch",
                            progress=False, backend=BACKEND)
    torch.testing.assert_close(result.per_example[2], per_head.per_example[0, 0], atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------ batching


@pytest.mark.parametrize("batch_size", [1, 5, 7, 10_000, "auto"])
def test_batch_size_does_not_change_values(model, batch_size):
    batch = make_batch(3, 6, seed=41, pad="left", lengths=[6, 4, 5])
    result, expected, _ = run_both(model, batch, "logit_diff", "resample", None, per_position=True, heads=[0, 3],
                                   batch_size=batch_size)
    assert_matches(result, expected)
    if batch_size != "auto":
        assert result.settings["batch_rows"] == batch_size


def test_many_chunks_all_methods(gpt2):
    batch = make_batch(4, 7, seed=42, pad="left", lengths=[7, 3, 6, 5])
    for method, direction in METHODS:
        result, expected, _ = run_both(gpt2, batch, "logprob", method, direction, batch_size=3)
        assert_matches(result, expected)


# ------------------------------------------------------------------------------------ options


def test_layers_heads_subsets_leave_nan(model):
    batch = make_batch(3, 7, seed=51)
    result, expected, _ = run_both(model, batch, "logit_diff", "mean", None, layers=[0, 2], heads=[1, 3])
    assert_matches(result, expected)
    pe = result.per_example
    scanned = torch.zeros(L, H, dtype=torch.bool)
    scanned[0, 1] = scanned[0, 3] = scanned[2, 1] = scanned[2, 3] = True
    assert not torch.isnan(pe[scanned]).any()
    assert torch.isnan(pe[~scanned]).all()
    # the scanned cells equal those of the full scan
    full = headint.scan(model, batch, "logit_diff", method="mean", progress=False, backend=BACKEND)
    torch.testing.assert_close(pe[scanned], full.per_example[scanned], atol=ATOL, rtol=RTOL)


def test_mean_inputs(model):
    batch = make_batch(3, 6, seed=52)
    ref = make_batch(5, 6, seed=53, pad="left", lengths=[6, 2, 4, 6, 5])
    result, expected, _ = run_both(model, batch, "logit_diff", "mean", None, mean_inputs=ref)
    assert_matches(result, expected)
    default = headint.scan(model, batch, "logit_diff", method="mean", progress=False, backend=BACKEND)
    assert not torch.allclose(result.per_example, default.per_example)


def test_resample_seed_is_a_derangement(gpt2):
    for n in (2, 3, 4, 7):
        for seed in (0, 1, 5):
            perm = exact._derangement(n, seed)
            assert torch.equal(perm, derangement(n, seed))
            assert not (perm == torch.arange(n)).any()
            assert sorted(perm.tolist()) == list(range(n))
    batch = make_batch(4, 6, seed=54)
    a, ea, _ = run_both(gpt2, batch, "logit_diff", "resample", None, seed=3)
    assert_matches(a, ea)
    b = headint.scan(gpt2, batch, "logit_diff", method="resample", seed=3, progress=False, backend=BACKEND)
    assert torch.equal(a.per_example, b.per_example)
    other = next(s for s in range(20) if not torch.equal(derangement(4, s), derangement(4, 3)))
    c = headint.scan(gpt2, batch, "logit_diff", method="resample", seed=other, progress=False, backend=BACKEND)
    assert not torch.allclose(c.per_example, a.per_example)


def test_tensor_inputs(gpt2):
    """A plain [N, T] tensor of ids (no mask) with a callable metric."""
    batch = make_batch(3, 6, seed=55)
    result = headint.scan(gpt2, batch["input_ids"], call_metric_full, method="zero", progress=False, backend=BACKEND)
    assert_matches(result, oracle_scan(gpt2, batch, call_metric_full, method="zero"))


def test_training_mode_restored(gpt2):
    batch = make_batch(2, 5, seed=56)
    gpt2.train()
    try:
        result = headint.scan(gpt2, batch, "logit_diff", method="zero", progress=False, backend=BACKEND)
        assert gpt2.training
    finally:
        gpt2.eval()
    assert_matches(result, oracle_scan(gpt2, batch, "logit_diff", method="zero"))


# ------------------------------------------------------------------------------------ cost


def _tri(L):
    return L * (L + 1) // 2


@pytest.mark.parametrize("with_corrupt", [False, True])
def test_cost_depth_reuse(model, with_corrupt):
    N, T = 4, 6
    batch = make_batch(N, T, seed=61)
    corrupt = corrupt_of(batch) if with_corrupt else None
    result = headint.scan(model, batch, "logit_diff", corrupt=corrupt, method="patch" if with_corrupt else "zero",
                          progress=False, backend=BACKEND, batch_size=5)
    cost = result.settings["cost"]
    clean_passes = 2 if with_corrupt else 1
    # Every variant row runs its final block twice (all tokens up to the keys/values, then the
    # last token only); the last-query check runs the final block both ways on 2 base rows.
    rows = L * H * N
    checked = min(N, 2)
    # One capture per start layer of the clean rows' q/k/v (a forward stopped at that layer's
    # attention call, counted as a layer-forward of N rows).
    assert cost["captures"] == L
    expected = clean_passes * N * L + H * N * _tri(L) + rows + 2 * checked + L * N
    assert cost["layer_forwards"] == expected
    assert cost["token_layer_forwards"] == (clean_passes * N * L + H * N * _tri(L)) * T + rows + checked * (T + 1) + L * N * T
    assert cost["rows"] == clean_passes * N + rows + checked
    assert cost["last_query_rows"] == rows + checked
    assert cost["clean_attention_rows"] == rows
    assert cost["replayed_projection_rows"] == rows
    assert result.settings["final_block"] == "final block for the last query only"
    one_per = L * H * N * L
    assert result.settings["cost_one_forward_per_intervention"] == {"layer_forwards": one_per, "token_layer_forwards": one_per * T}
    # block calls: the two-step final block counts twice, so compare the work, in tokens
    assert cost["token_layer_forwards"] < one_per * T
    assert cost["layer_forwards"] - cost["last_query_rows"] < one_per
    assert result.settings["restricted_logits"] is True


def test_cost_position_reuse(model):
    N, T = 3, 6
    batch = make_batch(N, T, seed=62)
    positions = [0, 2, 5]
    r = headint.scan(model, batch, "logit_diff", method="zero", per_position=True, positions=positions,
                     progress=False, backend=BACKEND, group_positions=1)  # each position fed from itself
    cost = r.settings["cost"]
    assert r.settings["position_reuse"] is True
    P = len(positions)
    # rows fed >= 2 tokens (p < T - 1) run the final block a second time for the last token;
    # the last-query check runs it on 2 base rows
    two_step = L * H * N * sum(1 for p in positions if T - p >= 2)
    checked = min(N, 2)
    # the q/k/v capture (one per start layer) serves the rows fed from position 0 only
    assert cost["captures"] == L
    assert cost["replayed_projection_rows"] == L * H * N
    # position reuse is checked once, on 2 base rows fed from the first start position > 0 (2)
    reuse_checked = 2
    assert cost["layer_forwards"] == N * L + H * P * N * _tri(L) + two_step + 2 * checked + L * N + reuse_checked * L
    with_reuse = N * L * T + H * N * _tri(L) * sum(T - p for p in positions)
    assert cost["token_layer_forwards"] == with_reuse + two_step + checked * (T + 1) + L * N * T + reuse_checked * L * (T - 2)
    assert cost["last_query_rows"] == two_step + checked
    without_reuse = N * L * T + H * N * _tri(L) * P * T
    assert with_reuse < without_reuse
    one_per = L * H * P * N * L
    assert r.settings["cost_one_forward_per_intervention"] == {"layer_forwards": one_per, "token_layer_forwards": one_per * T}
    assert cost["token_layer_forwards"] < one_per * T
    # a position-"all" metric cannot use position reuse: depth reuse only
    r2 = headint.scan(model, batch, "loss", method="zero", per_position=True, positions=positions,
                      progress=False, backend=BACKEND)
    assert r2.settings["position_reuse"] is False
    assert r2.settings["cost"]["token_layer_forwards"] == without_reuse + r2.settings["cost"]["captures"] * N * T
    assert r2.settings["cost"]["last_query_rows"] == 0
    assert cost["token_layer_forwards"] < r2.settings["cost"]["token_layer_forwards"]


def test_cost_counts_every_block_forward(gpt2):
    """``settings['cost']`` says it holds 'the counts that actually ran': count them with block hooks."""
    N, T = 3, 6
    batch = make_batch(N, T, seed=63)
    seen = {"rows": 0, "tokens": 0}

    def hook(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen["rows"] += x.shape[0]
        seen["tokens"] += x.shape[0] * x.shape[1]

    handles = [blk.register_forward_pre_hook(hook, with_kwargs=True) for blk in gpt2.transformer.h]
    try:
        r = headint.scan(gpt2, batch, "logit_diff", method="zero", progress=False, backend=BACKEND)
    finally:
        for h in handles:
            h.remove()
    assert seen["rows"] == r.settings["cost"]["layer_forwards"]
    assert seen["tokens"] == r.settings["cost"]["token_layer_forwards"]


# ------------------------------------------------------------------------------------ out of memory


def _oom_runner(monkeypatch, max_rows):
    sizes = []
    orig = runner_mod.VariantRunner.run

    def run(self, ex, plan, start_layer=0, start_pos=0, **kw):
        sizes.append(len(ex))
        if len(ex) > max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(ex)} rows")
        return orig(self, ex, plan, start_layer, start_pos, **kw)

    monkeypatch.setattr(runner_mod.VariantRunner, "run", run)
    return sizes


@pytest.mark.parametrize("per_position", [False, True])
def test_oom_retry_in_halves(model, monkeypatch, per_position):
    batch = make_batch(3, 6, seed=81, pad="left", lengths=[6, 5, 4])
    kw = dict(method="resample", per_position=per_position, heads=[0, 2], progress=False, backend=BACKEND)
    reference = headint.scan(model, batch, "logit_diff", batch_size=10_000, **kw)
    with monkeypatch.context() as mp:
        sizes = _oom_runner(mp, max_rows=2)
        result = headint.scan(model, batch, "logit_diff", batch_size=10_000, **kw)
    assert max(sizes) > 2 and any(s <= 2 for s in sizes)
    torch.testing.assert_close(result.per_example, reference.per_example, atol=1e-6, rtol=1e-6, equal_nan=True)
    assert_matches(result, oracle_scan(model, batch, "logit_diff", method="resample", per_position=per_position, heads=[0, 2]))


def test_oom_message_runtime_error_also_retried(gpt2, monkeypatch):
    batch = make_batch(3, 6, seed=82)
    orig = runner_mod.VariantRunner.run

    def run(self, ex, plan, start_layer=0, start_pos=0, **kw):
        if len(ex) > 3:
            raise RuntimeError("CUDA error: out of memory")
        return orig(self, ex, plan, start_layer, start_pos, **kw)

    monkeypatch.setattr(runner_mod.VariantRunner, "run", run)
    result = headint.scan(gpt2, batch, "logit_diff", method="zero", batch_size="auto", progress=False, backend=BACKEND)
    assert_matches(result, oracle_scan(gpt2, batch, "logit_diff", method="zero"))


def test_other_errors_and_single_row_oom_propagate(gpt2, monkeypatch):
    batch = make_batch(3, 6, seed=83)

    def boom(self, ex, plan, start_layer=0, start_pos=0, **kw):
        raise RuntimeError("shape mismatch somewhere")

    with monkeypatch.context() as mp:
        mp.setattr(runner_mod.VariantRunner, "run", boom)
        with pytest.raises(RuntimeError, match="shape mismatch"):
            headint.scan(gpt2, batch, "logit_diff", method="zero", progress=False, backend=BACKEND)

    def always_oom(self, ex, plan, start_layer=0, start_pos=0, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with monkeypatch.context() as mp:
        mp.setattr(runner_mod.VariantRunner, "run", always_oom)
        with pytest.raises(torch.OutOfMemoryError):
            headint.scan(gpt2, batch, "logit_diff", method="zero", batch_size=4, progress=False, backend=BACKEND)


# ------------------------------------------------------------------------------------ errors


def test_bad_arguments(gpt2):
    batch = make_batch(3, 6, seed=91)
    kw = dict(progress=False, backend=BACKEND)
    with pytest.raises(ValueError, match="method"):
        headint.scan(gpt2, batch, "logit_diff", method="knockout", **kw)
    with pytest.raises(ValueError, match="direction"):
        headint.scan(gpt2, batch, "logit_diff", method="patch", corrupt=corrupt_of(batch), direction="sideways", **kw)
    with pytest.raises(ValueError, match="corrupt"):
        headint.scan(gpt2, batch, "logit_diff", method="patch", **kw)
    short = make_batch(3, 5, seed=92)
    with pytest.raises(ValueError, match=r"shape.*\[3, 5\].*\[3, 6\]"):
        headint.scan(gpt2, batch, "logit_diff", method="patch", corrupt=short, **kw)
    fewer = make_batch(2, 6, seed=92)
    with pytest.raises(ValueError, match="shape"):
        headint.scan(gpt2, batch, "logit_diff", method="patch", corrupt=fewer, **kw)
    with pytest.raises(ValueError, match=r"heads: 4 out of range.*4 heads"):
        headint.scan(gpt2, batch, "logit_diff", heads=[0, 4], **kw)
    with pytest.raises(ValueError, match=r"heads: -1 out of range"):
        headint.scan(gpt2, batch, "logit_diff", heads=[-1], **kw)
    with pytest.raises(ValueError, match=r"layers: 3 out of range.*3 layers"):
        headint.scan(gpt2, batch, "logit_diff", layers=[3], **kw)
    with pytest.raises(ValueError, match="out of range"):
        headint.scan(gpt2, batch, "logit_diff", head_sets=[[(0, 1), (2, 7)]], **kw)
    with pytest.raises(ValueError, match=r"positions: 6 out of range"):
        headint.scan(gpt2, batch, "logit_diff", per_position=True, positions=[0, 6], **kw)
    with pytest.raises(ValueError, match="batch_size"):
        headint.scan(gpt2, batch, "logit_diff", batch_size=0, **kw)
    with pytest.raises(ValueError, match="2 examples"):
        headint.scan(gpt2, make_batch(1, 6), "logit_diff", method="resample", **kw)
    with pytest.raises(ValueError, match="unknown metric"):
        headint.scan(gpt2, batch, "accuracy", **kw)
    with pytest.raises(TypeError, match="input_ids"):
        headint.scan(gpt2, {"ids": batch["input_ids"]}, "logit_diff", **kw)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        headint.scan(gpt2, batch["input_ids"][0], "logit_diff", **kw)


def test_scan_rejects_ambiguous_arguments():
    import headint
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)).eval()
    ids = torch.randint(0, 16, (2, 5))
    batch = {"input_ids": ids, "target": torch.tensor([1, 2]), "contrast": torch.tensor([3, 4])}
    with pytest.raises(ValueError, match="head_sets and per_position"):
        headint.scan(m, batch, "logit_diff", head_sets=[[(0, 0)]], per_position=True, progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        headint.scan(m, batch, "logit_diff", head_sets=[[]], progress=False)
    with pytest.raises(ValueError, match=r"mean_inputs have length 4"):
        headint.scan(m, batch, "logit_diff", method="mean", mean_inputs=torch.randint(0, 16, (3, 4)), progress=False)
