"""Attention geometry of a model, as plain numbers.

:class:`ModelShape` is built from a model by
:func:`headint.integration.adapter.model_shape` (the one place that reads model structure);
everything below the integration only reads its fields.

A model has one or more *stacks* of attention layers, each named by a string:

- ``"self"``: the self-attention layers of a decoder-only or encoder-only model;
- ``"cross"``: cross-attention layers in such a model (GPT-2 with ``add_cross_attention``);
- ``"encoder.self"``, ``"decoder.self"``, ``"decoder.cross"``: the stacks of an
  encoder-decoder model (T5, BART, T5Gemma, Whisper, ...).

Interventions name a layer of one stack (``stack=None`` means :attr:`ModelShape.default_stack`:
``"self"`` where it exists, else ``"decoder.self"``). Every layer of a stack has a
:class:`LayerShape`; a layer without attention (a convolution or recurrent layer of a hybrid
model) has ``kind`` other than ``"attention"`` and no heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

ATTENTION = "attention"


@dataclass(frozen=True)
class LayerShape:
    """One layer's attention geometry: ``n_heads`` query heads, ``n_kv_heads`` key/value heads,
    query/key head dim ``head_dim`` and value head dim ``v_head_dim`` (the head output ``z`` is
    ``[..., n_heads, v_head_dim]``). ``kind`` is ``"attention"``, or the layer's kind (e.g.
    ``"conv"``) for a layer without attention (then all counts are 0)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None
    kind: str = ATTENTION

    def __post_init__(self) -> None:
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)

    @property
    def has_attention(self) -> bool:
        return self.kind == ATTENTION


class NonUniformShapeError(ValueError):
    """A model-wide head count or head dim was asked of a model whose layers differ."""


class ModelShape:
    """Attention geometry of a model: per stack, one :class:`LayerShape` per layer.

    ``ModelShape(n_layers, n_heads, n_kv_heads, head_dim)`` describes a model whose layers
    are all alike (one ``"self"`` stack). ``ModelShape.from_layers(stacks, default_stack)``
    describes any model: ``stacks`` maps a stack name to its layers' shapes.

    ``n_layers`` is the number of layers of the default stack (attention or not);
    ``n_heads``, ``n_kv_heads``, ``head_dim`` and ``v_head_dim`` are the values shared by every
    attention layer of the default stack, and raise :class:`NonUniformShapeError` when the layers
    differ (use :meth:`layer` then). :attr:`attention_layers` lists the default stack's layers
    that have attention.
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, v_head_dim: int | None = None):
        layer = LayerShape(int(n_heads), int(n_kv_heads), int(head_dim), None if v_head_dim is None else int(v_head_dim))
        self._init({"self": tuple(layer for _ in range(int(n_layers)))}, "self")

    @classmethod
    def from_layers(cls, stacks: Mapping[str, tuple[LayerShape, ...]], default_stack: str) -> "ModelShape":
        if default_stack not in stacks:
            raise ValueError(f"default_stack {default_stack!r} is not one of the stacks {sorted(stacks)}")
        obj = cls.__new__(cls)
        obj._init({k: tuple(v) for k, v in stacks.items()}, default_stack)
        return obj

    def _init(self, stacks: dict[str, tuple[LayerShape, ...]], default_stack: str) -> None:
        self.stacks = stacks
        self.default_stack = default_stack
        self.n_layers = len(stacks[default_stack])

    # -- per layer ---------------------------------------------------------------------------------------
    def resolve_stack(self, stack: str | None, what: str = "stack") -> str:
        """``stack`` (None = the default stack), checked to be one of the model's stacks."""
        if stack is None:
            return self.default_stack
        if not isinstance(stack, str) or stack not in self.stacks:
            raise ValueError(f"{what} must be one of the model's attention stacks {sorted(self.stacks)} (or None for "
                             f"{self.default_stack!r}), got {stack!r}")
        return stack

    def layer(self, layer: int, stack: str | None = None) -> LayerShape:
        """The shape of ``layer`` in ``stack`` (None: the default stack)."""
        stack = self.resolve_stack(stack)
        layers = self.stacks[stack]
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} out of range; the {stack!r} stack has {len(layers)} layers (0..{len(layers) - 1})")
        return layers[layer]

    def attention_layers_of(self, stack: str | None = None) -> list[int]:
        return [i for i, s in enumerate(self.stacks[self.resolve_stack(stack)]) if s.has_attention]

    @property
    def attention_layers(self) -> list[int]:
        """The default stack's layers that have attention."""
        return self.attention_layers_of(None)

    @property
    def uniform(self) -> bool:
        """Whether every attention layer of the default stack has the same shape."""
        return len({s for s in self.stacks[self.default_stack] if s.has_attention}) <= 1

    def _common(self, field: str) -> int:
        values = [getattr(s, field) for s in self.stacks[self.default_stack] if s.has_attention]
        if not values:
            raise NonUniformShapeError(f"the {self.default_stack!r} stack has no attention layers")
        if len(set(values)) > 1:
            per_layer = {i: getattr(s, field) for i, s in enumerate(self.stacks[self.default_stack]) if s.has_attention}
            raise NonUniformShapeError(
                f"this model's layers differ in {field} (per layer: {per_layer}); a model-wide {field} does not exist, "
                f"use shape.layer(l).{field} (scans over a grid of layers x heads need layers of one shape)"
            )
        return values[0]

    @property
    def n_heads(self) -> int:
        return self._common("n_heads")

    @property
    def n_kv_heads(self) -> int:
        return self._common("n_kv_heads")

    @property
    def head_dim(self) -> int:
        return self._common("head_dim")

    @property
    def v_head_dim(self) -> int:
        return self._common("v_head_dim")

    # -- value semantics -----------------------------------------------------------------------------------
    def __eq__(self, other) -> bool:
        return isinstance(other, ModelShape) and (self.stacks, self.default_stack) == (other.stacks, other.default_stack)

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.stacks.items())), self.default_stack))

    def __repr__(self) -> str:
        if len(self.stacks) == 1 and self.uniform and self.attention_layers == list(range(self.n_layers)):
            return (f"ModelShape(n_layers={self.n_layers}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                    f"head_dim={self.head_dim}, v_head_dim={self.v_head_dim})")
        return f"ModelShape(stacks={self.stacks!r}, default_stack={self.default_stack!r})"
