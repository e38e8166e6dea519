"""Scan variants and the per-row plans that evaluate many of them in one batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..plan import ModelShape, TensorPlan


@dataclass(frozen=True)
class Variant:
    """One intervention of a scan: replace the outputs of ``heads`` (``(layer, head)`` pairs),
    at every position (``position=None``) or at one absolute position."""

    heads: tuple[tuple[int, int], ...]
    position: int | None = None

    @property
    def start_layer(self) -> int:
        return min(l for l, _ in self.heads)


def head_grid(shape: ModelShape, layers: Sequence[int] | None, heads: Sequence[int] | None) -> list[tuple[int, int]]:
    """Every ``(layer, head)`` in the scan's selection, validated (default: every layer with
    attention; a hybrid model's other layers are refused, naming their kind)."""
    layers = list(shape.attention_layers) if layers is None else list(layers)
    heads = list(range(shape.n_heads)) if heads is None else list(heads)
    for l in layers:
        if not 0 <= l < shape.n_layers:
            raise ValueError(f"layers: {l} out of range; the model has {shape.n_layers} layers")
        if not shape.layer(l).has_attention:
            raise ValueError(f"layers: layer {l} is a {shape.layer(l).kind!r} layer without attention; "
                             f"the layers with attention are {shape.attention_layers}")
    for h in heads:
        if not 0 <= h < shape.n_heads:
            raise ValueError(f"heads: {h} out of range; the model has {shape.n_heads} heads per layer")
    return [(l, h) for l in layers for h in heads]


def all_pairs(shape: ModelShape, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """All unordered pairs of distinct heads, e.g. to find heads that back each other up."""
    grid = head_grid(shape, layers, heads)
    return [(a, b) for i, a in enumerate(grid) for b in grid[i + 1 :]]


def build_plan(
    shape: ModelShape,
    variants: Sequence[Variant],
    ex: torch.Tensor,
    var_of_row: torch.Tensor,
    T: int,
    patch_source,
    device,
) -> TensorPlan:
    """A per-row :class:`TensorPlan`: row ``r`` applies ``variants[var_of_row[r]]`` to example ``ex[r]``.

    ``patch_source(layer, ex) -> [R or 1, H, T, D] | None`` gives the replacement head outputs
    (None: zeros).
    """
    R = len(ex)
    H = shape.n_heads
    per_position = any(v.position is not None for v in variants)
    Tm = T if per_position else 1
    layers: dict[int, dict] = {}
    var_rows: dict[int, list[int]] = {}
    for r, vi in enumerate(var_of_row.tolist()):
        var_rows.setdefault(vi, []).append(r)
    for vi, rws in var_rows.items():
        v = variants[vi]
        rows = torch.tensor(rws, device=device)
        for l, h in v.heads:
            spec = layers.setdefault(l, {"head_mask": torch.ones(R, H, Tm, device=device)})
            if v.position is None:
                spec["head_mask"][rows, h, :] = 0.0
            else:
                spec["head_mask"][rows, h, v.position] = 0.0
    for l, spec in layers.items():
        spec["head_patch"] = patch_source(l, ex)
    return TensorPlan(layers)
