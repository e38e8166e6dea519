"""The scans' speed paths give the hook loop's values, and fall back where they cannot.

- callable metrics on full logits that read only the last real token: probed on the base runs,
  then evaluated on last-position logits (``settings["metric_logits"]``); any metric that reads
  other positions, or fails on the cheap form, keeps the full logits;
- the final block for the last query only (``settings["final_block"]``), on every decoder the
  scans support (GPT-2, Llama, Qwen2, Mistral with a sliding window), checked against the clean
  run before use, refused for right padding, encoders and position-"all" metrics;
- the clean attention output at a variant's first intervened layer (``CleanAttentionPlan``);
- ``group_positions``: neighbouring positions sharing their runs.

The oracle is ``scan_oracles``: one hooked forward per intervention, full logits, no headint.
"""

from __future__ import annotations

import pytest
import torch

import headint
import headint.integration.attention_function as attention_function
import headint.integration.blocks as blocks
from headint.integration.adapter import model_parts
from headint.integration.structure import model_shape, model_structure
import tiny_models as tm
from headint.integration.replica import Replica
from headint.interventions.edits import CallPlan
from headint.metrics import CallableMetric, LogitDiff
from headint.plan import TensorPlan
from headint.scans.metric_logits import LastPositionOf, last_position_form
from headint.scans.runner import VariantRunner
from headint.scans.shortcuts import CleanAttentionPlan, Shortcuts
from scan_oracles import corrupt_of, make_batch, oracle_scan, record_z

ATOL = RTOL = 1e-5
BACKEND = "reference"
LAST_QUERY = "final block for the last query only"


def assert_close(got, want):
    assert got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    fin = ~torch.isnan(want)
    diff = float((got[fin] - want[fin]).abs().max())
    assert torch.allclose(got[fin], want[fin], atol=ATOL, rtol=RTOL), f"max |scan - oracle| = {diff:.3g}"


