"""Tests for headint.results.ScanResult: statistics, tables, plots and persistence."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
        settings={"method": "mean_ablation", "model": "tiny"},
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
    assert nr.settings["method"] == "mean_ablation"
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
    assert list(df.columns) == ["layer", "head", "value", "stderr"]
    assert len(df) == L * H
    assert df["layer"].tolist() == [l for l in range(L) for _ in range(H)]
    assert df["head"].tolist() == list(range(H)) * L
    row = df[(df['layer'] == 2) & (df['head'] == 1)].iloc[0]
    assert row["value"] == pytest.approx(float(grid_result.values[2, 1]), rel=1e-6)
    assert row["stderr"] == pytest.approx(float(grid_result.stderr[2, 1]), rel=1e-6)


def test_to_frame_position(position_result):
    df = position_result.to_frame()
    assert list(df.columns) == ["layer", "head", "position", "value", "stderr"]
    assert len(df) == L * H * P
    row = df[(df['layer'] == 1) & (df['head'] == 3) & (df['position'] == 4)].iloc[0]
    assert row["value"] == pytest.approx(float(position_result.values[1, 3, 4]), rel=1e-6)


def test_to_frame_head_sets(set_result):
    df = set_result.to_frame()
    assert list(df.columns) == ["head_set", "value", "stderr"]
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
    assert list(top.columns) == ["layer", "head", "value", "stderr", "effect"]
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
    assert list(top.columns) == ["head_set", "value", "stderr", "effect"]
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
    assert ax.get_title() == "my scan"
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
    assert "n_examples=7" in text and "mean_ablation" in text
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
    assert list(frame.columns) == ["layer", "head", "value", "stderr", "effect", "effect_stderr"]
    r.save(tmp_path / "s")
    back = ScanResult.load(tmp_path / "s")
    assert torch.equal(back.base_per_example, r.base_per_example)
    n = ScanResult(per, ("layer", "head"), clean_baseline=0.5, corrupt_baseline=-0.5, base_per_example=base).normalized_result()
    torch.testing.assert_close(n.base_per_example, base + 0.5)
    with pytest.raises(ValueError, match=r"base_per_example has shape \[5\]"):
        ScanResult(per, ("layer", "head"), base_per_example=torch.zeros(5))
