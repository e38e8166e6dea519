"""Tests for headint.results.ScanResult: statistics, tables, plots and persistence."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

import headint.results
from headint.results import ScanResult, head_set_name

L, H, P, N = 3, 4, 5, 7


def per_example(shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.fixture
def grid_result():
    return ScanResult(
        per_example((L, H, N)),
        ("layer", "head"),
        metric_name="logit_diff",
        clean_baseline=2.5,
        corrupt_baseline=-0.5,
        settings={"method": "mean", "model": "tiny"},
    )


@pytest.fixture
def position_result():
    return ScanResult(per_example((L, H, P, N), seed=1), ("layer", "head", "position"), metric_name="kl")


HEAD_SETS = [((0, 1),), ((0, 1), (1, 2)), (), ((2, 3), (0, 0), (1, 1))]


@pytest.fixture
def set_result():
    return ScanResult(
        per_example((len(HEAD_SETS), N), seed=2),
        ("head_set",),
        labels=HEAD_SETS,
        metric_name="logprob",
        clean_baseline=-1.0,
        corrupt_baseline=-4.0,
    )


# ----------------------------------------------------------------- statistics


def test_stats_match_numpy(grid_result):
    x = grid_result.per_example.double().numpy()
    np.testing.assert_allclose(grid_result.values.numpy(), x.mean(-1), rtol=1e-6)
    np.testing.assert_allclose(grid_result.stderr.numpy(), x.std(-1, ddof=1) / np.sqrt(N), rtol=1e-6)
    np.testing.assert_allclose(grid_result.effect.numpy(), x.mean(-1) - 2.5, rtol=1e-6, atol=1e-7)
    assert grid_result.values.shape == (L, H)
    assert grid_result.grid_shape == (L, H) and grid_result.n_examples == N


def test_stats_float64_kept_and_single_example():
    r = ScanResult(per_example((2, 3, 1), dtype=torch.float64), ("layer", "head"))
    assert r.values.dtype == torch.float64
    assert torch.equal(r.stderr, torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(r.values, r.per_example[..., 0])


def test_effect_needs_baseline():
    r = ScanResult(per_example((2, 2, 3)))
    with pytest.raises(ValueError, match="clean baseline"):
        r.effect


def test_normalized_result(grid_result):
    nr = grid_result.normalized_result()
    assert nr.normalized and not grid_result.normalized
    assert (nr.clean_baseline, nr.corrupt_baseline) == (1.0, 0.0)
    expected = (grid_result.per_example - (-0.5)) / (2.5 - (-0.5))
    torch.testing.assert_close(nr.per_example, expected)
    torch.testing.assert_close(nr.values, (grid_result.values + 0.5) / 3.0)
    assert nr.settings["normalization"] == {"clean_baseline": 2.5, "corrupt_baseline": -0.5}
    assert nr.settings["method"] == "mean"
    # idempotent
    torch.testing.assert_close(nr.normalized_result().per_example, nr.per_example)


def test_normalized_result_errors():
    with pytest.raises(ValueError, match="both baselines"):
        ScanResult(per_example((2, 2, 3)), clean_baseline=1.0).normalized_result()
    with pytest.raises(ValueError, match="equals corrupt"):
        ScanResult(per_example((2, 2, 3)), clean_baseline=1.0, corrupt_baseline=1.0).normalized_result()


def test_constructor_validation():
    with pytest.raises(ValueError, match=r"per_example has shape \[2, 3\]"):
        ScanResult(torch.zeros(2, 3), ("layer", "head"))
    with pytest.raises(ValueError, match="axes must be one of"):
        ScanResult(torch.zeros(2, 3, 4), ("head", "layer"))
    with pytest.raises(ValueError, match="labels"):
        ScanResult(torch.zeros(2, 4), ("head_set",))
    with pytest.raises(ValueError, match="labels has 1 head sets"):
        ScanResult(torch.zeros(2, 4), ("head_set",), labels=[[(0, 0)]])
    with pytest.raises(TypeError, match="settings"):
        ScanResult(torch.zeros(2, 3, 4), settings={"model": object()})
    with pytest.raises(TypeError, match="per_example"):
        ScanResult([[1.0]])
    with pytest.raises(ValueError, match="N >= 1"):
        ScanResult(torch.zeros(2, 3, 0))


# ----------------------------------------------------------------- tables


def test_to_frame_layer_head(grid_result):
    df = grid_result.to_frame()
    assert list(df.columns) == ["layer", "head", "value", "stderr", "n"]
    assert len(df) == L * H
    assert (df["n"] == N).all()
    assert df["layer"].tolist() == [l for l in range(L) for _ in range(H)]
    assert df["head"].tolist() == list(range(H)) * L
    row = df[(df['layer'] == 2) & (df['head'] == 1)].iloc[0]
    assert row["value"] == pytest.approx(float(grid_result.values[2, 1]), rel=1e-6)
    assert row["stderr"] == pytest.approx(float(grid_result.stderr[2, 1]), rel=1e-6)


def test_to_frame_position(position_result):
    df = position_result.to_frame()
    assert list(df.columns) == ["layer", "head", "position", "value", "stderr", "n"]
    assert len(df) == L * H * P
    row = df[(df['layer'] == 1) & (df['head'] == 3) & (df['position'] == 4)].iloc[0]
    assert row["value"] == pytest.approx(float(position_result.values[1, 3, 4]), rel=1e-6)


def test_to_frame_head_sets(set_result):
    df = set_result.to_frame()
    assert list(df.columns) == ["head_set", "value", "stderr", "n"]
    assert df["head_set"].tolist() == ["L0H1", "L0H1+L1H2", "none", "L2H3+L0H0+L1H1"]
    assert head_set_name([(0, 1), (1, 2)]) == "L0H1+L1H2"
    np.testing.assert_allclose(df["value"], set_result.values.numpy(), rtol=1e-6)


@pytest.mark.parametrize("which", ["grid_result", "position_result", "set_result"])
def test_csv_round_trip(which, request, tmp_path):
    result = request.getfixturevalue(which)
    path = result.to_csv(tmp_path / "scan.csv")
    back = pd.read_csv(path)
    pd.testing.assert_frame_equal(back, result.to_frame(), check_dtype=False)


def test_top_orders_by_abs_effect(grid_result):
    top = grid_result.top(k=5)
    assert len(top) == 5
    assert list(top.columns) == ["layer", "head", "value", "stderr", "n", "effect"]
    abs_eff = np.abs(grid_result.effect.double().numpy()).reshape(-1)
    expected = np.sort(abs_eff)[::-1][:5]
    np.testing.assert_allclose(np.abs(top["effect"]), expected, rtol=1e-6)
    first = top.iloc[0]
    flat = int(np.argmax(abs_eff))
    assert (first["layer"], first["head"]) == divmod(flat, H)
    assert first["stderr"] == pytest.approx(float(grid_result.stderr.reshape(-1)[flat]), rel=1e-6)
    by_effect = grid_result.top(k=3, by="effect")["effect"].to_numpy()
    assert (np.diff(by_effect) <= 0).all()
    assert len(grid_result.top(k=100)) == L * H


def test_top_without_baseline_uses_abs_value(position_result):
    top = position_result.top(k=4)
    assert "effect" not in top.columns
    expected = np.sort(np.abs(position_result.values.double().numpy()).reshape(-1))[::-1][:4]
    np.testing.assert_allclose(np.abs(top["value"]), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="by must be one of"):
        position_result.top(by="size")
    with pytest.raises(ValueError, match="k must be"):
        position_result.top(k=0)


def test_top_head_sets(set_result):
    top = set_result.top(k=2, by="value")
    assert list(top.columns) == ["head_set", "value", "stderr", "n", "effect"]
    vals = set_result.values.double().numpy()
    order = np.argsort(-vals)[:2]
    assert top["head_set"].tolist() == [head_set_name(HEAD_SETS[i]) for i in order]


# ----------------------------------------------------------------- plots


def _colorbar_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_heatmap_layer_head(grid_result, tmp_path):
    path = tmp_path / "heat.png"
    fig = grid_result.heatmap(path, title="my scan")
    assert isinstance(fig, Figure)
    assert path.stat().st_size > 0
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    ax = fig.axes[0]
    assert ax.get_xlabel() == "head" and ax.get_ylabel() == "layer"
    assert ax.get_title() == "my scan\nmethod mean, N=7, effect from the clean run"  # method, N, what effect means
    assert list(ax.get_xticks()) == list(range(H)) and list(ax.get_yticks()) == list(range(L))
    image = ax.images[0]
    assert image.colorbar is not None
    (cbar_ax,) = _colorbar_axes(fig)
    assert "logit_diff" in cbar_ax.get_ylabel()
    vmin, vmax = image.get_clim()
    assert vmin == pytest.approx(-vmax) and vmax > 0
    np.testing.assert_allclose(np.asarray(image.get_array()), grid_result.effect.numpy(), rtol=1e-6)
    assert "RdBu" in image.get_cmap().name


def test_heatmap_value_without_path(grid_result):
    fig = grid_result.heatmap(value="value")
    np.testing.assert_allclose(np.asarray(fig.axes[0].images[0].get_array()), grid_result.values.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="value must be"):
        grid_result.heatmap(value="mean")


def test_heatmap_positions(position_result, tmp_path):
    path = tmp_path / "pos.png"
    fig = position_result.heatmap(path)
    assert imread(path).shape[0] > 50
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (L * H, P)
    assert ax.get_xlabel() == "position"
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["L0H0", "L0H1"]
    assert len(_colorbar_axes(fig)) == 1


def test_heatmap_head_sets_bar_chart(set_result, tmp_path):
    path = tmp_path / "sets.png"
    fig = set_result.heatmap(path)
    assert path.stat().st_size > 0 and imread(path).ndim == 3
    ax = fig.axes[0]
    assert len(ax.patches) == len(HEAD_SETS)
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, set_result.effect.numpy(), rtol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == [head_set_name(s) for s in HEAD_SETS]


def test_no_pyplot_and_no_backend_change(tmp_path):
    """Importing and plotting must not import pyplot (which would select a global backend)."""
    code = (
        "import sys, torch; import headint.results, headint.metrics; "
        "assert 'matplotlib' not in sys.modules; "
        "headint.results.ScanResult(torch.ones(2, 2, 3)).heatmap(sys.argv[1]); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    root = str(Path(headint.results.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.png")], check=True, env=env)
    assert (tmp_path / "x.png").stat().st_size > 0


# ----------------------------------------------------------------- persistence


def _assert_same(a, b):
    assert torch.equal(a.per_example, b.per_example) and a.per_example.dtype == b.per_example.dtype
    assert a.axes == b.axes and a.labels == b.labels
    assert a.metric_name == b.metric_name
    assert a.clean_baseline == b.clean_baseline and a.corrupt_baseline == b.corrupt_baseline
    assert a.settings == b.settings and a.normalized == b.normalized


@pytest.mark.parametrize("which", ["grid_result", "position_result", "set_result"])
def test_save_load_stem(which, request, tmp_path):
    result = request.getfixturevalue(which)
    stem = result.save(tmp_path / "out" / "run1")
    assert (tmp_path / "out" / "run1.safetensors").exists()
    meta = json.loads((tmp_path / "out" / "run1.json").read_text())
    assert meta["metric_name"] == result.metric_name
    _assert_same(ScanResult.load(stem), result)
    _assert_same(ScanResult.load(tmp_path / "out" / "run1.json"), result)


def test_save_load_directory_and_exact_floats(tmp_path):
    result = ScanResult(
        per_example((2, 3, 4), dtype=torch.float64),
        metric_name="loss",
        clean_baseline=0.1 + 0.2,
        corrupt_baseline=None,
        settings={"method": "zero", "layers": [0, 1], "nested": {"a": 1.0}},
        normalized=True,
    )
    d = tmp_path / "scan_dir"
    d.mkdir()
    result.save(d)
    assert (d / "scan.safetensors").exists() and (d / "scan.json").exists()
    back = ScanResult.load(d)
    _assert_same(back, result)
    assert back.clean_baseline == 0.1 + 0.2


def test_load_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        ScanResult.load(tmp_path / "nothing")


def test_repr(grid_result, set_result):
    text = repr(grid_result)
    assert text.startswith("ScanResult(") and "logit_diff" in text and "[3, 4]" in text
    assert "n_examples=7" in text and "mean" in text
    assert "head_set" in repr(set_result)
    assert len(text) < 250


def test_paired_effect_stderr_and_round_trip(tmp_path):
    import numpy as np

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, generator=g)
    per = base + 0.1 * torch.randn(2, 3, 6, generator=g) - 1.0  # every head shifts each example by ~ -1
    r = ScanResult(per, ("layer", "head"), clean_baseline=float(base.mean()), base_per_example=base)
    d = (per - base).numpy()
    np.testing.assert_allclose(r.effect_stderr.numpy(), d.std(-1, ddof=1) / np.sqrt(6), rtol=1e-5)
    assert (r.effect_stderr < r.stderr).all()  # pairing removes the between-example spread
    frame = r.to_frame()
    assert list(frame.columns) == ["layer", "head", "value", "stderr", "n", "effect", "effect_stderr"]
    r.save(tmp_path / "s")
    back = ScanResult.load(tmp_path / "s")
    assert torch.equal(back.base_per_example, r.base_per_example)
    n = ScanResult(per, ("layer", "head"), clean_baseline=0.5, corrupt_baseline=-0.5, base_per_example=base).normalized_result()
    torch.testing.assert_close(n.base_per_example, base + 0.5)
    with pytest.raises(ValueError, match=r"base_per_example has shape \[5\]"):
        ScanResult(per, ("layer", "head"), base_per_example=torch.zeros(5))


def test_head_set_labels_must_be_integers():
    with pytest.raises(ValueError, match=r"labels\[0\] must be a sequence of \(layer, head\) int pairs"):
        ScanResult(torch.zeros(1, 3), ("head_set",), labels=[[(0.5, 1)]])
    r = ScanResult(torch.zeros(1, 3), ("head_set",), labels=[[(np.int64(1), torch.tensor(2))]])
    assert r.labels == [((1, 2),)]


# ----------------------------------------------------------------- issue #12.6: error bars of the pair scan


def _bar_errors(ax):
    """(bar heights, half lengths of the drawn error bars), read off the figure's artists."""
    from matplotlib.container import BarContainer

    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    heights = np.array([p.get_height() for p in bars.patches])
    _, _, (segments,) = bars.errorbar.lines
    halves = np.array([(seg[1][1] - seg[0][1]) / 2 for seg in segments.get_segments()])
    centres = np.array([(seg[1][1] + seg[0][1]) / 2 for seg in segments.get_segments()])
    np.testing.assert_allclose(centres, heights, rtol=1e-6, atol=1e-9)  # each bar's error bar sits on it
    return heights, halves