def scan(model, batch, metric, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("backend", BACKEND)
    return headint.scan(model, batch, metric, **kw)


# ------------------------------------------------------------------------------ callable metrics


def last_logit_diff(logits, batch):
    """What a hook-loop user writes: full logits, last column, two ids."""
    return logits[:, -1, 3] - logits[:, -1, 5]


@pytest.mark.parametrize("per_position", [False, True])
def test_callable_on_last_position_runs_cheap_and_matches(model, per_position):
    batch = make_batch(3, 7, seed=101, pad="left", lengths=[7, 5, 6])
    corrupt = corrupt_of(batch)
    kw = dict(corrupt=corrupt, method="patch", per_position=per_position, heads=[1, 3] if per_position else None)
    r = scan(model, batch, last_logit_diff, **kw)
    assert r.settings["metric_logits"] == "last position, form single, columns 2 of 50", r.settings["metric_logits"]
    assert r.settings["restricted_logits"] is True
    assert r.settings["position_reuse"] is per_position  # the cheap metric is a last-position one
    assert_close(r.per_example, oracle_scan(model, batch, last_logit_diff, corrupt=corrupt, method="patch",
                                            per_position=per_position, heads=kw["heads"]))
    # and it costs what the built-in metric costs: same runs, same blocks
    ids = dict(target=torch.full((3,), 3), contrast=torch.full((3,), 5))
    built_in = scan(model, dict(batch, **ids), LogitDiff(), **dict(kw, corrupt=dict(corrupt, **ids)))
    assert_close(r.per_example, built_in.per_example)
    assert r.settings["cost"] == built_in.settings["cost"]


@pytest.mark.parametrize("name,fn", [
    ("second to last", lambda logits, batch: logits[:, -2, 3] - logits[:, -1, 5]),
    ("mean over positions", lambda logits, batch: logits.mean(1)[:, 3]),
    ("first position", lambda logits, batch: logits[:, 0, 3]),
    ("every position's log-prob", lambda logits, batch: logits.log_softmax(-1)[..., 4].sum(1)),
])
def test_callable_reading_other_positions_keeps_full_logits(gpt2, name, fn):
    batch = make_batch(3, 6, seed=102)
    r = scan(gpt2, batch, fn, method="zero")
    assert r.settings["metric_logits"].startswith("full logits ("), r.settings["metric_logits"]
    assert_close(r.per_example, oracle_scan(gpt2, batch, fn, method="zero"))


def test_callable_needing_the_full_shape_gets_the_expanded_form(gpt2):
    """Errors on ``[N, 1, V]`` (it checks T), works on the ``[N, T, V]`` view: the expanded form."""
    T = 6

    def fn(logits, batch):
        assert logits.shape[1] == T, "needs [N, T, V]"
        return logits[:, T - 1, 7] * 2

    batch = make_batch(3, T, seed=103)
    r = scan(gpt2, batch, fn, method="mean")
    assert r.settings["metric_logits"].startswith("last position, form expanded, columns 1 of "), r.settings["metric_logits"]
    assert "single: it raised AssertionError" not in r.settings["metric_logits"]
    assert_close(r.per_example, oracle_scan(gpt2, batch, fn, method="mean"))


def test_callable_erroring_on_every_cheap_form_keeps_full_logits(gpt2):
    def fn(logits, batch):
        N, T, V = logits.shape
        assert T > 1
        flat = logits.view(N * T, V)  # a view: fails on the expanded (stride-0) form
        return flat[T - 1 :: T, 9]

    batch = make_batch(3, 6, seed=104)
    r = scan(gpt2, batch, fn, method="zero")
    path = r.settings["metric_logits"]
    assert path.startswith("full logits (") and "single: it raised" in path and "expanded: it raised" in path, path
    assert_close(r.per_example, oracle_scan(gpt2, batch, fn, method="zero"))


def test_callable_last_column_on_right_padding_keeps_full_logits(gpt2):
    """``logits[:, -1]`` on right-padded rows reads a padding position, not the last real token:
    the cheap path would change its values, so it must not run."""
    batch = make_batch(3, 7, seed=105, pad="right", lengths=[7, 5, 4])
    r = scan(gpt2, batch, last_logit_diff, method="zero")
    assert r.settings["metric_logits"].startswith("full logits (")
    # exactly the full-logits path's values (rows 1, 2 read a padding position, whose logits
    # depend on the position ids padding gets; row 0 is all real tokens: the oracle's)
    assert_close(r.per_example, scan(gpt2, batch, CallableMetric(last_logit_diff, probe_last=False), method="zero").per_example)
    assert_close(r.per_example[..., 0], oracle_scan(gpt2, batch, last_logit_diff, method="zero")[..., 0])

    def last_real(logits, batch):  # reads the last real token: cheap path, right padding or not
        last = batch["attention_mask"].cumsum(1).argmax(1)
        return logits[torch.arange(logits.shape[0]), last, 3]

    r = scan(gpt2, batch, last_real, method="zero")
    assert r.settings["metric_logits"] == "last position, form expanded, columns 1 of 50"  # [N, 1, V] cannot be indexed at `last`
    assert_close(r.per_example, oracle_scan(gpt2, batch, last_real, method="zero"))


def test_noise_probe_catches_a_metric_that_hides_its_nan_dependence(gpt2):
    """A metric that reads position 0 but maps NaN there to the clean value passes the NaN probe;
    the noise probe still sees the dependence."""
    batch = make_batch(3, 6, seed=106)
    _, full = record_z(gpt2, batch)
    clean0 = full[:, 0, 3].clone()

    def sneaky(logits, batch):
        x0 = logits[:, 0, 3]
        x0 = torch.where(torch.isnan(x0), clean0, x0) if x0.shape == clean0.shape else x0
        return logits[:, -1, 3] + x0

    metric = CallableMetric(sneaky)
    use, path = last_position_form(metric, [full], [batch])
    assert use is metric and "noise" in path, path
    r = scan(gpt2, batch, sneaky, method="zero")
    assert_close(r.per_example, oracle_scan(gpt2, batch, sneaky, method="zero"))


def test_probe_last_false_and_declared_metrics(gpt2):
    batch = make_batch(3, 6, seed=107)
    r = scan(gpt2, batch, CallableMetric(last_logit_diff, probe_last=False), method="zero")
    assert r.settings["metric_logits"] == "full logits (probe_last=False)"
    assert r.settings["final_block"].startswith("full final block (")
    assert_close(r.per_example, oracle_scan(gpt2, batch, last_logit_diff, method="zero"))
    r = scan(gpt2, batch, "loss", method="zero")
    assert r.settings["metric_logits"] == "declared"


def test_callable_with_clean_logits_and_kl_like(gpt2):
    """A needs_clean callable (KL at the last position, written on full logits) runs cheap; one
    that sums KL over every position does not."""
    batch = make_batch(3, 6, seed=108)
    corrupt = corrupt_of(batch)

    def kl_last(logits, batch, clean):
        p = clean[:, -1].log_softmax(-1)
        return (p.exp() * (p - logits[:, -1].log_softmax(-1))).sum(-1)

    def kl_all(logits, batch, clean):
        p = clean.log_softmax(-1)
        return (p.exp() * (p - logits.log_softmax(-1))).sum(-1).sum(-1)

    _, clean_full = record_z(gpt2, batch)
    for fn, cheap in ((kl_last, True), (kl_all, False)):
        metric = CallableMetric(fn, needs_clean=True)
        r = scan(gpt2, batch, metric, corrupt=corrupt, method="patch", direction="noising")
        assert r.settings["metric_logits"].startswith("last position" if cheap else "full logits"), r.settings["metric_logits"]
        oracle = oracle_scan(gpt2, batch, lambda lg, b: fn(lg, b, clean_full), corrupt=corrupt, method="patch", direction="noising")
        assert_close(r.per_example, oracle)


def test_last_position_of_checks_arguments():
    inner = CallableMetric(last_logit_diff)
    with pytest.raises(ValueError, match="form"):
        LastPositionOf(inner, "diagonal")
    with pytest.raises(ValueError, match="position-'all'"):
        LastPositionOf(CallableMetric(last_logit_diff, position="last"))
    with pytest.raises(TypeError, match="Metric"):
        LastPositionOf(last_logit_diff)


def test_attribution_and_path_patch_use_the_cheap_callable(gpt2):
    batch = make_batch(3, 6, seed=109)
    corrupt = corrupt_of(batch)
    ids = dict(target=torch.full((3,), 3), contrast=torch.full((3,), 5))
    a = headint.attribution_scan(gpt2, batch, corrupt, last_logit_diff, backend=BACKEND)
    b = headint.attribution_scan(gpt2, dict(batch, **ids), dict(corrupt, **ids), LogitDiff(), backend=BACKEND)
    assert_close(a.per_example, b.per_example)
    recv = [(2, 0, "q")]
    a = headint.path_patch(gpt2, batch, corrupt, last_logit_diff, receivers=recv, backend=BACKEND)
    b = headint.path_patch(gpt2, dict(batch, **ids), dict(corrupt, **ids), LogitDiff(), receivers=recv, backend=BACKEND)
    assert_close(a.per_example, b.per_example)


# ------------------------------------------------------------------------------ last-query final block


def _final_mlp(model):
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    return blocks[-1].mlp


@pytest.mark.parametrize("arch", tm.DECODERS)
@pytest.mark.parametrize("per_position", [False, True])
def test_last_query_final_block_every_decoder(arch, per_position):
    model = tm.get(arch).model
    batch = make_batch(3, 7, seed=111, pad="left", lengths=[7, 6, 5])
    corrupt = corrupt_of(batch)
    model_shape(model)  # the model's one probe forward runs before the count starts
    tokens = []
    handle = _final_mlp(model).register_forward_pre_hook(lambda _m, args: tokens.append(args[0].shape[1]))
    try:
        # group_positions=1: every scanned position fed from itself (position 5 exercises the sliding window)
        r = scan(model, batch, "logit_diff", corrupt=corrupt, method="patch", per_position=per_position,
                 heads=[0, 3] if per_position else None, positions=[0, 3, 5, 6] if per_position else None, group_positions=1)
    finally:
        handle.remove()
    assert r.settings["final_block"] == LAST_QUERY
    assert_close(r.per_example, oracle_scan(model, batch, "logit_diff", corrupt=corrupt, method="patch", per_position=per_position,
                                            heads=[0, 3] if per_position else None, positions=[0, 3, 5, 6] if per_position else None))
    # the final MLP ran on T tokens in the two clean passes only, and once in every other run
    # (every variant run and the check): on the last token, except where Mistral's sliding
    # window dropped keys of a cached prefix (position 5: 3 cached + 2 fed keys < 7 positions),
    # and in the position-reuse check (2 base rows fed from the first start position, 3: 4 tokens)
    cost = r.settings["cost"]
    assert len(tokens) == cost["runs"]
    if per_position:
        assert r.settings["position_reuse"] is True
        tokens.remove(7 - 3)
    assert tokens.count(7) == 2
    assert cost["last_query_rows"] > 0
    sliding = arch == "mistral" and per_position
    assert all(t == 1 for t in tokens if t != 7) is not sliding
    if sliding:
        assert sorted(set(tokens)) == [1, 2, 7]


def test_last_query_not_used_where_it_does_not_apply(gpt2):
    kw = dict(method="zero", heads=[1])
    right = make_batch(3, 6, seed=112, pad="right", lengths=[6, 4, 5])
    r = scan(gpt2, right, "logit_diff", **kw)
    assert r.settings["final_block"] == "full final block (some rows end before position T - 1 (right padding))"
    assert r.settings["cost"]["last_query_rows"] == 0
    assert_close(r.per_example, oracle_scan(gpt2, right, "logit_diff", **kw))
    batch = make_batch(3, 6, seed=113)
    r = scan(gpt2, batch, "loss", **kw)
    assert r.settings["final_block"].startswith("full final block (the metric does not read")
    assert_close(r.per_example, oracle_scan(gpt2, batch, "loss", **kw))


def test_last_query_not_used_on_encoders():
    bert = tm.get("bert").model
    batch = make_batch(3, 6, seed=114)
    r = scan(bert, batch, "logit_diff", method="zero", heads=[0, 2])
    assert r.settings["final_block"].startswith("full final block (")
    assert r.settings["cost"]["last_query_rows"] == 0
    assert_close(r.per_example, oracle_scan(bert, batch, "logit_diff", method="zero", heads=[0, 2]))


def test_last_query_check_catches_a_wrong_cut(llama, monkeypatch):
    """If cutting the block's arguments to the last query went wrong silently (here: to the first
    query, so the last token gets position 0's rotary embedding), the check against the clean
    run refuses the shortcut and values stay exact."""

    def first_query(x, T):
        def cut(t):
            if t.dim() == 4 and t.shape[-2] == T:
                return t[..., -1:, :]
            if t.dim() in (2, 3) and t.shape[1] == T:
                return t[:, :1]
            return t
        return blocks.map_tensors(x, cut)

    monkeypatch.setattr(blocks, "to_last_query", first_query)
    batch = make_batch(3, 6, seed=115)
    r = scan(llama, batch, "logit_diff", method="zero")
    assert r.settings["final_block"].startswith("full final block (the final block on the last query only differs"), r.settings["final_block"]
    assert r.settings["cost"]["last_query_rows"] == 2  # the check's two rows only
    assert_close(r.per_example, oracle_scan(llama, batch, "logit_diff", method="zero"))


def test_last_query_check_catches_an_error(llama, monkeypatch):
    monkeypatch.setattr(blocks, "to_last_query", lambda x, T: x)  # rotary cos/sin left at T positions
    batch = make_batch(3, 6, seed=116)
    r = scan(llama, batch, "logit_diff", method="zero")
    assert r.settings["final_block"].startswith("full final block (the final block failed on the last query only"), r.settings["final_block"]
    assert_close(r.per_example, oracle_scan(llama, batch, "logit_diff", method="zero"))


def test_position_reuse_check_catches_a_wrong_prefix(gpt2, monkeypatch):
    """If the cache prefix fed back were wrong (here: zeros), the check against the clean run turns
    position reuse off and every row runs whole: values stay exact."""
    import headint.scans.runner as runner_mod

    orig = runner_mod._cache_contents
    monkeypatch.setattr(runner_mod, "_cache_contents", lambda *a: {l: (k * 0, v * 0) for l, (k, v) in orig(*a).items()})
    batch = make_batch(3, 6, seed=118)
    kw = dict(method="zero", per_position=True, heads=[1], positions=[2, 4])
    r = scan(gpt2, batch, "logit_diff", group_positions=1, **kw)
    assert r.settings["position_reuse"] is False
    assert_close(r.per_example, oracle_scan(gpt2, batch, "logit_diff", **kw))


def test_last_query_block_only_in_a_replica(gpt2):
    original = list(gpt2.transformer.h)
    batch = make_batch(2, 5, seed=117)
    scan(gpt2, batch, "logit_diff", method="zero")
    assert list(gpt2.transformer.h) == original
    with pytest.raises(RuntimeError, match="only a private Replica"):  # never in the user's model
        with blocks.last_query_block(model_parts(gpt2, model_shape(gpt2)), 5):
            pass
    replica = Replica(gpt2, model_structure(gpt2))
    in_replica = list(replica.root.transformer.h)
    with pytest.raises(KeyError):
        with blocks.last_query_block(replica.parts, 5):
            assert isinstance(replica.root.transformer.h[-1], blocks.LastQueryBlock)
            assert list(gpt2.transformer.h) == original
            raise KeyError("boom")
    assert list(replica.root.transformer.h) == in_replica
    assert list(gpt2.transformer.h) == original


# ------------------------------------------------------------------------------ clean attention


def _count_attention_calls(monkeypatch):
    calls = []
    orig = attention_function.attention

    def counting(q, *a, **kw):
        calls.append(q.shape[2])
        return orig(q, *a, **kw)

    monkeypatch.setattr(attention_function, "attention", counting)
    return calls


@pytest.mark.parametrize("start_pos", [0, 3])
def test_clean_attention_skips_the_first_layers_attention(model, monkeypatch, start_pos):
    batch = make_batch(3, 6, seed=121, pad="left", lengths=[6, 5, 4])
    runner = VariantRunner.start(model, batch, LogitDiff(), backend=BACKEND)
    ex = torch.tensor([0, 1, 2, 1])
    z = runner.base.z[1][ex].transpose(1, 2)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(4, 4, 6, generator=g) > 0.5).float()
    patch = torch.randn(4, 4, 6, z.shape[-1], generator=g)
    plan = TensorPlan({1: CallPlan(head_mask=mask, head_patch=patch), 2: CallPlan(head_mask=1 - mask)})
    runner.children_before_attention(1)  # the clean rows' q/k/v projections of layer 1, captured once
    runner.check_position_reuse(start_pos)  # ... and position reuse checked once
    site = next(s for s in model_structure(model).sites.values() if s.layer == 1)
    attn = runner.model.get_submodule(site.path)  # the runner's replica of it
    children_called = []
    handles = [c.register_forward_hook(lambda m, a, o, n=n: children_called.append(n)) for n, c in attn.named_children()]
    calls = _count_attention_calls(monkeypatch)
    try:
        want = runner.run(ex, plan, start_layer=1, start_pos=start_pos)
        n_full, full_children = len(calls), list(children_called)
        got = runner.run(ex, plan, start_layer=1, start_pos=start_pos, shortcuts=Shortcuts(clean_attention=True, last_query=False))
    finally:
        for h in handles:
            h.remove()
    assert len(calls) - n_full == n_full - 1  # layer 1's attention was not computed
    out_proj = site.out_proj.rsplit(".", 1)[-1]
    assert out_proj in full_children and len(full_children) > 1
    # whole rows: the children before attention (q/k/v projections) are the captured ones; the output
    # projection and what follows it run
    ran = children_called[len(full_children):]
    after = full_children[full_children.index(out_proj):]
    assert ran == (after if start_pos == 0 else full_children), (ran, full_children)
    assert len(after) < len(full_children)
    assert runner.cost.replayed_projection_rows == (len(ex) if start_pos == 0 else 0)
    assert_close(got, want)
    assert not torch.equal(want, runner.run(ex, TensorPlan({}), start_layer=1, start_pos=start_pos))  # the plan matters


