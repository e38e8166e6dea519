"""Direct vs total effects of heads, side by side, and the total effect split by where it flows:
straight to the logits, through later attention heads (which may amplify it, as induction heads
do for a previous-token head, or undo it: self-repair, McGrath et al. 2023 "the Hydra effect";
Rushing & Nanda 2024), and through the final norm's rescaling (Rushing & Nanda 2024 count the
final LayerNorm among the self-repair mechanisms).

Three exact scans over the same grid and examples (:func:`headint.scan`'s ``effect``):

- ``total``: every later component recomputes;
- ``direct``: every later attention head keeps the base run's output; the final norm recomputes
  its scale (so for last-layer heads ``direct == total``);
- ``direct_frozen_ln``: as ``direct``, with the final norm's scale frozen at the base run's (the
  TransformerLens direct-logit-attribution convention).

The sources of the difference, in this order (each difference is exact; interactions between
the sources land in the first one that recomputes them):

- ``through_heads = total - direct``: what flows through later attention heads;
- ``final_norm = direct - direct_frozen_ln``: what the final norm's recomputed scale adds;
- MLPs: not separated. headint freezes no MLP outputs, so on a model with MLPs all three scans
  include the paths through later MLPs (and through the head's own layer's MLP); on an
  attention-only model (e.g. ``induction-2l``) there are none and ``direct_frozen_ln`` is the
  path straight to the unembedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..results import ScanResult
from .exact import scan


@dataclass(frozen=True)
class DirectTotal:
    """Scans over the same grid and examples: ``total`` (every later component recomputed),
    ``direct`` (every later attention head frozen at the base run's output; see
    :func:`headint.scan`'s ``effect``) and ``direct_frozen_ln`` (also the final norm's scale
    frozen at the base run's; None where not asked for). All are measured from the same base run
    (the corrupted run for denoising, else the clean run; see :attr:`ScanResult.effect`)."""

    total: ScanResult
    direct: ScanResult
    direct_frozen_ln: ScanResult | None = None

    @property
    def indirect(self) -> torch.Tensor:
        """``total.effect - direct.effect`` ``[*grid]``: the part of each head's total effect that
        flows through later attention heads. Same sign as the direct effect where later heads
        amplify it (or where the head acts only through them, as a previous-token head through
        induction heads: direct ~ 0, indirect ~ total); opposite sign where they undo it
        (self-repair)."""
        return self.total.effect - self.direct.effect

    @property
    def through_heads(self) -> torch.Tensor:
        """The same as :attr:`indirect`, named for its source."""
        return self.indirect

    @property
    def final_norm(self) -> torch.Tensor:
        """``direct.effect - direct_frozen_ln.effect`` ``[*grid]``: what the final norm's
        recomputed scale changes in the direct effect. Opposite in sign to
        ``direct_frozen_ln.effect`` where the norm repairs (a head's removal shrinks the residual
        stream, the recomputed scale grows and amplifies what is left). ``ValueError`` if the
        frozen-norm scan was not run."""
        if self.direct_frozen_ln is None:
            raise ValueError("final_norm needs the direct_frozen_ln scan (direct_vs_total(..., frozen_ln=True))")
        return self.direct.effect - self.direct_frozen_ln.effect

    def to_frame(self):
        """A pandas DataFrame: one row per grid cell with its ``direct``, ``total`` and
        ``indirect`` (``total - direct``) effects, and, with the frozen-norm scan,
        ``direct_frozen_ln`` and ``final_norm`` (``direct - direct_frozen_ln``)."""
        frame = self.total.to_frame()[list(self.total.axes)].copy()
        frame["direct"] = self.direct.effect.reshape(-1).numpy()
        frame["total"] = self.total.effect.reshape(-1).numpy()
        frame["indirect"] = self.indirect.reshape(-1).numpy()
        if self.direct_frozen_ln is not None:
            frame["direct_frozen_ln"] = self.direct_frozen_ln.effect.reshape(-1).numpy()
            frame["final_norm"] = self.final_norm.reshape(-1).numpy()
        return frame


def direct_vs_total(model, inputs, metric, *, frozen_ln: bool = True, **scan_kwargs) -> DirectTotal:
    """Scan every head with ``effect="total"``, ``"direct"`` and (``frozen_ln``, default)
    ``"direct_frozen_ln"``, with the same arguments (``scan_kwargs``: those of
    :func:`headint.scan` but ``effect``); returns them and the differences per head
    (:attr:`DirectTotal.indirect`: through later heads; :attr:`DirectTotal.final_norm`: the
    final norm's rescaling). ``frozen_ln=False`` skips the third scan (a model whose final norm
    headint cannot freeze: see :mod:`headint.integration.final_norm`)."""
    if "effect" in scan_kwargs:
        raise TypeError("direct_vs_total runs every effect; do not pass effect=")
    if scan_kwargs.get("head_sets") is not None:
        raise ValueError("direct_vs_total compares single heads; head_sets are not supported here")
    if not isinstance(frozen_ln, bool):
        raise TypeError(f"direct_vs_total: frozen_ln must be True or False, got {frozen_ln!r}")
    total = scan(model, inputs, metric, effect="total", **scan_kwargs)
    direct = scan(model, inputs, metric, effect="direct", **scan_kwargs)
    frozen = scan(model, inputs, metric, effect="direct_frozen_ln", **scan_kwargs) if frozen_ln else None
    return DirectTotal(total, direct, frozen)
