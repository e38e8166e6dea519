"""Direct vs total effects of heads, side by side: how much of a head's effect reaches the
logits straight through the residual stream, and how much flows through later attention heads
(which may amplify it, as induction heads do for a previous-token head, or undo it: self-repair,
McGrath et al. 2023 "the Hydra effect"; Rushing & Nanda 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..results import ScanResult
from .exact import scan


@dataclass(frozen=True)
class DirectTotal:
    """Two scans over the same grid and examples: ``total`` (every later component recomputed)
    and ``direct`` (every later attention head frozen at the base run's output; see
    :func:`headint.scan`'s ``effect``). Both effects are measured from the same base run (the
    corrupted run for denoising, else the clean run; see :attr:`ScanResult.effect`)."""

    total: ScanResult
    direct: ScanResult

    @property
    def indirect(self) -> torch.Tensor:
        """``total.effect - direct.effect`` ``[*grid]``: the part of each head's total effect that
        flows through later attention heads. Same sign as the direct effect where later heads
        amplify it (or where the head acts only through them, as a previous-token head through
        induction heads: direct ~ 0, indirect ~ total); opposite sign where they undo it
        (self-repair)."""
        return self.total.effect - self.direct.effect

    def to_frame(self):
        """A pandas DataFrame: one row per grid cell with its ``direct``, ``total`` and
        ``indirect`` (``total - direct``) effects."""
        frame = self.total.to_frame()[list(self.total.axes)].copy()
        frame["direct"] = self.direct.effect.reshape(-1).numpy()
        frame["total"] = self.total.effect.reshape(-1).numpy()
        frame["indirect"] = self.indirect.reshape(-1).numpy()
        return frame


def direct_vs_total(model, inputs, metric, **scan_kwargs) -> DirectTotal:
    """Scan every head twice, ``effect="total"`` and ``effect="direct"``, with the same
    arguments (``scan_kwargs``: those of :func:`headint.scan` but ``effect``); returns both
    and their difference per head (:attr:`DirectTotal.indirect`)."""
    if "effect" in scan_kwargs:
        raise TypeError("direct_vs_total runs both effects; do not pass effect=")
    if scan_kwargs.get("head_sets") is not None:
        raise ValueError("direct_vs_total compares single heads; head_sets are not supported here")
    total = scan(model, inputs, metric, effect="total", **scan_kwargs)
    direct = scan(model, inputs, metric, effect="direct", **scan_kwargs)
    return DirectTotal(total, direct)
