"""Plots of a :class:`~headint.results.ScanResult`: heatmaps and bar charts.

matplotlib is imported here only, inside the functions, and only its object-oriented API
(``matplotlib.figure.Figure``): pyplot is never imported, so plotting selects no global backend
and opens no window.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .grid import head_set_name

__all__ = ["heatmap"]


def heatmap(result, path: str | os.PathLike | None = None, *, title: str | None = None, value: str = "effect"):
    """Plot ``result``; returns a ``matplotlib.figure.Figure`` (PNG saved to ``path`` if given).

    value: ``"effect"`` (values minus the clean baseline; falls back to ``"value"`` without
    one) or ``"value"``. ``("layer", "head")``: a layer x head image; ``("layer", "head",
    "position")``: a (layer*head) x position image; ``("head_set",)``: a bar chart whose error
    bars are the standard error of what the bars show (``effect_stderr`` for the effect,
    ``stderr`` for the value). Images use a diverging colour map centred at zero and a colour
    bar labelled with the metric name. NaN cells are blank (images) or grey zero-height bars.
    """
    from matplotlib.figure import Figure

    if value not in ("effect", "value"):
        raise ValueError(f"value must be 'effect' or 'value', got {value!r}")
    if value == "effect" and not result.has_baseline:
        value = "value"
    if value == "effect":
        data, err = result.effect.double().numpy(), result.effect_stderr.double().numpy()
    else:
        data, err = result.values.double().numpy(), result.stderr.double().numpy()
    label = f"{result.metric_name} ({value}{', normalized' if result.normalized else ''})"
    if title is None:
        method = result.settings.get("method")
        per = {"head_set": "head set", "position": "head and position"}.get(result.axes[-1], "head")
        title = f"{result.metric_name} {value} per {per}"
        if method:
            title += f" ({method})"

    if result.axes == ("head_set",):
        fig = _bars(Figure, data, err, [head_set_name(s) for s in result.labels], label)
    elif result.axes == ("layer", "head"):
        fig = _layer_head_image(Figure, data, label)
    else:
        fig = _position_image(Figure, data, label)
    fig.axes[0].set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(Path(path), format="png", dpi=100)
    return fig


def _symmetric_limit(data: np.ndarray) -> float:
    finite = data[np.isfinite(data)]
    lim = float(np.abs(finite).max()) if finite.size else 0.0
    return lim if lim > 0 else 1.0


def _integer_ticks(axis, n: int, max_labels: int = 32) -> None:
    step = max(1, math.ceil(n / max_labels))
    axis.set_ticks(np.arange(0, n, step))
    axis.set_ticklabels([str(i) for i in range(0, n, step)])


def _layer_head_image(Figure, data: np.ndarray, label: str):
    """``data`` ``[L, H]`` as an image, layers down, heads across."""
    L, H = data.shape
    fig = Figure(figsize=(min(16.0, max(4.5, 0.4 * H + 2.5)), min(14.0, max(3.5, 0.35 * L + 1.5))))
    ax = fig.add_subplot(1, 1, 1)
    lim = _symmetric_limit(data)
    im = ax.imshow(data, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    _integer_ticks(ax.xaxis, H)
    _integer_ticks(ax.yaxis, L)
    fig.colorbar(im, ax=ax, label=label)
    return fig


def _position_image(Figure, data: np.ndarray, label: str):
    """``data`` ``[L, H, P]`` as an image of ``L*H`` rows (layer-major) by ``P`` positions."""
    L, H, P = data.shape
    rows = data.reshape(L * H, P)
    fig = Figure(figsize=(min(16.0, max(5.0, 0.4 * P + 3.0)), min(20.0, max(4.0, 0.18 * L * H + 1.5))))
    ax = fig.add_subplot(1, 1, 1)
    lim = _symmetric_limit(rows)
    im = ax.imshow(rows, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xlabel("position")
    ax.set_ylabel("layer, head")
    _integer_ticks(ax.xaxis, P)
    if L * H <= 64:
        ax.set_yticks(np.arange(L * H))
        ax.set_yticklabels([f"L{layer}H{head}" for layer in range(L) for head in range(H)], fontsize=7)
    else:
        step = max(1, math.ceil(L / 32))
        ax.set_yticks(np.arange(0, L, step) * H)
        ax.set_yticklabels([f"L{layer}" for layer in range(0, L, step)])
    for layer in range(1, L):
        ax.axhline(layer * H - 0.5, color="black", linewidth=0.5)
    fig.colorbar(im, ax=ax, label=label)
    return fig


def _bars(Figure, data: np.ndarray, err: np.ndarray, names: list[str], label: str):
    """One bar per head set: heights ``data`` ``[S]``, error bars ``err`` ``[S]`` (the standard
    error of ``data``; a non-finite bar is grey, of height 0, without error bar)."""
    from matplotlib import colormaps

    S = data.shape[0]
    fig = Figure(figsize=(min(16.0, max(4.5, 0.5 * S + 2.0)), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    lim = _symmetric_limit(data)
    cmap = colormaps["RdBu"]
    colours = [cmap(0.5 + 0.5 * float(np.clip(v / lim, -1, 1))) if np.isfinite(v) else "grey" for v in data]
    x = np.arange(S)
    finite = np.isfinite(data)
    yerr = np.where(finite & np.isfinite(err), err, 0.0)
    ax.bar(x, np.where(finite, data, 0.0), yerr=yerr, color=colours, edgecolor="black", linewidth=0.5, capsize=3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45 if S > 4 else 0, ha="right" if S > 4 else "center", fontsize=8)
    ax.set_xlabel("head set")
    ax.set_ylabel(label)
    return fig
