"""Activation patching of head outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Intervention, as_int
from .sources import check_source_stack, z_source


@dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Replace a head's output ``z`` by the one from another run (activation patching).

    ``source``: an :class:`~headint.activations.ActivationCache` recorded with ``"z"``, or a
    tensor ``[B, T, H, D]`` of this layer's head outputs. Its batch must be 1 or the
    model's batch (row ``i`` patched from source row ``i``); it must cover every selected position.
    ``stack``: which attention stack ``layer`` counts in (None: the model's default; see
    :mod:`headint.shape`). A cache recorded on another stack is refused.
    """

    layer: int
    head: Any = None
    positions: Any = None
    source: Any = None
    stack: str | None = None

    def validate(self, shape) -> None:
        super().validate(shape)
        layer = as_int(self.layer, "Patch.layer")
        stack = self.site(shape)[0]
        check_source_stack(self.source, stack, shape.default_stack, "Patch.source")
        ls = shape.layer(layer, stack)
        z = z_source(self.source, layer, "Patch.source")
        if z.dim() != 4 or tuple(z.shape[2:]) != (ls.n_heads, ls.v_head_dim):
            raise ValueError(f"Patch.source for layer {layer} has shape {list(z.shape)}; expected [B, T, {ls.n_heads}, {ls.v_head_dim}]")

    def lower(self, call) -> None:
        sel = call.select(self.head, self.positions, "Patch.positions")
        z = z_source(self.source, call.layer, "Patch.source")
        value = call.values_at(call.batch(z, "Patch.source").to(call.device), sel, "q", f"Patch.source (shape {list(z.shape)})")
        call.replace_output(sel, value.transpose(1, 2))