def test_clean_attention_refuses_other_interventions(gpt2):
    batch = make_batch(2, 5, seed=122)
    runner = VariantRunner.start(gpt2, batch, LogitDiff(), backend=BACKEND)
    ex = torch.tensor([0, 1])
    plan = TensorPlan({0: CallPlan(head_mask=torch.ones(2, 4, 1), score_scale=torch.full((2, 4), 0.5))})
    with pytest.raises(ValueError, match=r"clean_attention shortcut does not understand the edits \['score_scale'\]"):
        runner.run(ex, plan, start_layer=0, shortcuts=Shortcuts(clean_attention=True, last_query=False))
    plan = CleanAttentionPlan(TensorPlan({0: CallPlan(head_mask=torch.ones(2, 4, 1))}), 0, torch.zeros(3, 4, 5, 8))
    with pytest.raises(ValueError, match="do not cover rows 2"):
        plan.for_call(0, 2, 5, 5, "cpu", torch.float32)


def test_plan_output_of_the_wrong_shape_is_an_error(gpt2):
    from headint.plan import Plan

    class Fixed(Plan):
        def layers(self):
            return {0}

        def for_call(self, layer, B, Tq, Tk, device, dtype, q_start=None):
            return CallPlan(output=torch.zeros(B, 4, Tq + 1, 8)) if layer == 0 else None

    with pytest.raises(ValueError, match=r"output for layer 0 has shape \[2, 4, 6, 8\]; expected \[2, 4, 5, 8\]"):
        with headint.intervene(gpt2, Fixed(), backend=BACKEND):
            gpt2(input_ids=torch.ones(2, 5, dtype=torch.long))


