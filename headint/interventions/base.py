"""The :class:`Intervention` base class and the argument checks every kind shares.

Selectors, as users write them:

- ``layer``: an int (also a numpy integer or a 0-dim integer tensor);
- ``head``: an int, a list of ints (or a 1-D integer tensor / array), or ``None`` for every head;
- ``positions``: absolute token positions: an int, a list of ints (or a 1-D integer tensor),
  a bool tensor ``[T]`` or ``[B, T]`` (True = selected), or ``None`` for every position.
  Positions index the input sequence as passed to the model (padding included), also across
  ``generate()`` steps.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ..shape import LayerShape, ModelShape


def as_int(x: Any, what: str) -> int:
    """``x`` as a Python int: accepts ints, numpy integers and 0-dim integer tensors (not bools)."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool:
            return int(x)
    elif isinstance(x, numbers.Integral) and not isinstance(x, bool) and type(x).__name__ != "bool_":
        return int(x)
    raise TypeError(f"{what} must be an int (or a numpy integer / 0-dim integer tensor), got {x!r}")


def as_real(x: Any, what: str) -> float:
    """``x`` as a finite float: accepts ints, floats, numpy real scalars and 0-dim real tensors."""
    if isinstance(x, torch.Tensor):
        ok = x.dim() == 0 and x.dtype != torch.bool and not x.is_complex()
    else:
        ok = isinstance(x, numbers.Real) and not isinstance(x, bool) and type(x).__name__ != "bool_"
    if not ok:
        raise TypeError(f"{what} must be a real number (int, float, numpy scalar or 0-dim tensor), got {type(x).__name__} {x!r}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def head_list(head: Any, n: int, what: str, layer: int) -> list[int]:
    """Heads selected by ``head`` (None = all ``n``), checked against ``n`` ``what`` heads."""
    if head is None:
        return list(range(n))
    if isinstance(head, (list, tuple)) or (isinstance(head, torch.Tensor) and head.dim() == 1) or (
        hasattr(head, "ndim") and hasattr(head, "tolist") and not isinstance(head, torch.Tensor) and head.ndim == 1
    ):
        items = list(head)
    else:
        items = [head]
    hs = []
    for h in items:
        try:
            hs.append(as_int(h, "head"))
        except TypeError:
            raise TypeError(f"{what} head must be an int, a list of ints or None; got {head!r}") from None
    for h in hs:
        if not 0 <= h < n:
            raise ValueError(f"{what} head {h} out of range at layer {layer}: the model has {n} {what} heads (0..{n - 1})")
    return hs


MAX_POSITION = 2**63  # positions become int64 tensors


def positions_form(pos: Any, name: str) -> Any:
    """Normalise ``pos``: None, a bool tensor ``[T]``/``[B, T]`` or a list of non-negative ints."""
    if pos is None:
        return None
    if not isinstance(pos, torch.Tensor) and hasattr(pos, "dtype") and hasattr(pos, "ndim"):  # numpy arrays
        pos = torch.as_tensor(pos)
    if isinstance(pos, torch.Tensor) and pos.dtype == torch.bool:
        if pos.dim() not in (1, 2):
            raise ValueError(f"{name} as a bool tensor must be [T] or [B, T], got shape {list(pos.shape)}")
        return pos
    if isinstance(pos, torch.Tensor):
        if pos.dim() > 1 or pos.is_floating_point() or pos.is_complex():
            raise TypeError(f"{name} as a tensor must be bool [T] / [B, T] or integer [N] (positions), got {pos.dtype} shape {list(pos.shape)}")
        items = pos.reshape(-1).tolist()
    elif isinstance(pos, (list, tuple, range)):
        items = list(pos)
    else:
        items = [pos]
    out = []
    for p in items:
        try:
            p = as_int(p, name)
        except TypeError:
            raise TypeError(f"{name} must be non-negative ints (absolute token positions), a bool tensor or None; got {p!r}") from None
        if p < 0:
            raise ValueError(f"{name} must be non-negative ints (absolute token positions), got {p!r}")
        if p >= MAX_POSITION:
            raise ValueError(f"{name}: position {p} is beyond any sequence (positions index tokens; at most {MAX_POSITION - 1})")
        out.append(p)
    return out


class Intervention:
    """Base class of model-level interventions; subclass it to define your own kind.

    A subclass has a ``layer`` attribute (the attention layer it acts on), optionally a
    ``stack`` attribute (which attention stack ``layer`` counts in: ``"self"``,
    ``"encoder.self"``, ``"decoder.self"``, ``"decoder.cross"``, ...; None, the default, means
    the model's default stack, see :mod:`headint.shape`), and implements :meth:`lower`.
    :func:`headint.intervene` calls :meth:`validate` once, before the model is touched, then
    :meth:`lower` for every attention call at that layer of that stack (once per batch row when
    interventions are given per row).
    """

    layer: int
    stack: str | None = None

    def validate(self, shape: ModelShape) -> None:
        """Raise ``TypeError``/``ValueError`` naming the argument for input that cannot work.

        The default checks ``stack`` and ``layer`` (see :meth:`check_layer`) and, where the object
        has them, ``head`` (query heads of that layer) and ``positions``. Override to check more
        (call ``super()``).
        """
        name = type(self).__name__
        layer = self.check_layer(shape)
        if hasattr(self, "head"):
            head_list(self.head, self.layer_shape(shape).n_heads, "query", layer)
        if hasattr(self, "positions"):
            positions_form(self.positions, f"{name}.positions")

    def site(self, shape: ModelShape) -> tuple[str, int]:
        """``(stack, layer)`` this intervention acts on, the stack resolved (None: the default)."""
        return shape.resolve_stack(getattr(self, "stack", None), f"{type(self).__name__}.stack"), self.check_layer(shape)

    def layer_shape(self, shape: ModelShape) -> LayerShape:
        """The :class:`~headint.shape.LayerShape` of the layer this intervention acts on."""
        stack, layer = self.site(shape)
        return shape.layer(layer, stack)

    def check_layer(self, shape: ModelShape) -> int:
        """``self.layer`` as an int naming an attention layer of ``self.stack`` (None: the model's
        default stack), or an error naming it: out of range, or a layer without attention (in a
        hybrid model) named with its kind."""
        name = type(self).__name__
        stack = shape.resolve_stack(getattr(self, "stack", None), f"{name}.stack")
        if getattr(self, "layer", None) is None:
            raise TypeError(f"{name} needs layer= (the attention layer it acts on)")
        layer = as_int(self.layer, f"{name}.layer")
        n = len(shape.stacks[stack])
        where = "" if len(shape.stacks) == 1 else f" in the {stack!r} stack"
        if not 0 <= layer < n:
            raise ValueError(f"{name}: layer {layer} out of range; the model has {n} layers{where} (0..{n - 1})")
        ls = shape.stacks[stack][layer]
        if not ls.has_attention:
            raise ValueError(
                f"{name}: layer {layer}{where} is a {ls.kind!r} layer without attention; the layers with attention "
                f"are {shape.attention_layers_of(stack)}"
            )
        return layer

    def lower(self, call) -> None:
        """Express this intervention as edits of one attention call's operands, through the
        methods of ``call`` (a :class:`~headint.interventions.call.AttentionCall`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement lower(call) to be used as an intervention")
