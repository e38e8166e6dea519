"""Zero and mean ablation of head outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import Intervention, as_int
from ..vocabulary import ABLATIONS, check_choice
from .sources import mean_source


@dataclass(frozen=True, eq=False)
class Ablate(Intervention):
    """Replace a head's output ``z`` by zeros (``kind="zero"``) or its mean (``kind="mean"``).

    For ``kind="mean"``, ``value`` is an :class:`~headint.activations.ActivationCache`
    (its mean over the batch is used, per position where it has them, padding left out) or a
    tensor ``[H, D]`` / ``[T, H, D]`` of this layer's mean head outputs (``D``: the layer's value
    head dim). ``stack``: which attention stack ``layer`` counts in (None: the model's default; see
    :mod:`headint.shape`).
    """

    layer: int
    head: Any = None
    positions: Any = None
    kind: str = "zero"
    value: Any = None
    stack: str | None = None

    def validate(self, shape) -> None:
        super().validate(shape)
        check_choice(self.kind, ABLATIONS, "Ablate.kind")
        if self.kind == "mean":
            ls = self.layer_shape(shape)
            v = mean_source(self.value, as_int(self.layer, "layer"))
            if tuple(v.shape[-2:]) != (ls.n_heads, ls.v_head_dim):
                seen = list(self.value.shape) if isinstance(self.value, torch.Tensor) else list(v.shape[1:])
                raise ValueError(
                    f"Ablate mean value for layer {self.layer} has shape {seen}; expected [{ls.n_heads}, {ls.v_head_dim}] "
                    f"or [T, {ls.n_heads}, {ls.v_head_dim}] ([H, D] or [T, H, D])"
                )

    def lower(self, call) -> None:
        sel = call.select(self.head, self.positions, "Ablate.positions")
        if self.kind == "zero":
            call.replace_output(sel, torch.zeros(1, 1, 1, 1))
            return
        mv = mean_source(self.value, call.layer)
        seen = list(self.value.shape) if isinstance(self.value, torch.Tensor) else list(mv.shape[1:])
        value = call.values_at(mv.to(call.device), sel, "q", f"Ablate mean value (shape {seen})")
        call.replace_output(sel, value.transpose(1, 2))
