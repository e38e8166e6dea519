"""``FaithfulnessResult``: circuits evaluated alone and as a complement, with bootstrap
confidence intervals over prompts (:func:`headint.scans.faithfulness.circuit_faithfulness`).

Definitions (per circuit ``C``, ``M`` the metric's mean over the prompts):

- ``alone``: ``M`` with every component *outside* ``C`` ablated; ``complement``: ``M`` with the
  components *of* ``C`` ablated (the rest intact); ``intact``: nothing ablated; ``none``:
  everything ablated.
- faithfulness ``f(C) = (M(C alone) - M(none)) / (M(intact) - M(none))``: 1 is the intact
  model, 0 the fully ablated one (the normalised faithfulness of Wang et al. 2023 and of the MIB
  benchmark's circuit-performance ratio, Mueller et al. 2025). The complement's
  ``(M(complement) - M(none)) / (M(intact) - M(none))`` is near 0 for a complete circuit.
- Over a family of circuits of growing size (a curve), with ``x = |C| / |all components|``:
  ``CPR`` is the area under ``f`` (higher: faithful with fewer components) and ``CMD`` the area
  under ``|1 - f|`` (lower: closer to the model's behaviour), both by trapezoids over the sizes
  given (MIB's circuit-performance-ratio and circuit-model-distance areas).
- Uncertainty: ``n_boot`` bootstrap replicates draw the prompts with replacement, *one draw
  shared by every circuit and every term* (so ratios keep their pairing), and recompute each
  ratio of means; ``lo`` / ``hi`` are percentile intervals (Miller et al., COLM 2024, show
  per-prompt spread of up to 50% for a published circuit). ``per_prompt`` quantiles describe
  that spread directly: each prompt's own ratio (undefined where its own denominator is 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .stats import bootstrap_means, finite_mean, percentile_interval

__all__ = ["FaithfulnessResult", "faithfulness_ratio", "curve_areas"]


def faithfulness_ratio(value: torch.Tensor, intact: torch.Tensor, none: torch.Tensor) -> torch.Tensor:
    """``(value - none) / (intact - none)`` elementwise (float64; NaN where the denominator is 0)."""
    den = intact.double() - none.double()
    return torch.where(den != 0, (value.double() - none.double()) / torch.where(den != 0, den, torch.ones_like(den)),
                       torch.full_like(den, float("nan")))


def curve_areas(x: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CPR, CMD)``: trapezoid areas under ``f`` and under ``|1 - f|`` over ``x`` ``[K]``
    (ascending), for ``f`` ``[..., K]``."""
    x = x.double()
    dx = x[1:] - x[:-1]
    f = f.double()
    cpr = ((f[..., 1:] + f[..., :-1]) / 2 * dx).sum(-1)
    g = (1 - f).abs()
    cmd = ((g[..., 1:] + g[..., :-1]) / 2 * dx).sum(-1)
    return cpr, cmd


