"""Scan throughput on a small model: ``headint.scan`` against the hook loop (pytest-benchmark).

    pytest bench/test_bench_scan.py --benchmark-only

Model: a 4-layer, 8-head, d_model 256 GPT-2 built from its config (seeded random weights,
vocabulary 4096), 8 prompts of 32 tokens, metric: logit difference at the last position. The
whole-model GPT-2-small comparison is ``bench/scan_vs_hooks.py``; this suite is the quick,
repeatable one.

Benchmarks (group ``scan all heads`` / ``scan per position``):

- ``headint.scan`` zero ablation of every head / of (head, position) on a subset;
- the hook loop: one full forward per head with a pre-hook on ``c_proj`` zeroing that head;
- ``headint.attribution_scan(method="mask")``: the first-order estimate, one forward + backward.

Each benchmark's values are checked against the hook loop's before timing. Rounds:
``HEADINT_BENCH_ROUNDS`` (default 3, after one warm-up round).
"""

from __future__ import annotations

import os

import pytest
import torch

import headint
from headint.metrics import LogitDiff

from scan_vs_hooks import build_model, headint_values, hook_loop, make_batch

ROUNDS = int(os.environ.get("HEADINT_BENCH_ROUNDS", "3"))
CONFIG = dict(n_layer=4, n_head=8, n_embd=256, vocab_size=4096, n_positions=128)
N, T = 8, 32
PP_LAYERS, PP_HEADS, PP_POSITIONS = [0, 2], [0, 1, 2, 3], list(range(0, T, 4)) + [T - 1]


@pytest.fixture(scope="module")
def setup():
    model = build_model(CONFIG)
    batch = make_batch(model, N, T)
    L, H = model.config.n_layer, model.config.n_head
    pairs = [(l, h) for l in range(L) for h in range(H)]
    pp_pairs = [(l, h) for l in PP_LAYERS for h in PP_HEADS]
    return dict(model=model, batch=batch, pairs=pairs, pp_pairs=pp_pairs,
                hooks=hook_loop(model, batch, pairs), hooks_pp=hook_loop(model, batch, pp_pairs, PP_POSITIONS))


def _run(benchmark, fn, group, **info):
    benchmark.group = group
    benchmark.extra_info.update(N=N, T=T, **CONFIG, threads=torch.get_num_threads(), **info)
    return benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def test_scan_all_heads(benchmark, check, setup):
    m, b = setup["model"], setup["batch"]
    fn = lambda: headint.scan(m, b, LogitDiff(), method="zero", progress=False)
    res = fn()
    check(headint_values(res, setup["pairs"]), setup["hooks"], "headint.scan vs hook loop", atol=1e-4)
    _run(benchmark, fn, "scan all heads", variants=len(setup["pairs"]), impl="headint.scan",
         layer_forwards=res.settings["cost"]["layer_forwards"], backend=headint.last_backend())


def test_hook_loop_all_heads(benchmark, setup):
    m, b = setup["model"], setup["batch"]
    L = m.config.n_layer
    _run(benchmark, lambda: hook_loop(m, b, setup["pairs"]), "scan all heads", variants=len(setup["pairs"]), impl="hook loop",
         layer_forwards=len(setup["pairs"]) * N * L)


def test_attribution_all_heads(benchmark, check, setup):
    m, b = setup["model"], setup["batch"]
    fn = lambda: headint.attribution_scan(m, b, metric=LogitDiff(), method="mask")
    res = fn()
    exact = setup["hooks"].mean(-1) - res.clean_baseline
    est = torch.stack([res.per_example[l, h] for l, h in setup["pairs"]]).mean(-1) - res.clean_baseline
    r = float(torch.corrcoef(torch.stack([exact, est]))[0, 1])
    assert r > 0.5, f"attribution estimate does not track the exact effects (r={r:.3f})"
    _run(benchmark, fn, "scan all heads", variants=len(setup["pairs"]), impl="attribution_scan (mask)", corr_with_exact=r)


def test_scan_per_position(benchmark, check, setup):
    m, b = setup["model"], setup["batch"]
    fn = lambda: headint.scan(m, b, LogitDiff(), method="zero", per_position=True, layers=PP_LAYERS, heads=PP_HEADS,
                              positions=PP_POSITIONS, progress=False)
    res = fn()
    check(headint_values(res, setup["pp_pairs"], PP_POSITIONS), setup["hooks_pp"], "per-position scan vs hook loop", atol=1e-4)
    _run(benchmark, fn, "scan per position", variants=len(setup["pp_pairs"]) * len(PP_POSITIONS), impl="headint.scan",
         token_layer_forwards=res.settings["cost"]["token_layer_forwards"])


def test_hook_loop_per_position(benchmark, setup):
    m, b = setup["model"], setup["batch"]
    _run(benchmark, lambda: hook_loop(m, b, setup["pp_pairs"], PP_POSITIONS), "scan per position",
         variants=len(setup["pp_pairs"]) * len(PP_POSITIONS), impl="hook loop")
