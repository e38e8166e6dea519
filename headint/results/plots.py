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

__all__ = ["heatmap", "describe", "pattern_image", "literal"]


def literal(text: str) -> str:
    """``text`` as matplotlib shows it literally: every ``$`` escaped, so a token, a metric or a
    folder name such as ``"$x^$"`` is never parsed as mathtext (which would draw it as math or
    fail with a parser error). Every string from user data goes through here before a plot."""
    return str(text).replace("$", r"\$")


def describe(result, value: str = "effect") -> str:
    """One line naming what a plot of ``result`` shows: method, direction (where it applies),
    kind (exact / attribution), N, whether the values are normalized and, for a plot of the
    effect (``value``), which run it is measured from, e.g. ``"method patch, direction
    denoising, N=64, effect from the corrupt run"``."""
    s = result.settings
    parts = []
    if s.kind == "attribution":
        parts.append("attribution estimate")
    if s.method:
        parts.append(f"method {s.method}")
    if s.direction:
        parts.append(f"direction {s.direction}")
    parts.append(f"N={result.n_examples}")
    if result.normalized:
        parts.append("normalized: 0 = corrupt, 1 = clean")
    if value == "effect" and result.has_baseline:
        parts.append(f"effect from the {result.reference} run")
    return ", ".join(parts)


def _visible(token: str) -> str:
    """A tick label for ``token``: spaces shown as ``␣``, newlines and tabs escaped."""
    return literal(token.replace(" ", "\u2423").replace("\n", "\\n").replace("\t", "\\t"))


def _check_tokens(tokens, P: int) -> list[str]:
    if isinstance(tokens, str) or not hasattr(tokens, "__len__"):
        raise TypeError(f"tokens must be a sequence of {P} strings (one per position), got {type(tokens).__name__}")
    tokens = [str(t) for t in tokens]
    if len(tokens) != P:
        raise ValueError(f"tokens has {len(tokens)} entries; expected {P}, one per position of the scan")
    return tokens


def heatmap(result, path: str | os.PathLike | None = None, *, title: str | None = None, value: str = "effect",
            tokens=None, singles=None):
    """Plot ``result``; returns a ``matplotlib.figure.Figure`` (PNG saved to ``path`` if given).

    value: ``"effect"`` (values minus the base run's baseline, :attr:`ScanResult.effect`: the
    corrupt one for denoising, else the clean one; falls back to ``"value"`` without it) or
    ``"value"``. ``("layer", "head")``: a layer x head image; ``("layer", "head",
    "position")``: a (layer*head) x position image; ``("head_set",)``: a bar chart whose error
    bars are the standard error of what the bars show (``effect_stderr`` for the effect,
    ``stderr`` for the value). Images use a diverging colour map centred at zero and a colour
    bar labelled with the metric name. NaN cells are blank (images) or grey zero-height bars.

    The title always ends with :func:`describe` (method, direction, N, the run effects are
    measured from), below ``title`` if given.
    tokens: for position scans only, ``P`` strings labelling the position axis (e.g.
    :func:`headint.to_str_tokens` of the prompt). singles: for head-set scans of effects only,
    the single-head scan (``("layer", "head")``, same examples) whose effects summed over each
    set's heads are drawn beside each set's joint effect (see :func:`headint.results.pairs.pair_frame`).
    """
    from matplotlib.figure import Figure

    if value not in ("effect", "value"):
        raise ValueError(f"value must be 'effect' or 'value', got {value!r}")
    if value == "effect" and not result.has_baseline:
        value = "value"
    if tokens is not None:
        if result.axes != ("layer", "head", "position"):
            raise ValueError(f"tokens label the position axis, but this result has axes {result.axes}; pass tokens only "
                             "for a per-position scan")
        tokens = _check_tokens(tokens, result.grid_shape[-1])
    if singles is not None:
        if result.axes != ("head_set",):
            raise ValueError(f"singles= is for head-set scans, but this result has axes {result.axes}")
        if value != "effect":
            raise ValueError("singles= compares effects; it needs value='effect' and a result with a clean baseline")
    if value == "effect":
        data, err = result.effect.double().numpy(), result.effect_stderr.double().numpy()
    else:
        data, err = result.values.double().numpy(), result.stderr.double().numpy()
    what = f"effect: value - {result.reference}" if value == "effect" else "value"
    label = literal(f"{result.metric_name} ({what}{', normalized' if result.normalized else ''})")
    if title is None:
        per = {"head_set": "head set", "position": "head and position"}.get(result.axes[-1], "head")
        title = f"{result.metric_name} {value} per {per}"
    title = literal(f"{title}\n{describe(result, value)}")

    if result.axes == ("head_set",):
        names = [head_set_name(s) for s in result.labels]
        if singles is None:
            fig = _bars(Figure, data, err, names, label)
        else:
            from .pairs import pair_frame

            frame = pair_frame(result, singles)
            fig = _pair_bars(Figure, frame, label)
    elif result.axes == ("layer", "head"):
        fig = _layer_head_image(Figure, data, label)
    else:
        fig = _position_image(Figure, data, label, tokens)
    fig.axes[0].set_title(title, fontsize=10, wrap=True)  # wrapped to the figure: a long title is never clipped
    fig.tight_layout()
    if path is not None:
        fig.savefig(Path(path), format="png", dpi=100)
    return fig


