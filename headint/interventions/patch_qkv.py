"""Patching a head's query, key or value input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Intervention, head_list, positions_form
from .sources import qkv_source


@dataclass(frozen=True, eq=False)
class PatchQKV(Intervention):
    """Replace a head's query, key or value input (after rotary embeddings).

    ``which``: ``"q"``, ``"k"`` or ``"v"``. For ``"k"``/``"v"`` under grouped-query
    attention, ``head`` indexes key/value heads. ``source``: an
    :class:`~headint.activations.ActivationCache` recorded with that tensor, or a tensor
    ``[B, H, T, D]`` (H the number of query or key/value heads).
    """

    layer: int
    head: Any = None
    which: str = "v"
    positions: Any = None
    source: Any = None

    def validate(self, shape) -> None:
        if self.which not in ("q", "k", "v"):
            raise ValueError(f"PatchQKV.which must be 'q', 'k' or 'v', got {self.which!r}")
        kv = self.which != "q"
        layer = self.check_layer(shape)  # not super().validate: `head` may name key/value heads
        positions_form(self.positions, "PatchQKV.positions")
        head_list(self.head, shape.n_kv_heads if kv else shape.n_heads, "key/value" if kv else "query", layer)
        if self.source is None:
            raise ValueError("PatchQKV needs source=: an ActivationCache or a tensor [B, H, T, D]")

    def lower(self, call) -> None:
        which, shape = self.which, call.shape
        n = shape.n_heads if which == "q" else shape.n_kv_heads
        src = qkv_source(self.source, which, call.layer, "PatchQKV.source")
        d = shape.v_head_dim if which == "v" else shape.head_dim
        if src.dim() != 4 or src.shape[1] != n or src.shape[3] != d:
            raise ValueError(f"PatchQKV(which={which!r}).source for layer {call.layer} has shape {list(src.shape)}; "
                             f"expected [B, {n}, T, {d}]")
        sel = call.select_qkv(which, self.head, self.positions, "PatchQKV.positions")
        axis = "q" if which == "q" else "k"
        vals = call.values_at(call.batch(src, "PatchQKV.source").transpose(1, 2), sel, axis,
                              f"PatchQKV.source ({which}, shape {list(src.shape)})").transpose(1, 2)
        call.replace_qkv(which, sel, vals)

