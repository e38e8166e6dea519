"""Scan variants and the per-row plans that evaluate many of them in one batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..interventions.edits import CallPlan, PatternEdit, replace_input
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


def head_grid(shape: ModelShape, layers: Sequence[int] | None, heads: Sequence[int] | None,
              n_heads: int | None = None, kind: str = "") -> list[tuple[int, int]]:
    """Every ``(layer, head)`` in the scan's selection, validated (default: every layer with
    attention; a hybrid model's other layers are refused, naming their kind); ``n_heads``
    (default the query heads) and ``kind`` (e.g. ``"key/value "``) for scans over key/value heads."""
    n = shape.n_heads if n_heads is None else n_heads
    layers = list(shape.attention_layers) if layers is None else list(layers)
    heads = list(range(n)) if heads is None else list(heads)
    for l in layers:
        if not 0 <= l < shape.n_layers:
            raise ValueError(f"layers: {l} out of range; the model has {shape.n_layers} layers")
        if not shape.layer(l).has_attention:
            raise ValueError(f"layers: layer {l} is a {shape.layer(l).kind!r} layer without attention; "
                             f"the layers with attention are {shape.attention_layers}")
    for h in heads:
        if not 0 <= h < n:
            raise ValueError(f"heads: {h} out of range; the model has {n} {kind}heads per layer")
    return [(l, h) for l in layers for h in heads]


def all_pairs(shape: ModelShape, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """All unordered pairs of distinct heads, e.g. to find heads that back each other up."""
    grid = head_grid(shape, layers, heads)
    return [(a, b) for i, a in enumerate(grid) for b in grid[i + 1 :]]




def target_heads(shape: ModelShape, target: str) -> int:
    """How many heads per layer a target has: key/value heads for ``"k"``/``"v"`` (fewer than
    query heads under grouped-query attention), query heads otherwise."""
    return shape.n_kv_heads if target in ("k", "v") else shape.n_heads


def build_plan(
    shape: ModelShape,
    variants: Sequence[Variant],
    ex: torch.Tensor,
    var_of_row: torch.Tensor,
    T: int,
    patch_source,
    device,
    target: str = "z",
    freeze_source=None,
) -> TensorPlan:
    """A per-row :class:`TensorPlan`: row ``r`` applies ``variants[var_of_row[r]]`` to example ``ex[r]``.

    ``target``: what each variant's heads replace: ``"z"`` the head output (``head_mask`` /
    ``head_patch``), ``"q"`` the query (heads and positions index queries), ``"k"``/``"v"`` the
    key/value (heads index key/value heads, positions index keys), all after rotary embeddings
    (``qkv`` edits), ``"pattern"`` the attention probabilities (positions index queries).
    ``patch_source(layer, ex) -> [R or 1, Hx, T, D] | None`` gives the replacement values,
    head-major (None: zeros, the edits' fill); for ``"pattern"``, ``[R or 1, H, T, T]``
    probabilities. Each layer's edits are a :class:`~headint.interventions.edits.CallPlan` over
    absolute positions.

    ``freeze_source(layer, ex) -> [R, H, T, D]`` (direct effects): every head output of every
    layer above a row's variant's lowest layer is replaced by it (the base run's ``z``), except
    the heads the variant itself replaces there; None freezes nothing.
    """
    R = len(ex)
    H = shape.n_heads
    n = target_heads(shape, target)
    per_position = any(v.position is not None for v in variants)
    Tm = T if per_position else 1
    sels: dict[int, torch.Tensor] = {}  # layer -> [R, n, Tm] bool: what the variants replace
    var_rows: dict[int, list[int]] = {}
    for r, vi in enumerate(var_of_row.tolist()):
        var_rows.setdefault(vi, []).append(r)
    start = torch.empty(R, dtype=torch.long)
    for vi, rws in var_rows.items():
        v = variants[vi]
        rows = torch.tensor(rws, device=device)
        start[rws] = v.start_layer
        for l, h in v.heads:
            sel = sels.setdefault(l, torch.zeros(R, n, Tm, dtype=torch.bool, device=device))
            if v.position is None:
                sel[rows, h, :] = True
            else:
                sel[rows, h, v.position] = True
    layers: dict[int, CallPlan] = {}
    for l, sel in sels.items():
        if target == "z":
            layers[l] = CallPlan(head_mask=(~sel).float(), head_patch=patch_source(l, ex))
        elif target == "pattern":
            layers[l] = CallPlan(pattern_edits=[PatternEdit(sel, patch_source(l, ex))])
        else:
            layers[l] = replace_input(target, sel, patch_source(l, ex))
    if freeze_source is not None:
        start = start.to(device)
        for l in range(int(start.min()) + 1, shape.n_layers):
            frozen = start < l  # [R]
            if not frozen.any():
                continue
            spec = layers.setdefault(l, CallPlan())
            own = (~spec.head_mask.bool()) if spec.head_mask is not None else torch.zeros(R, H, 1, dtype=torch.bool, device=device)
            replaced = own | frozen[:, None, None]
            base_z = freeze_source(l, ex)
            if spec.head_mask is not None:
                own_values = spec.head_patch if spec.head_patch is not None else torch.zeros_like(base_z)
                base_z = torch.where(own[..., None], own_values.to(base_z.dtype).expand_as(base_z), base_z)
            spec.head_mask = (~replaced).float()
            spec.head_patch = base_z
    return TensorPlan(layers)