def pattern_image(pattern, tokens=None, *, title: str = "", path: str | os.PathLike | None = None):
    """One head's attention probabilities ``pattern`` ``[Tq, Tk]`` (queries down, keys across) as
    an image with values in [0, 1]; ``tokens`` (``Tk`` strings, the last ``Tq`` of them label
    the queries) label both axes. Returns a Figure (PNG saved to ``path`` if given)."""
    from matplotlib.figure import Figure

    data = np.asarray(pattern, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"pattern must be [Tq, Tk], got shape {list(data.shape)}")
    Tq, Tk = data.shape
    if tokens is not None:
        tokens = _check_tokens(tokens, Tk)
    side = min(8.0, max(3.0, 0.28 * Tk + 1.5))
    fig = Figure(figsize=(side + 0.8, side))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if tokens is not None and Tk <= 48:
        ax.set_xticks(np.arange(Tk))
        ax.set_xticklabels([_visible(t) for t in tokens], rotation=90, fontsize=7)
        ax.set_yticks(np.arange(Tq))
        ax.set_yticklabels([_visible(t) for t in tokens[Tk - Tq:]], fontsize=7)
    else:
        _integer_ticks(ax.xaxis, Tk)
        _integer_ticks(ax.yaxis, Tq)
    fig.colorbar(im, ax=ax, label="attention probability")
    ax.set_title(literal(title), fontsize=10)
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


def _position_image(Figure, data: np.ndarray, label: str, tokens: list[str] | None = None):
    """``data`` ``[L, H, P]`` as an image of ``L*H`` rows (layer-major) by ``P`` positions,
    the position axis labelled ``"p: token"`` (``tokens``: ``P`` strings; spaces shown as ``␣``)."""
    L, H, P = data.shape
    rows = data.reshape(L * H, P)
    fig = Figure(figsize=(min(16.0, max(5.0, 0.4 * P + 3.0)), min(20.0, max(4.0, 0.18 * L * H + 1.5))))
    ax = fig.add_subplot(1, 1, 1)
    lim = _symmetric_limit(rows)
    im = ax.imshow(rows, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_ylabel("layer, head")
    if tokens is not None and P <= 64:
        ax.set_xlabel("position (token)")
        ax.set_xticks(np.arange(P))
        ax.set_xticklabels([f"{p}: {_visible(t)}" for p, t in enumerate(tokens)], rotation=90, fontsize=7)
    else:
        ax.set_xlabel("position")
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


def _pair_bars(Figure, frame, label: str):
    """Per head set, two bars side by side: its joint effect and the sum of its heads' single
    effects, each with its standard error (``frame``: :func:`headint.results.pairs.pair_frame`)."""
    S = len(frame)
    fig = Figure(figsize=(min(18.0, max(5.0, 0.6 * S + 2.5)), 4.8))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(S)
    w = 0.4
    for offset, col, name, colour in ((-w / 2, "effect", "together (joint effect)", "#b2182b"),
                                      (w / 2, "singles_sum", "single effects summed", "#8c8c8c")):
        y = frame[col].to_numpy(dtype=np.float64)
        e = frame[col + "_stderr"].to_numpy(dtype=np.float64)
        finite = np.isfinite(y)
        ax.bar(x + offset, np.where(finite, y, 0.0), width=w, yerr=np.where(finite & np.isfinite(e), e, 0.0),
               color=colour, edgecolor="black", linewidth=0.5, capsize=2, label=name)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(list(frame["head_set"]), rotation=45 if S > 4 else 0, ha="right" if S > 4 else "center", fontsize=8)
    ax.set_xlabel("head set")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
    return fig
