"""``GateResult``: learned head gates (:func:`headint.learn_gates`), their table, heatmap and
training curve."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .grid import head_set_name
from .plots import literal

__all__ = ["GateResult"]


@dataclass
class GateResult:
    """Learned gates, one per head.

    ``gates`` ``[L, H]``: the deterministic gate of each head in ``[0, 1]`` (Hard-Concrete: the
    test-time gate ``clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1)``; sigmoid gates: their
    value). ``params`` ``[L, H]``: the trained parameters (``log_alpha`` or the sigmoid logits;
    a total order of the heads even where gates are clamped to 0 or 1). ``p_open`` ``[L, H]``:
    the probability that the gate is nonzero (Hard-Concrete) or the gate value (sigmoid).
    ``threshold``: a head is open when its gate is ``>= threshold``. ``curve``: a pandas table
    with one row per training step (``step, objective, metric, penalty, loss, open_heads, n``;
    ``n``: the minibatch rows whose metric value and gradient were finite, which the step's
    ``metric`` averages). ``intact``: the metric's mean without gates; ``final``: with the heads
    of :attr:`closed_heads` ablated (exactly, not gated); both over the finite examples
    (``settings["finite_examples"]`` counts them). ``settings``: JSON-able arguments.

    With ``learn_gates(tolerance=x)``: ``kept`` is the kept head set (the smallest open set of
    the penalty search, refined; :attr:`open_heads` returns it and ``final`` is the metric with
    every other head ablated), ``faithfulness`` its measured normalised faithfulness
    ``(final - none_value) / (intact - none_value)``, ``none_value`` the metric with every head
    ablated, and ``path`` a pandas table with one row per training run of the search
    (``run, penalty_weight, n_open, open_heads, metric, faithfulness, keeps, chosen``).
    """

    kind: str
    gates: torch.Tensor
    params: torch.Tensor
    p_open: torch.Tensor
    threshold: float
    curve: object
    metric_name: str
    intact: float
    final: float
    settings: dict = field(default_factory=dict)
    kept: list | None = None
    faithfulness: float | None = None
    path: object = None
    none_value: float | None = None

    @property
    def open_heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` pairs whose gate is at least :attr:`threshold`; with a tolerance search,
        the kept set (sorted)."""
        if self.kept is not None:
            return sorted(tuple(x) for x in self.kept)
        return [tuple(x) for x in (self.gates >= self.threshold).nonzero().tolist()]

    @property
    def closed_heads(self) -> list[tuple[int, int]]:
        """Every head not in :attr:`open_heads`, sorted."""
        kept = set(self.open_heads)
        L, H = self.gates.shape
        return [(l, h) for l in range(L) for h in range(H) if (l, h) not in kept]

    def order(self) -> list[tuple[int, int]]:
        """Every head, least important first (the removal order of ``prune_curve(order=result)``).

        Without a tolerance search: ascending learned logits :attr:`params` (``log_alpha`` or the
        sigmoid logits; ties by layer, head), never the clamped gate values, which pin many heads
        at 1. With one: the heads outside the kept set first, then the kept set; within each, the
        heads that close at a smaller penalty weight of the search (the smallest weight of
        :attr:`path` whose open set lacks the head; never: last) come first, then ascending
        :attr:`params`."""
        L, H = self.params.shape
        heads = [(l, h) for l in range(L) for h in range(H)]
        if self.kept is None or self.path is None:
            return sorted(heads, key=lambda x: (float(self.params[x]), x))
        kept = set(self.open_heads)
        closes = {}
        for _, row in self.path.sort_values("penalty_weight").iterrows():
            opened = {tuple(x) for x in row["open_heads"]}
            for x in heads:
                if x not in opened and x not in closes:
                    closes[x] = float(row["penalty_weight"])
        return sorted(heads, key=lambda x: (x in kept, closes.get(x, float("inf")), float(self.params[x]), x))

    def to_frame(self):
        """A pandas table: ``layer, head, name, gate, param, p_open, open``, one row per head."""
        import pandas as pd

        L, H = self.gates.shape
        kept = set(self.open_heads)
        rows = [dict(layer=l, head=h, name=head_set_name([(l, h)]), gate=float(self.gates[l, h]),
                     param=float(self.params[l, h]), p_open=float(self.p_open[l, h]),
                     open=(l, h) in kept) for l in range(L) for h in range(H)]
        return pd.DataFrame(rows)

    def heatmap(self, path: str | os.PathLike | None = None, *, title: str | None = None):
        """Layer x head image of the gates (0 = closed, 1 = open), values written in the cells;
        returns a ``matplotlib.figure.Figure`` (PNG saved to ``path`` if given)."""
        from matplotlib.figure import Figure

        data = self.gates.double().numpy()
        L, H = data.shape
        fig = Figure(figsize=(max(4.5, 0.5 * H + 2.5), max(3.0, 0.4 * L + 1.5)))
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        if L * H <= 400:
            for l in range(L):
                for h in range(H):
                    ax.text(h, l, f"{data[l, h]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if data[l, h] > 0.5 else "white")
        fig.colorbar(im, ax=ax, label="gate")
        ax.set_title(literal(title or f"learned gates ({self.kind}), {len(self.open_heads)} of {L * H} open"))
        fig.tight_layout()
        if path is not None:
            fig.savefig(Path(path), format="png", dpi=100)
        return fig

    def plot_curve(self, path: str | os.PathLike | None = None):
        """Training curve: objective and penalty (left) and open heads (right) per step."""
        from matplotlib.figure import Figure

        c = self.curve
        fig = Figure(figsize=(9.0, 3.5))
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        ax1.plot(c["step"], c["objective"], label=literal(f"objective ({self.metric_name})"))
        ax1.plot(c["step"], c["penalty"], label="penalty")
        ax1.set_xlabel("step")
        ax1.legend()
        ax2.plot(c["step"], c["open_heads"])
        ax2.set_xlabel("step")
        ax2.set_ylabel("open heads")
        fig.tight_layout()
        if path is not None:
            fig.savefig(Path(path), format="png", dpi=100)
        return fig

    def __repr__(self) -> str:
        L, H = self.gates.shape
        faith = "" if self.faithfulness is None else f", faithfulness={self.faithfulness:.3f}"
        return (f"GateResult(kind={self.kind!r}, {len(self.open_heads)}/{L * H} heads open, metric={self.metric_name!r}, "
                f"intact={self.intact:.4g}, final={self.final:.4g}{faith})")
