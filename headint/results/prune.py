"""``PruneCurve``: a metric as heads are removed one at a time (:func:`headint.prune_curve`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .grid import head_set_name
from .plots import literal
from .stats import finite_count, finite_mean, finite_stderr

__all__ = ["PruneCurve"]


@dataclass
class PruneCurve:
    """The metric after each removal.

    ``removed``: the heads in the order they were removed (``(layer, head)``; step ``s`` has
    removed ``removed[:s]``). ``per_example`` ``[S + 1, N]``: the metric per example at step
    ``0 .. S`` (step 0: nothing removed). ``scores``: per step ``1 .. S`` what chose the head
    (gradient importance ``mean |d metric / d mask|`` for ``order="importance"``, the metric
    after removal for ``"exact"``, the gate parameter for a gates result; None for a given
    list). ``n_heads``: heads in the model. ``maximize``: the metric's direction.
    """

    removed: list
    per_example: torch.Tensor
    scores: list
    n_heads: int
    metric_name: str
    maximize: bool | None
    order: str
    settings: dict = field(default_factory=dict)

    @property
    def metric(self) -> torch.Tensor:
        """``[S + 1]``: the metric's mean over the examples (finite ones) at each step."""
        return finite_mean(self.per_example)

    @property
    def n(self) -> torch.Tensor:
        """``[S + 1]``: how many examples are finite at each step (what :attr:`metric` rests on)."""
        return finite_count(self.per_example)

    @property
    def stderr(self) -> torch.Tensor:
        """``[S + 1]``: standard error of :attr:`metric` over the finite examples."""
        return finite_stderr(self.per_example)

    def to_frame(self):
        """A pandas table, one row per step: ``step, layer, head, removed, fraction_removed,
        metric, stderr, n, score`` (step 0 has no removed head; ``n``: finite examples)."""
        import pandas as pd

        metric, stderr, n = self.metric, self.stderr, self.n
        rows = []
        for s in range(len(self.removed) + 1):
            head = self.removed[s - 1] if s else None
            rows.append(dict(step=s, layer=None if head is None else head[0], head=None if head is None else head[1],
                             removed=None if head is None else head_set_name([head]), fraction_removed=s / self.n_heads,
                             metric=float(metric[s]), stderr=float(stderr[s]), n=int(n[s]),
                             score=None if s == 0 or self.scores[s - 1] is None else float(self.scores[s - 1])))
        return pd.DataFrame(rows)

    def plot(self, path: str | os.PathLike | None = None, *, title: str | None = None):
        """Fraction of heads removed (x) against the metric (y, with a standard-error band);
        returns a ``matplotlib.figure.Figure`` (PNG saved to ``path`` if given)."""
        from matplotlib.figure import Figure

        frame = self.to_frame()
        x, y, e = frame["fraction_removed"].to_numpy(), frame["metric"].to_numpy(), frame["stderr"].fillna(0).to_numpy()
        fig = Figure(figsize=(6.0, 4.0))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(x, y, marker="o", markersize=3)
        ax.fill_between(x, y - e, y + e, alpha=0.25)
        ax.set_xlabel("fraction of heads removed")
        ax.set_ylabel(literal(self.metric_name))
        ax.set_title(literal(title or f"pruning curve (order: {self.order})"))
        fig.tight_layout()
        if path is not None:
            fig.savefig(Path(path), format="png", dpi=100)
        return fig

    def __repr__(self) -> str:
        m = self.metric
        return (f"PruneCurve(order={self.order!r}, {len(self.removed)} of {self.n_heads} heads removed, "
                f"{self.metric_name} {float(m[0]):.4g} -> {float(m[-1]):.4g})")
