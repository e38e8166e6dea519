"""Attention geometry of a model, as plain numbers.

:class:`ModelShape` is built from a model by
:func:`headint.integration.adapter.model_shape` (the one place that reads configs);
everything below the integration only reads its fields.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """Attention geometry: ``n_layers`` attention layers, each with ``n_heads`` query heads,
    ``n_kv_heads`` key/value heads (fewer under grouped-query attention), query/key head dim
    ``head_dim`` and value head dim ``v_head_dim`` (default ``head_dim``; smaller in DeepSeek's MLA).
    Head outputs - what ablation, patching and scaling replace - have the value head dim."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None

    def __post_init__(self):
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)
