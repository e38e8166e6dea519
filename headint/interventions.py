"""Intervention objects: what a user asks to do to which head.

Each names a ``layer`` and a ``head`` (an int, a list of ints, or ``None`` for every
head of the layer) and optionally ``positions`` (absolute token positions: an int,
a list, a bool tensor ``[T]`` or ``[B, T]``; ``None`` means all). Positions index the
input sequence as passed to the model (padding included), also across
``generate()`` steps.

They are descriptions only; :mod:`headint.plan` turns them into the per-layer
tensors the attention operator takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .ops.knockout import Knockout

HeadSel = Any  # int | list[int] | None
PosSel = Any  # int | list[int] | torch.Tensor | None


@dataclass(frozen=True, eq=False)
class Ablate:
    """Replace a head's output ``z`` by zeros (``kind="zero"``) or its mean (``kind="mean"``).

    For ``kind="mean"``, ``value`` is an :class:`~headint.record.ActivationCache`
    (its mean over the batch is used, per position where it has them) or a tensor
    ``[H, D]`` / ``[T, H, D]`` of this layer's mean head outputs.
    """

    layer: int
    head: HeadSel = None
    positions: PosSel = None
    kind: str = "zero"
    value: Any = None


@dataclass(frozen=True, eq=False)
class Patch:
    """Replace a head's output ``z`` by the one from another run (activation patching).

    ``source``: an :class:`~headint.record.ActivationCache` recorded with ``"z"``, or a
    tensor ``[B, T, H, D]`` of this layer's head outputs. Its batch must be 1 or the
    model's batch (row ``i`` patched from source row ``i``).
    """

    layer: int
    head: HeadSel = None
    positions: PosSel = None
    source: Any = None


@dataclass(frozen=True, eq=False)
class Scale:
    """Multiply a head's output (``target="output"``) or its pre-softmax scores
    (``target="scores"``, all positions) by ``factor``."""

    layer: int
    head: HeadSel = None
    positions: PosSel = None
    factor: float = 1.0
    target: str = "output"


@dataclass(frozen=True, eq=False)
class PatchQKV:
    """Replace a head's query, key or value input (after rotary embeddings).

    ``which``: ``"q"``, ``"k"`` or ``"v"``. For ``"k"``/``"v"`` under grouped-query
    attention, ``head`` indexes key/value heads. ``source``: an
    :class:`~headint.record.ActivationCache` recorded with that tensor, or a tensor
    ``[B, H, T, D]`` (H the number of query or key/value heads).
    """

    layer: int
    head: HeadSel = None
    which: str = "v"
    positions: PosSel = None
    source: Any = None


INTERVENTION_TYPES = (Ablate, Patch, Scale, Knockout, PatchQKV)

__all__ = ["Ablate", "Patch", "Scale", "Knockout", "PatchQKV", "INTERVENTION_TYPES"]
