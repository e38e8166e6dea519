"""Plans: what the attention function applies at each layer.

A plan answers one question for the attention function: for this ``layer`` and a call
with ``B`` rows, ``Tq`` queries and ``Tk`` keys (queries at absolute positions
``q_start .. q_start + Tq - 1``, default ``Tk - Tq``), which operands apply?
(:meth:`Plan.for_call` returns a :class:`~headint.interventions.call.CallPlan`.)

- :class:`InterventionPlan` dispatches intervention objects: it groups them by site
  (attention stack and layer, see :mod:`headint.shape`) (and by
  row, when one list per batch row is given) and lets each one lower itself onto an
  :class:`~headint.interventions.call.AttentionCall`. It knows no intervention kind.
- :class:`TensorPlan` carries ready-made per-row tensors over absolute positions; scans
  build these directly for thousands of variants at once.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .interventions import AttentionCall, Intervention
from .interventions.edits import CallPlan, axis_sizes
from .ops.knockout import EdgeKnockout
from .shape import ModelShape

__all__ = ["Plan", "InterventionPlan", "TensorPlan", "CallPlan", "ModelShape"]


class Plan:
    """Base class: what to do at each layer."""

    def layers(self) -> set[int]:
        raise NotImplementedError

    def for_call(self, layer: int, B: int, Tq: int, Tk: int, device, dtype, q_start: int | None = None,
                 k_start: int | None = None) -> CallPlan | None:
        """Operands for a call at ``layer`` of the model's default attention stack whose queries sit
        at absolute positions ``q_start .. q_start+Tq-1`` (default ``Tk - Tq``) and whose keys at
        ``k_start .. k_start+Tk-1`` (default: they end with the last query; the attention function
        passes ``k_start`` only where they do not, see :mod:`headint.integration.positions`); None
        when nothing applies."""
        raise NotImplementedError

    def for_stack_call(self, stack: str, layer: int, B: int, Tq: int, Tk: int, device, dtype,
                       q_start: int | None = None, k_start: int | None = None) -> CallPlan | None:
        """Like :meth:`for_call`, for a call at ``layer`` of another attention ``stack`` (e.g.
        ``"encoder.self"``, ``"decoder.cross"``). The default: nothing applies (a plan that knows
        no stacks acts on the default stack only)."""
        return None


def check_intervention(iv: Any, shape: ModelShape) -> tuple[str, int]:
    """Validate one intervention object; return its site ``(stack, layer)``."""
    if isinstance(iv, EdgeKnockout):
        raise TypeError(
            "EdgeKnockout is the op-level selector for headint.attention(knockout=...); to knock out edges "
            "in a model, use headint.Knockout(queries, keys, layer=..., head=...)"
        )
    if not isinstance(iv, Intervention):
        raise TypeError(f"interventions must be headint.Intervention objects (Ablate, Patch, Scale, PatchQKV, Knockout "
                        f"or your own subclass); got {type(iv).__name__}")
    iv.validate(shape)
    return iv.site(shape)


class InterventionPlan(Plan):
    """Intervention objects, shared by all rows (``rows=None``) or one list per row; each
    object's ``validate(shape)`` runs here, before any model is touched."""

    def __init__(self, shape: ModelShape, shared: Sequence = (), rows: Sequence[Sequence] | None = None):
        self.shape = shape
        self.shared = [(check_intervention(iv, shape), iv) for iv in shared]
        self.rows = None if rows is None else [[(check_intervention(iv, shape), iv) for iv in r] for r in rows]
        self._cache: dict = {}

    def layers(self) -> set[int]:
        """The default stack's layers that some intervention acts on."""
        d = self.shape.default_stack
        return {l for (s, l), _ in self.shared if s == d} | {l for r in self.rows or [] for (s, l), _ in r if s == d}

    def for_call(self, layer, B, Tq, Tk, device, dtype, q_start=None, k_start=None):
        return self.for_stack_call(self.shape.default_stack, layer, B, Tq, Tk, device, dtype, q_start, k_start)

    def for_stack_call(self, stack, layer, B, Tq, Tk, device, dtype, q_start=None, k_start=None):
        q_start = Tk - Tq if q_start is None else q_start
        k_start = q_start + Tq - Tk if k_start is None else k_start
        key = (stack, layer, B, Tq, Tk, q_start, k_start, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._build((stack, layer), B, Tq, Tk, device, q_start, k_start)
        return self._cache[key]

    def _build(self, site, B, Tq, Tk, device, q_start, k_start) -> CallPlan | None:
        stack, layer = site
        if self.rows is not None and len(self.rows) != B:
            raise ValueError(f"per-row interventions were given for {len(self.rows)} rows but the batch has {B} rows")
        groups = [self.shared] if self.rows is None else [self.shared + r for r in self.rows]
        plans = []
        for i, group in enumerate(groups):
            call = AttentionCall(self.shape, layer, B, Tq, Tk, device, q_start, row=None if self.rows is None else i, stack=stack,
                                 k_start=k_start)
            for at, iv in group:
                if at == site:
                    iv.lower(call)
            plans.append(call.plan())
        if all(p.empty for p in plans):
            return None
        if len(plans) == 1:
            return plans[0]
        return CallPlan.stack(plans, axis_sizes(self.shape.layer(layer, stack), Tq, Tk))


class TensorPlan(Plan):
    """Ready-made edits per layer of the model's default attention stack, over absolute positions
    (used by scans): ``layers[l]`` is a :class:`~headint.interventions.edits.CallPlan` whose
    ``tq`` / ``tk`` axes span absolute query / key positions ``0 .. T - 1`` (or have size 1: every
    position) and whose rows are the model's batch rows (or 1: every row); each call gets the
    window of its queries and keys (:meth:`CallPlan.window`). E.g. ``head_mask [B, H, T]``,
    ``head_patch [B, H, T, Dv]``, ``knockouts`` with selectors ``[B, H, T]``, a ``v_edit``
    ``Replacement(select [B, Hkv, T], values [B or 1, Hkv, T, Dv])`` (after rotary embeddings),
    ``pattern_edits`` with probabilities ``[B or 1, H, T, T]`` (O(B*H*T^2) memory). ``T`` must
    cover every absolute position the model is run at (or be 1).
    """

    def __init__(self, layers: dict[int, CallPlan]):
        for l, spec in layers.items():
            if not isinstance(spec, CallPlan):
                raise TypeError(f"TensorPlan: layer {l} must be a CallPlan (headint.interventions.edits), got {type(spec).__name__}")
        self._layers = layers

    def layers(self) -> set[int]:
        return {l for l, spec in self._layers.items() if not spec.empty}

    def for_call(self, layer, B, Tq, Tk, device, dtype, q_start=None, k_start=None):
        spec = self._layers.get(layer)
        if spec is None or spec.empty:
            return None
        q_start = Tk - Tq if q_start is None else q_start
        k_start = q_start + Tq - Tk if k_start is None else k_start
        return spec.window(q_start, Tq, k_start, Tk, where=f"TensorPlan layer {layer}")
