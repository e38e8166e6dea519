"""``KnockoutResult``: an attention-knockout scan (:func:`headint.knockout_scan`) as tables and heatmaps."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .plots import literal
from .stats import finite_count, finite_mean, finite_stderr, paired_stderr

__all__ = ["KnockoutResult"]


@dataclass
class KnockoutResult:
    """Per-example metric values of a knockout scan.

    ``per_example`` ``[W, S, N]`` (``per_head``: ``[W, H, S, N]``): the metric with the edges
    from the target position to source set ``s`` blocked in layers ``w .. w + window - 1``
    (in every head, or only in head ``h``), for example ``n``. ``sources``: the label of each
    source set (an absolute position for ``sources="each"``, else the set's name).
    ``base_per_example`` ``[N]``: the metric without knockouts. ``window``: layers per window.
    """

    per_example: torch.Tensor
    sources: list
    window: int
    per_head: bool
    base_per_example: torch.Tensor
    metric_name: str
    settings: dict = field(default_factory=dict)

    @property
    def values(self) -> torch.Tensor:
        """Mean over the (finite) examples: ``[W, S]`` or ``[W, H, S]``."""
        return finite_mean(self.per_example)

    @property
    def stderr(self) -> torch.Tensor:
        return finite_stderr(self.per_example)

    @property
    def baseline(self) -> float:
        """The metric's mean without knockouts."""
        return float(finite_mean(self.base_per_example[None])[0])

    @property
    def effect(self) -> torch.Tensor:
        """Change from the unknocked run, per example then averaged: ``values - baseline``."""
        return finite_mean(self.per_example - self.base_per_example.to(self.per_example.dtype))

    @property
    def effect_stderr(self) -> torch.Tensor:
        return paired_stderr(self.per_example, self.base_per_example.to(self.per_example.dtype))

    def to_frame(self):
        """A pandas table, one row per cell: ``layer`` (first layer of the window), ``layers``
        (``"a-b"``), ``head`` (per-head scans), ``source``, ``value``, ``stderr``, ``effect``,
        ``effect_stderr``, ``n``."""
        import pandas as pd

        vals, se, eff, eff_se, n = self.values, self.stderr, self.effect, self.effect_stderr, finite_count(self.per_example)
        rows = []
        for index in torch.cartesian_prod(*[torch.arange(s) for s in vals.shape]).reshape(-1, vals.dim()).tolist():
            w, s = index[0], index[-1]
            row = dict(layer=w, layers=f"{w}-{w + self.window - 1}")
            if self.per_head:
                row["head"] = index[1]
            idx = tuple(index)
            row.update(source=self.sources[s], value=float(vals[idx]), stderr=float(se[idx]), effect=float(eff[idx]),
                       effect_stderr=float(eff_se[idx]), n=int(n[idx]))
            rows.append(row)
        return pd.DataFrame(rows)

    def heatmap(self, path: str | os.PathLike | None = None, *, value: str = "effect", title: str | None = None):
        """Window start (rows; per head: layer and head) x source (columns) image of the effect
        (or ``value="value"``); returns a ``matplotlib.figure.Figure`` (PNG saved to ``path``)."""
        from matplotlib.figure import Figure

        if value not in ("effect", "value"):
            raise ValueError(f"value must be 'effect' or 'value', got {value!r}")
        data = (self.effect if value == "effect" else self.values).double().numpy()
        W, S = data.shape[0], data.shape[-1]
        if self.per_head:
            H = data.shape[1]
            data = data.reshape(W * H, S)
            ylabels = [f"L{w}H{h}" for w in range(W) for h in range(H)]
        else:
            ylabels = [f"L{w}-{w + self.window - 1}" if self.window > 1 else f"L{w}" for w in range(W)]
        fig = Figure(figsize=(min(16.0, max(5.0, 0.3 * S + 3.0)), min(16.0, max(3.0, 0.3 * len(ylabels) + 1.5))))
        ax = fig.add_subplot(1, 1, 1)
        finite = data[torch.isfinite(torch.from_numpy(data)).numpy()]
        lim = float(abs(finite).max()) if finite.size else 1.0
        lim = lim if lim > 0 else 1.0
        cmap, vmin = ("RdBu", -lim) if value == "effect" else ("viridis", None)
        im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=lim if value == "effect" else None, aspect="auto", interpolation="nearest")
        step = max(1, -(-S // 32))
        ax.set_xticks(range(0, S, step))
        ax.set_xticklabels([literal(s) for s in self.sources[::step]], rotation=90 if S > 8 else 0, fontsize=7)
        if len(ylabels) <= 64:
            ax.set_yticks(range(len(ylabels)))
            ax.set_yticklabels(ylabels, fontsize=7)
        ax.set_xlabel("source")
        ax.set_ylabel("layers knocked out" + (" (per head)" if self.per_head else ""))
        fig.colorbar(im, ax=ax, label=literal(f"{self.metric_name} ({value})"))
        ax.set_title(literal(title or f"attention knockout, window {self.window}"))
        fig.tight_layout()
        if path is not None:
            fig.savefig(Path(path), format="png", dpi=100)
        return fig

    def __repr__(self) -> str:
        return (f"KnockoutResult(grid={list(self.per_example.shape[:-1])}, window={self.window}, per_head={self.per_head}, "
                f"metric={self.metric_name!r}, N={self.per_example.shape[-1]})")
