"""Direct vs total effects of heads, side by side, and the total effect split by where it flows:
straight to the logits, through later attention heads (which may amplify it, as induction heads
do for a previous-token head, or undo it: self-repair, McGrath et al. 2023 "the Hydra effect";
Rushing & Nanda 2024), through the final norm's rescaling (Rushing & Nanda 2024 count the final
LayerNorm among the self-repair mechanisms) and through MLPs.

Four exact scans over the same grid and examples (:func:`headint.scan`'s ``effect``), each
freezing one more source at the base run's values:

- ``total``: every later component recomputes;
- ``direct``: every later attention head keeps the base run's output; MLPs and the final norm
  recompute (so for last-layer heads of an attention-only model ``direct == total``);
- ``direct_frozen_ln``: as ``direct``, with the final norm's scale frozen at the base run's;
- ``direct_path``: as ``direct_frozen_ln``, with every MLP from the head's layer on frozen too:
  the path straight to the unembedding (TransformerLens's direct logit attribution of the
  change). On an attention-only model it equals ``direct_frozen_ln``.

The sources, as the differences of consecutive scans (each exact; what the sources do together,
e.g. a later head reading an MLP's change, lands in the earlier of them in this order):

- ``through_heads = total - direct`` (also ``indirect``): through later attention heads;
- ``final_norm = direct - direct_frozen_ln``: the final norm's recomputed scale;
- ``through_mlps = direct_frozen_ln - direct_path``: through MLPs (with the final norm's scale frozen),

so ``total = direct_path + through_mlps + final_norm + through_heads``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..results import ScanResult
from .exact import scan


@dataclass(frozen=True)
class DirectTotal:
    """Scans over the same grid and examples: ``total`` (every later component recomputed),
    ``direct`` (every later attention head frozen at the base run's output; see
    :func:`headint.scan`'s ``effect``), ``direct_frozen_ln`` (also the final norm's scale
    frozen at the base run's) and ``direct_path`` (also the MLPs from the head's layer on; both
    None where not asked for). All are measured from the same base run
    (the corrupted run for denoising, else the clean run; see :attr:`ScanResult.effect`)."""

    total: ScanResult
    direct: ScanResult
    direct_frozen_ln: ScanResult | None = None
    direct_path: ScanResult | None = None
    skipped: dict = field(default_factory=dict)  # {scan: why it was not run} (see direct_vs_total)

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

    @property
    def through_mlps(self) -> torch.Tensor:
        """``direct_frozen_ln.effect - direct_path.effect`` ``[*grid]``: what flows through the
        MLPs from the head's layer on (with later heads and the final norm's scale frozen); 0 on
        an attention-only model. ``ValueError`` if those scans were not run."""
        if self.direct_frozen_ln is None or self.direct_path is None:
            raise ValueError("through_mlps needs the direct_frozen_ln and direct_path scans (direct_vs_total(..., frozen_ln=True, "
                             "frozen_mlps=True))")
        return self.direct_frozen_ln.effect - self.direct_path.effect

    def to_frame(self):
        """A pandas DataFrame: one row per grid cell with its ``direct``, ``total`` and
        ``indirect`` (``total - direct``) effects, and, with the frozen-norm scan,
        ``direct_frozen_ln`` and ``final_norm`` (``direct - direct_frozen_ln``), and with the
        direct-path scan, ``direct_path`` and ``through_mlps`` (``direct_frozen_ln - direct_path``)."""
        frame = self.total.to_frame()[list(self.total.axes)].copy()
        frame["direct"] = self.direct.effect.reshape(-1).numpy()
        frame["total"] = self.total.effect.reshape(-1).numpy()
        frame["indirect"] = self.indirect.reshape(-1).numpy()
        if self.direct_frozen_ln is not None:
            frame["direct_frozen_ln"] = self.direct_frozen_ln.effect.reshape(-1).numpy()
            frame["final_norm"] = self.final_norm.reshape(-1).numpy()
        if self.direct_path is not None:
            frame["direct_path"] = self.direct_path.effect.reshape(-1).numpy()
            frame["through_mlps"] = self.through_mlps.reshape(-1).numpy()
        return frame


def direct_vs_total(model, inputs, metric, *, frozen_ln: bool | None = None, frozen_mlps: bool | None = None,
                    **scan_kwargs) -> DirectTotal:
    """Scan every head with ``effect="total"``, ``"direct"``, ``"direct_frozen_ln"`` and
    ``"direct_path"``, with the same arguments (``scan_kwargs``: those of :func:`headint.scan`
    but ``effect``); returns them and the differences per head (:attr:`DirectTotal.indirect`:
    through later heads; :attr:`DirectTotal.final_norm`: the final norm's rescaling;
    :attr:`DirectTotal.through_mlps`: through MLPs).

    ``frozen_ln``: run ``"direct_frozen_ln"``; None (default): where the model's final norm can
    be frozen (:mod:`headint.integration.final_norm`; else :attr:`DirectTotal.skipped` says
    why); True: or raise. ``frozen_mlps``: run ``"direct_path"``; None (default): where the
    model has MLPs the circuit probe finds (an attention-only model's ``direct_path`` equals its
    ``direct_frozen_ln``, which then stands for both; a model the probe refuses: ``skipped``
    says why); True: or raise. Either False skips it."""
    if "effect" in scan_kwargs:
        raise TypeError("direct_vs_total runs every effect; do not pass effect=")
    if scan_kwargs.get("head_sets") is not None:
        raise ValueError("direct_vs_total compares single heads; head_sets are not supported here")
    for name, v in (("frozen_ln", frozen_ln), ("frozen_mlps", frozen_mlps)):
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"direct_vs_total: {name} must be True, False or None (where the model allows), got {v!r}")
    if frozen_mlps and frozen_ln is False:
        raise ValueError("direct_vs_total: frozen_mlps=True needs the final norm frozen too (direct_path freezes its scale); "
                         "frozen_ln=False contradicts it")
    from ..circuits.structure import circuit_structure
    from ..integration.adapter import UnsupportedModelError
    from ..integration.final_norm import FinalNormError

    skipped: dict[str, str] = {}
    total = scan(model, inputs, metric, effect="total", **scan_kwargs)
    direct = scan(model, inputs, metric, effect="direct", **scan_kwargs)
    frozen = path = None
    if frozen_ln is not False:
        try:
            frozen = scan(model, inputs, metric, effect="direct_frozen_ln", **scan_kwargs)
        except FinalNormError as e:
            if frozen_ln or frozen_mlps:
                raise
            skipped["direct_frozen_ln"] = skipped["direct_path"] = str(e)
    elif frozen_mlps is None:
        skipped["direct_path"] = "frozen_ln=False (direct_path freezes the final norm's scale too)"
    if frozen is not None and frozen_mlps is not False:
        try:
            with torch.enable_grad():  # the circuit probe differentiates (once per model, cached)
                has_mlps = any(circuit_structure(model).has_mlp)
        except UnsupportedModelError as e:
            if frozen_mlps:
                raise
            skipped["direct_path"] = str(e)
        else:
            path = scan(model, inputs, metric, effect="direct_path", **scan_kwargs) if has_mlps else frozen
    return DirectTotal(total, direct, frozen, path, skipped)