@dataclass
class FaithfulnessResult:
    """Per-prompt metric values of circuits evaluated alone and as a complement.

    ``names`` (K): each circuit's label; ``sizes`` ``[K]``: components in each circuit;
    ``n_components``: components in the whole model (heads, or edges); ``alone`` /
    ``complement`` ``[K, N]``; ``intact`` / ``none`` ``[N]`` (see the module docstring).
    ``settings``: the ablation choices (JSON-able), e.g. ``ablation``, ``positions``, ``level``
    (``"node"`` or ``"edge"``).
    """

    names: list
    sizes: list
    n_components: int
    alone: torch.Tensor
    complement: torch.Tensor
    intact: torch.Tensor
    none: torch.Tensor
    metric_name: str
    settings: dict = field(default_factory=dict)

    def faithfulness(self) -> torch.Tensor:
        """``[K]``: ``f(C)`` from the means over the prompts."""
        return faithfulness_ratio(finite_mean(self.alone), finite_mean(self.intact[None])[0], finite_mean(self.none[None])[0])

    def complement_faithfulness(self) -> torch.Tensor:
        return faithfulness_ratio(finite_mean(self.complement), finite_mean(self.intact[None])[0], finite_mean(self.none[None])[0])

    def _replicates(self, n_boot: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, K], [B, K])`` bootstrap replicates of the circuit and complement ratios."""
        K = len(self.names)
        stacked = torch.cat([self.alone, self.complement, self.intact[None], self.none[None]]).double()  # [2K + 2, N]
        reps = bootstrap_means(stacked, n_boot, seed)  # [B, 2K + 2]
        intact, none = reps[:, 2 * K], reps[:, 2 * K + 1]
        return (faithfulness_ratio(reps[:, :K], intact[:, None], none[:, None]),
                faithfulness_ratio(reps[:, K:2 * K], intact[:, None], none[:, None]))

    def areas(self, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
        """CPR and CMD of the circuits as a curve over size (sorted by size), with percentile
        intervals: ``dict(cpr, cpr_lo, cpr_hi, cmd, cmd_lo, cmd_hi)``."""
        order = sorted(range(len(self.names)), key=lambda k: self.sizes[k])
        x = torch.tensor([self.sizes[k] / self.n_components for k in order], dtype=torch.float64)
        if len(x) < 2 or float(x[-1] - x[0]) <= 0:
            raise ValueError("areas: a curve needs at least two circuits of different sizes")
        cpr, cmd = curve_areas(x, self.faithfulness()[order])
        reps, _ = self._replicates(n_boot, seed)
        rc, rm = curve_areas(x, reps[:, order])
        (clo, chi), (mlo, mhi) = percentile_interval(rc[:, None], level), percentile_interval(rm[:, None], level)
        return dict(cpr=float(cpr), cpr_lo=float(clo[0]), cpr_hi=float(chi[0]), cmd=float(cmd), cmd_lo=float(mlo[0]),
                    cmd_hi=float(mhi[0]), x_from=float(x[0]), x_to=float(x[-1]))

    def to_frame(self, n_boot: int = 1000, level: float = 0.95, seed: int = 0):
        """One row per circuit: ``circuit, size, fraction, faithfulness, lo, hi, complement,
        complement_lo, complement_hi, per_prompt_q25, per_prompt_median, per_prompt_q75, alone,
        intact, none, n`` plus the settings' ablation choices as columns."""
        import pandas as pd

        f, fc = self.faithfulness(), self.complement_faithfulness()
        reps, creps = self._replicates(n_boot, seed)
        lo, hi = percentile_interval(reps, level)
        clo, chi = percentile_interval(creps, level)
        per = faithfulness_ratio(self.alone, self.intact[None], self.none[None])  # [K, N]
        per = torch.where(torch.isfinite(per), per, torch.full_like(per, float("nan")))
        q = torch.nanquantile(per, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=1)  # [3, K]
        choice = {k: (str(v) if isinstance(v, (list, tuple, dict)) else v) for k, v in self.settings.items()
                  if k in ("ablation", "positions", "level", "choice")}
        rows = []
        for k, name in enumerate(self.names):
            rows.append(dict(circuit=name, size=self.sizes[k], fraction=self.sizes[k] / self.n_components,
                             faithfulness=float(f[k]), lo=float(lo[k]), hi=float(hi[k]), complement=float(fc[k]),
                             complement_lo=float(clo[k]), complement_hi=float(chi[k]), per_prompt_q25=float(q[0, k]),
                             per_prompt_median=float(q[1, k]), per_prompt_q75=float(q[2, k]),
                             alone=float(finite_mean(self.alone[k][None])[0]), intact=float(finite_mean(self.intact[None])[0]),
                             none=float(finite_mean(self.none[None])[0]), n=int(torch.isfinite(self.alone[k]).sum()), **choice))
        return pd.DataFrame(rows)

    def plot(self, path=None, *, n_boot: int = 1000, level: float = 0.95, title: str | None = None):
        """Faithfulness (and complement) against circuit size with the bootstrap band; a
        ``matplotlib.figure.Figure`` (PNG saved to ``path`` if given)."""
        from matplotlib.figure import Figure

        fr = self.to_frame(n_boot, level).sort_values("fraction")
        fig = Figure(figsize=(5.5, 3.8))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(fr["fraction"], fr["faithfulness"], marker="o", label="circuit alone")
        ax.fill_between(fr["fraction"], fr["lo"], fr["hi"], alpha=0.25)
        ax.plot(fr["fraction"], fr["complement"], marker="s", label="complement")
        ax.fill_between(fr["fraction"], fr["complement_lo"], fr["complement_hi"], alpha=0.25)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("fraction of components in the circuit")
        ax.set_ylabel(f"faithfulness ({self.metric_name})")
        ax.legend()
        ax.set_title(title or f"faithfulness ({self.settings.get('ablation', '')}, {int(level * 100)}% bootstrap CI)")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, format="png", dpi=100)
        return fig

    def __repr__(self) -> str:
        return (f"FaithfulnessResult({len(self.names)} circuits, {self.alone.shape[1]} prompts, metric={self.metric_name!r}, "
                f"settings={ {k: self.settings.get(k) for k in ('ablation', 'positions', 'level')} })")
