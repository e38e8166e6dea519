"""One example whose metric is NaN must not make every effect NaN: the scans' baselines are
means over the finite examples (``headint.results.stats.finite_mean``)."""

from __future__ import annotations

import warnings

import torch

import headint
from headint.metrics import CallableMetric
from scan_oracles import corrupt_of, make_batch, oracle_baseline


def _nan_on_first(logits):
    """Last-token logit of token 3, NaN for example 0 (a metric that fails on one example)."""
    v = logits[:, -1, 3].float().clone()
    v[0] = float("nan")
    return v


def test_nan_example_leaves_baselines_and_effects_finite(gpt2):
    batch = make_batch(4, 6, seed=5)
    corrupt = corrupt_of(batch, seed=6)
    metric = CallableMetric(_nan_on_first, name="nan_on_first")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", headint.NaNMetricWarning)
        exact = headint.scan(gpt2, batch, metric, corrupt=corrupt, method="zero", backend="reference", progress=False)
        attribution = headint.attribution_scan(gpt2, batch, corrupt, metric, backend="reference")
        path = headint.path_patch(gpt2, batch, corrupt, metric, senders=[(0, 0)], receivers=[(1, 0, "q")], backend="reference")
    with torch.no_grad():
        clean_logits = gpt2(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        corrupt_logits = gpt2(input_ids=corrupt["input_ids"], attention_mask=corrupt["attention_mask"]).logits
    clean_expected = float(clean_logits[1:, -1, 3].double().mean())
    corrupt_expected = float(corrupt_logits[1:, -1, 3].double().mean())
    for result in (exact, attribution, path):
        assert abs(result.clean_baseline - clean_expected) < 1e-4, result.settings["kind"]
        assert abs(result.corrupt_baseline - corrupt_expected) < 1e-4, result.settings["kind"]
        assert torch.isfinite(result.effect).all(), result.settings["kind"]
    assert abs(attribution.settings["base_baseline"] - clean_expected) < 1e-4  # noising: the clean run is the base
