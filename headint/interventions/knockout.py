"""Model-level attention-edge knockout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import Intervention, head_list, positions_form


@dataclass(frozen=True, eq=False)
class Knockout(Intervention):
    """Remove the attention edges from ``queries`` to ``keys`` in ``head`` of ``layer``.

    ``queries`` / ``keys``: absolute token positions (an int, a list of ints, ``None`` for every
    position, or a bool tensor ``[T]`` / ``[B, T]``); ``head``: an int, a list, or ``None`` for
    every head of the layer. A query whose every key is removed gets a zero output.
    ``stack``: which attention stack ``layer`` counts in (None: the model's default; see
    :mod:`headint.shape`).

    For one attention call the edges become a :class:`headint.ops.EdgeKnockout`, the op-level
    selector that :func:`headint.attention` takes.
    """

    queries: Any = None
    keys: Any = None
    layer: int | None = None
    head: Any = None
    stack: str | None = None

    def validate(self, shape) -> None:
        layer = self.check_layer(shape)
        head_list(self.head, self.layer_shape(shape).n_heads, "query", layer)
        positions_form(self.queries, "Knockout.queries")
        positions_form(self.keys, "Knockout.keys")

    def lower(self, call) -> None:
        qsel = call.select(self.head, self.queries, "Knockout.queries")
        ksel = call.positions(self.keys, "k", "Knockout.keys")[:, None, :]
        call.knock_out(qsel, ksel)

    def __repr__(self) -> str:  # short: selectors may be big tensors
        def short(x):
            return f"Tensor{list(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)

        return f"Knockout(queries={short(self.queries)}, keys={short(self.keys)}, layer={self.layer}, head={self.head!r}, stack={self.stack!r})"