# ------------------------------------------------------------------------------ group_positions


@pytest.mark.parametrize("group", [1, 2, 5])
def test_group_positions_same_values(gpt2, group):
    batch = make_batch(3, 7, seed=131, pad="left", lengths=[7, 6, 4])
    kw = dict(method="resample", per_position=True, heads=[1, 2], positions=[0, 2, 3, 5, 6])
    r = scan(gpt2, batch, "logit_diff", group_positions=group, **kw)
    assert r.settings["group_positions"] == group
    assert_close(r.per_example, oracle_scan(gpt2, batch, "logit_diff", **kw))
    if group > 1:
        ungrouped = scan(gpt2, batch, "logit_diff", group_positions=1, **kw)
        assert r.settings["cost"]["runs"] < ungrouped.settings["cost"]["runs"]
        assert r.settings["cost"]["token_layer_forwards"] > ungrouped.settings["cost"]["token_layer_forwards"]


def test_group_positions_auto_and_errors(gpt2):
    batch = make_batch(2, 5, seed=132)
    r = scan(gpt2, batch, "logit_diff", method="zero", per_position=True, heads=[0])
    L, T, N = gpt2.config.n_layer, 5, 2
    # as many positions as fill one batch: L variants (heads [0]) x N examples per position
    assert r.settings["group_positions"] == max(1, min(T, r.settings["batch_rows"] // (L * N)))
    assert r.settings["group_positions"] > 1
    assert_close(r.per_example, oracle_scan(gpt2, batch, "logit_diff", method="zero", per_position=True, heads=[0]))
    r1 = scan(gpt2, batch, "logit_diff", method="zero", per_position=True, heads=[0], batch_size=L * N)
    assert r1.settings["group_positions"] == 1  # one position's rows fill the batch
    for bad in (0, -1, "all", 1.5, True):
        with pytest.raises(ValueError, match="group_positions must be a positive int or 'auto'"):
            scan(gpt2, batch, "logit_diff", method="zero", per_position=True, group_positions=bad)


# ------------------------------------------------------------------------------ the benchmark's smoke test


def test_benchmark_quick_smoke(tmp_path):
    """``bench/scan_vs_hooks.py --quick`` runs every default section on a tiny model, checks every
    exact method against the hook loop before timing, and writes its JSON (peers that are not
    installed are skipped and say so)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *sys.path]))
    proc = subprocess.run([sys.executable, str(root / "bench" / "scan_vs_hooks.py"), "--quick", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "scan_vs_hooks.json").read_text())
    sections = {s["section"]: s for s in data["sections"]}
    assert set(sections) == {"peers", "per_position", "breakdown", "long_context"}
    peers = sections["peers"]
    assert {"hook loop", "headint.scan LogitDiff", "headint.scan callable", "attribution_scan"} <= set(peers["median_s"])
    for name, diff in peers["max_abs_diff"].items():
        assert diff <= 1e-5, (name, diff)
    assert peers["paths"]["headint.scan callable"]["metric_logits"] == "last position, form single, columns 2 of 1000"
    assert peers["paths"]["headint.scan LogitDiff"]["final_block"] == LAST_QUERY
    assert peers["flops"]["headint"] < peers["flops"]["hook_loop"]
    assert all(r["max_abs_diff"] <= 1e-4 for r in sections["long_context"]["runs"])
    assert data["environment"]["cpu"] and "load_avg_end" in data["environment"]


def test_children_captured_only_when_one_output_can_stand_in():
    """Only children called once, on whole rows, with row-major outputs are captured; replaying
    answers calls on the captured rows only and runs the child for any other call."""
    from torch import nn

    from headint.integration.blocks import AttentionReached, capture_children_before_attention, replay_children

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.norm, self.swap, self.after = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            q = self.norm(self.proj(x))
            k = self.norm(x)  # a shared child: called twice
            s = self.swap(x.transpose(0, 1))  # [T, N, 4]: not row-major
            raise AttentionReached(q + k + s.transpose(0, 1))

    toy = Replica(Toy()).root  # stand-ins go into a private replica only
    x = torch.randn(3, 5, 4)
    with capture_children_before_attention(toy, 3, 5) as outputs:
        with pytest.raises(AttentionReached):
            toy(x)
    assert set(outputs) == {"proj"}
    ex = torch.tensor([2, 0])
    with replay_children(toy, outputs, ex, 3, 5) as stand_ins:
        assert torch.equal(toy.proj(x[ex]), toy.proj.output[ex])  # answered from the capture
        assert toy.proj.weight is stand_ins[0]._original.weight  # attributes are the child's
        y = torch.randn(2, 4, 4)
        assert torch.equal(toy.proj(y), nn.functional.linear(y, toy.proj.weight, toy.proj.bias))  # other shapes: computed
        assert stand_ins[0].replayed == 1
    assert isinstance(toy.proj, nn.Linear)  # put back