def _paired_pair_scan():
    """Head sets whose effect is precise (paired) although the values spread widely over examples."""
    g = torch.Generator().manual_seed(5)
    base = 3.0 * torch.randn(40, generator=g, dtype=torch.float64)
    shift = torch.tensor([-1.0, -0.2, 0.0], dtype=torch.float64)[:, None]
    per = base + shift + 0.01 * torch.randn(3, 40, generator=g, dtype=torch.float64)
    return ScanResult(per, ("head_set",), labels=[[(0, 0), (0, 1)], [(1, 2)], []], metric_name="logit_diff",
                      clean_baseline=float(base.mean()), base_per_example=base)


def test_bar_chart_draws_the_effect_with_the_effect_stderr():
    r = _paired_pair_scan()
    assert (r.stderr > 50 * r.effect_stderr).all()  # the two standard errors differ by far
    heights, halves = _bar_errors(r.heatmap().axes[0])
    np.testing.assert_allclose(heights, r.effect.numpy(), rtol=1e-6)
    np.testing.assert_allclose(halves, r.effect_stderr.numpy(), rtol=1e-6)


def test_bar_chart_draws_the_value_with_the_value_stderr():
    r = _paired_pair_scan()
    heights, halves = _bar_errors(r.heatmap(value="value").axes[0])
    np.testing.assert_allclose(heights, r.values.numpy(), rtol=1e-6)
    np.testing.assert_allclose(halves, r.stderr.numpy(), rtol=1e-6)


