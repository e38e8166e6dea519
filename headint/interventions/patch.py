"""Activation patching of head outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Intervention, as_int
from .sources import z_source


@dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Replace a head's output ``z`` by the one from another run (activation patching).

    ``source``: an :class:`~headint.activations.ActivationCache` recorded with ``"z"``, or a
    tensor ``[B, T, H, D]`` of this layer's head outputs. Its batch must be 1 or the
    model's batch (row ``i`` patched from source row ``i``); it must cover every selected position.
    """

    layer: int
    head: Any = None
    positions: Any = None
    source: Any = None

    def validate(self, shape) -> None:
        super().validate(shape)
        layer = as_int(self.layer, "Patch.layer")
        z = z_source(self.source, layer, "Patch.source")
        if z.dim() != 4 or tuple(z.shape[2:]) != (shape.n_heads, shape.v_head_dim):
            raise ValueError(f"Patch.source for layer {layer} has shape {list(z.shape)}; expected [B, T, {shape.n_heads}, {shape.v_head_dim}]")

    def lower(self, call) -> None:
        sel = call.select(self.head, self.positions, "Patch.positions")
        z = z_source(self.source, call.layer, "Patch.source")
        value = call.values_at(call.batch(z, "Patch.source").to(call.device), sel, "q", f"Patch.source (shape {list(z.shape)})")
        call.replace_output(sel, value.transpose(1, 2))
