"""Scaling a head's output or its attention scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Intervention, as_real


@dataclass(frozen=True, eq=False)
class Scale(Intervention):
    """Multiply a head's output (``target="output"``) or its pre-softmax scores
    (``target="scores"``, all positions) by ``factor`` (a finite real number: int, float,
    numpy scalar or 0-dim tensor). ``stack``: which attention stack ``layer`` counts in (None: the model's default; see
    :mod:`headint.shape`)."""

    layer: int
    head: Any = None
    positions: Any = None
    factor: Any = 1.0
    target: str = "output"
    stack: str | None = None

    def validate(self, shape) -> None:
        super().validate(shape)
        as_real(self.factor, "Scale.factor")
        if self.target not in ("output", "scores"):
            raise ValueError(f"Scale.target must be 'output' or 'scores', got {self.target!r}")
        if self.target == "scores" and self.positions is not None:
            raise ValueError("Scale(target='scores') applies to all positions; positions must be None")

    def lower(self, call) -> None:
        if self.target == "scores":
            call.scale_scores(self.head, self.factor)
        else:
            call.scale_output(call.select(self.head, self.positions, "Scale.positions"), self.factor)