def test_bar_chart_nan_bar_is_grey_without_error_bar(recwarn):
    per = torch.tensor([[1.0, 2.0, 4.0], [float("nan")] * 3])
    r = ScanResult(per, ("head_set",), labels=[[(0, 0)], [(0, 1)]], clean_baseline=0.0, base_per_example=torch.zeros(3))
    ax = r.heatmap().axes[0]
    heights, halves = _bar_errors(ax)
    np.testing.assert_allclose(heights, [7 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(halves, [float(r.effect_stderr[0]), 0.0], rtol=1e-6)
    assert ax.patches[1].get_facecolor()[:3] == pytest.approx((0.5, 0.5, 0.5), abs=0.01)


# ----------------------------------------------------------------- issue #12.9: non-finite metric values

from headint.results import NaNMetricWarning  # noqa: E402


def _with_holes():
    """[L, H, N] values, NaN at (0, 1, example 2) and (2, 3, examples 2 and 5), +inf at (1, 0, example 6)."""
    x = per_example((L, H, N), seed=7, dtype=torch.float64)
    x[0, 1, 2] = float("nan")
    x[2, 3, 2] = x[2, 3, 5] = float("nan")
    x[1, 0, 6] = float("inf")
    return x


def test_non_finite_values_warn_with_count_cells_and_examples():
    with pytest.warns(NaNMetricWarning) as record:
        ScanResult(_with_holes(), metric_name="logit_diff", clean_baseline=0.0)
    assert len(record) == 1
    text = str(record[0].message)
    assert "'logit_diff'" in text and "4 per-example values" in text and "3 of 12 cells" in text
    assert "L0H1" in text and "L1H0" in text and "L2H3" in text
    assert f"examples [2, 5, 6] of {N}" in text


def test_aggregates_use_the_finite_examples_and_count_them():
    x = _with_holes()
    with pytest.warns(NaNMetricWarning):
        r = ScanResult(x, metric_name="logit_diff", clean_baseline=0.5)
    finite = np.isfinite(x.numpy())
    n = finite.sum(-1)
    assert torch.equal(r.n, torch.as_tensor(n))
    assert (n[0, 1], n[1, 0], n[2, 3], n[0, 0]) == (N - 1, N - 1, N - 2, N)
    for cell in [(0, 1), (1, 0), (2, 3), (1, 1)]:
        v = x[cell].numpy()[finite[cell]]
        assert float(r.values[cell]) == pytest.approx(v.mean(), rel=1e-12)
        assert float(r.stderr[cell]) == pytest.approx(v.std(ddof=1) / np.sqrt(len(v)), rel=1e-12)
        assert float(r.effect[cell]) == pytest.approx(v.mean() - 0.5, rel=1e-12)
    assert torch.isfinite(r.values).all() and torch.isfinite(r.stderr).all()
    frame = r.to_frame()
    np.testing.assert_array_equal(frame["n"].to_numpy(), n.reshape(-1))
    assert np.isfinite(frame["value"]).all()
    assert r.top(1)["effect"].notna().all()


def test_paired_stderr_skips_examples_where_the_base_is_not_finite():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, generator=g, dtype=torch.float64)
    per = base + 0.1 * torch.randn(2, 2, 8, generator=g, dtype=torch.float64)
    per[0, 0, 3] = float("nan")
    base[5] = float("nan")
    with pytest.warns(NaNMetricWarning, match=r"base_per_example\) is NaN or infinite at examples \[5\]"):
        r = ScanResult(per, clean_baseline=0.0, base_per_example=base)
    d = (per - base).numpy()
    for cell in [(0, 0), (1, 1)]:
        v = d[cell][np.isfinite(d[cell])]
        assert len(v) == (6 if cell == (0, 0) else 7)
        assert float(r.effect_stderr[cell]) == pytest.approx(v.std(ddof=1) / np.sqrt(len(v)), rel=1e-12)


def test_cells_with_one_or_no_finite_example():
    x = torch.tensor([[[1.0, float("nan")], [float("nan"), float("nan")]]])  # [1, 2, 2]
    with pytest.warns(NaNMetricWarning, match=r"1 per-example value in 1 of 2 cells \(L0H0\), at examples \[1\] of 2"):
        r = ScanResult(x)  # the all-NaN cell is "not scanned", the other one has one value
    assert r.n.tolist() == [[1, 0]]
    assert r.values[0, 0] == 1.0 and torch.isnan(r.values[0, 1])
    assert r.stderr[0, 0] == 0.0 and torch.isnan(r.stderr[0, 1])


def test_unscanned_cells_do_not_warn_but_a_grid_without_values_does():
    x = per_example((L, H, N))
    x[1:] = float("nan")  # a scan restricted to layer 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaNMetricWarning)
        r = ScanResult(x)
    assert (r.n[0] == N).all() and (r.n[1:] == 0).all()
    with pytest.warns(NaNMetricWarning, match="no finite value at all"):
        ScanResult(torch.full((2, 2, 3), float("nan")))


def test_non_finite_baseline_warns():
    with pytest.warns(NaNMetricWarning, match="clean_baseline is nan"):
        ScanResult(per_example((2, 2, 3)), clean_baseline=float("nan"))


def test_all_finite_aggregates_are_unchanged_bit_for_bit(grid_result):
    x = grid_result.per_example.double()
    assert torch.equal(grid_result.values, x.mean(-1).float())
    assert torch.equal(grid_result.stderr, (x.std(-1, correction=1) / np.sqrt(N)).float())
    base = per_example((N,), seed=9)
    paired = grid_result._replace(base_per_example=base)
    d = (paired.per_example - base).double()
    assert torch.equal(paired.effect_stderr, (d.std(-1, correction=1) / np.sqrt(N)).float())
    assert torch.equal(paired.effect, (x.mean(-1) - 2.5).float())


def test_derived_results_do_not_warn_again():
    with pytest.warns(NaNMetricWarning):
        r = ScanResult(_with_holes(), clean_baseline=1.0, corrupt_baseline=-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NaNMetricWarning)
        nr = r.normalized_result()
    assert torch.equal(nr.n, r.n)
    torch.testing.assert_close(nr.values, (r.values + 1.0) / 2.0)


def test_scan_with_a_metric_that_fails_on_some_examples(gpt2):
    """End to end: a real scan whose metric is NaN on one example keeps the other examples' numbers."""
    import headint
    from headint.metrics import CallableMetric

    model = gpt2
    ids = torch.randint(0, model.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = torch.arange(4)  # the first token tells the examples apart; example 1 fails

    def last_logit(logits, batch):
        v = logits[:, -1, 0].double()
        return torch.where(batch["input_ids"][:, 0] == 1, torch.full_like(v, float("nan")), v)

    with pytest.warns(NaNMetricWarning, match=r"examples \[1\] of 4"):
        r = headint.scan(model, {"input_ids": ids}, CallableMetric(last_logit, name="last_logit"), method="zero",
                         progress=False, backend="reference")
    assert (r.n == 3).all()
    assert torch.isfinite(r.values).all() and torch.isfinite(r.stderr).all()
    keep = [0, 2, 3]
    torch.testing.assert_close(r.values, r.per_example[..., keep].mean(-1))


# ----------------------------------------------------------------- issue #12.5: files that belong together


def _strict_json(path):
    """Parse as standard JSON: bare NaN / Infinity are refused."""
    def refuse(name):
        raise AssertionError(f"{path} holds the non-standard JSON constant {name}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_renamed_result_loads_its_own_numbers(grid_result, set_result, tmp_path):
    grid_result.save(tmp_path / "run1")
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"run1{suffix}").rename(tmp_path / f"run2{suffix}")
    other = ScanResult(grid_result.per_example + 100.0, metric_name="other")
    other.save(tmp_path / "run1")
    _assert_same(ScanResult.load(tmp_path / "run2"), grid_result)
    _assert_same(ScanResult.load(tmp_path / "run1"), other)


def test_tensor_file_of_another_result_is_refused(grid_result, tmp_path):
    grid_result.save(tmp_path / "a")
    ScanResult(grid_result.per_example * 2.0).save(tmp_path / "b")  # same shapes, other numbers
    (tmp_path / "b.safetensors").replace(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"a\.safetensors does not hold the tensors .*a\.json was saved with"):
        ScanResult.load(tmp_path / "a")
    (tmp_path / "b.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.json.*its tensor file .*a\.safetensors does not exist"):
        (tmp_path / "a.safetensors").unlink()
        ScanResult.load(tmp_path / "a")


def test_sidecar_never_points_out_of_its_folder(grid_result, tmp_path):
    outside = tmp_path / "outside"
    ScanResult(grid_result.per_example * 3.0).save(outside / "x")
    inside = tmp_path / "results"
    grid_result.save(inside / "r")
    meta = json.loads((inside / "r.json").read_text())
    for target in ["../outside/x.safetensors", "../../../../etc/passwd", str(outside / "x.safetensors"), "..", ""]:
        meta["tensor_file"] = target
        (inside / "r.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="'tensor_file' must be a plain file name beside the sidecar"):
            ScanResult.load(inside / "r")


def test_saved_json_is_standard_and_non_finite_floats_round_trip(tmp_path):
    x = per_example((2, 2, 3), dtype=torch.float64)
    settings = {"base_baseline": float("nan"), "range": [float("-inf"), 1.0, float("inf")], "none": None}
    with pytest.warns(NaNMetricWarning):
        r = ScanResult(x, clean_baseline=float("nan"), corrupt_baseline=None, settings=settings)
    r.save(tmp_path / "s")
    meta = _strict_json(tmp_path / "s.json")
    assert meta["clean_baseline"] is None and meta["settings"]["base_baseline"] is None
    with pytest.warns(NaNMetricWarning):
        back = ScanResult.load(tmp_path / "s")
    assert math.isnan(back.clean_baseline) and back.corrupt_baseline is None
    assert math.isnan(back.settings["base_baseline"]) and back.settings["none"] is None
    assert back.settings["range"] == [float("-inf"), 1.0, float("inf")]
    assert torch.equal(back.per_example, x)


def test_per_example_nan_round_trips(tmp_path):
    x = _with_holes()
    with pytest.warns(NaNMetricWarning):
        r = ScanResult(x, metric_name="m")
    r.save(tmp_path / "h")
    _strict_json(tmp_path / "h.json")
    with pytest.warns(NaNMetricWarning):
        back = ScanResult.load(tmp_path / "h")
    assert torch.equal(back.per_example.isnan(), x.isnan()) and torch.equal(back.n, r.n)


def _write_version_1(result, stem: Path, tensor_name: str | None = None):
    """The files the previous format (version 1) wrote: bare NaN allowed, no hash, a tensor_file name."""
    from safetensors.torch import save_file

    save_file({"per_example": result.per_example.contiguous()}, str(stem) + ".safetensors")
    meta = {
        "format": "headint.ScanResult", "version": 1, "tensor_file": tensor_name or stem.name + ".safetensors",
        "axes": list(result.axes), "labels": None if result.labels is None else [[list(p) for p in s] for s in result.labels],
        "metric_name": result.metric_name, "clean_baseline": result.clean_baseline,
        "corrupt_baseline": result.corrupt_baseline, "settings": result.settings, "normalized": result.normalized,
        "grid_shape": list(result.grid_shape), "n_examples": result.n_examples,
    }
    Path(str(stem) + ".json").write_text(json.dumps(meta, indent=2))


def test_version_1_files_load_or_fail_clearly(set_result, tmp_path):
    old = set_result._replace(settings={"base_baseline": float("nan")})
    _write_version_1(old, tmp_path / "old")
    assert "NaN" in (tmp_path / "old.json").read_text()  # the old writer's bare NaN
    back = ScanResult.load(tmp_path / "old")
    assert torch.equal(back.per_example, old.per_example) and back.labels == old.labels
    assert math.isnan(back.settings["base_baseline"])
    # a renamed version-1 pair cannot be told from a mismatched one (no hash): refused, with the way out
    _write_version_1(old, tmp_path / "renamed", tensor_name="old.safetensors")
    with pytest.raises(ValueError, match=r"renamed\.json: the sidecar names tensor file 'old\.safetensors'.*no content hash"):
        ScanResult.load(tmp_path / "renamed")


@pytest.mark.parametrize("field", ["metric_name", "axes", "normalized", "tensor_sha256", "settings"])
def test_missing_sidecar_field_names_file_and_field(grid_result, tmp_path, field):
    grid_result.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r.json").read_text())
    del meta[field]
    (tmp_path / "r.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"r\.json: missing field '{field}'"):
        ScanResult.load(tmp_path / "r")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "something"}, "is not a saved ScanResult"),
        ({"version": 3}, "unknown ScanResult format version 3"),
        ({"normalized": "yes"}, "'normalized' must be true or false"),
        ({"axes": ["head", "layer"]}, "axes must be one of"),
        ({"metric_name": 7}, "metric_name must be a str"),
        ({"clean_baseline": "high"}, "clean_baseline must be a number"),
        ({"grid_shape": [4, 3]}, r"per_example has shape \[3, 4, 7\].*records grid_shape \+ \[n_examples\] = \[4, 3, 7\]"),
        ({"non_finite": [{"path": ["metric_name"], "value": "NaN"}]}, "not a null in the sidecar"),
        ({"non_finite": [{"path": ["clean_baseline"], "value": "nan"}]}, "entries of 'non_finite' must be"),
    ],
)
def test_malformed_sidecar_names_the_file(grid_result, tmp_path, change, message):
    grid_result.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r.json").read_text())
    meta.update(change)
    (tmp_path / "r.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message) as info:
        ScanResult.load(tmp_path / "r")
    assert "r.json" in str(info.value)


def test_sidecar_that_is_not_json(tmp_path):
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"r\.json is not a saved ScanResult: it is not valid JSON"):
        ScanResult.load(tmp_path / "r")


def test_warning_category_is_exported():
    import headint

    assert headint.NaNMetricWarning is NaNMetricWarning and issubclass(NaNMetricWarning, UserWarning)
