"""What one attention call does to attention: :class:`CallPlan`, the one description of a call's edits.

Every edit kind is one field of :class:`CallPlan`, declared with :func:`edit`: the tensors it
holds (its *parts*) with the axis each tensor dim stands for, the value a part takes where a row
has no such edit (its *fill*), and the *stage* of the attention function that applies it. Every
operation on edits loops over that field list (:data:`EDITS`) instead of naming fields:

- moving to a device (:meth:`CallPlan.to`), slicing to the heads one tensor-parallel rank holds
  (:meth:`CallPlan.for_heads`: the ``hq`` / ``hkv`` axes);
- cutting plans over absolute positions to one call's queries and keys
  (:meth:`CallPlan.window`: the ``tq`` / ``tk`` axes; :class:`headint.plan.TensorPlan`);
- stacking single-row plans into one batched plan (:meth:`CallPlan.stack`: each part's fill);
- which edits a plan holds (:meth:`CallPlan.present`), which the scans' speed shortcuts compare
  with the edits they understand (allow-lists in :mod:`headint.scans.shortcuts`);
- applying them (:mod:`headint.integration.attention_function`, one handler per stage).

Axes (after the leading row axis ``Bp``, which is 1 - every row alike - or the batch):
``hq`` query heads, ``hkv`` key/value heads, ``tq`` the call's queries, ``tk`` its keys,
``dqk`` the query/key head dim, ``dv`` the value head dim. A part of size 1 on an axis
broadcasts over it.

Stages, in the order the attention function applies them (fields are declared in that order):
``inputs`` (q/k/v replaced before attention), ``operator`` (operands of
:func:`headint.attention`), ``pattern`` (attention probabilities replaced, folded into the
head-output blend), ``output`` (the attention output known in advance), ``after`` (added to the
attention output).

Adding an edit kind touches: a field here (parts, fills, stage; a new stage also needs its
handler in the attention function), the :class:`~headint.interventions.call.AttentionCall`
method that makes it (if interventions may), and, if the scans' shortcuts understand it, their
allow-lists. Moving, slicing, windowing, stacking and emptiness follow from the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterator, NamedTuple

import torch

from ..ops.knockout import EdgeKnockout

AXES = ("hq", "hkv", "tq", "tk", "dqk", "dv")
STAGES = ("inputs", "operator", "pattern", "output", "after")


@dataclass(frozen=True)
class Part:
    """One tensor of an edit: ``name`` (its attribute in the edit's value; None: the value is the
    tensor), ``axes`` (the dims after the row dim, from :data:`AXES`) and ``fill`` (what a row
    without this edit holds; None: rows cannot be filled, see :meth:`CallPlan.stack`)."""

    name: str | None
    axes: tuple[str, ...]
    fill: Any


class Replacement(NamedTuple):
    """Replace q, k or v before attention: ``select [Bp, Hx, T]`` bool, ``values [Bp, Hx, T, D]``
    (None: zeros) where selected."""

    select: torch.Tensor
    values: torch.Tensor | None


class PatternEdit(NamedTuple):
    """Replace attention probabilities: ``select [Bp, Hq, Tq]`` bool, ``probs [Bp, Hq, Tq, Tk]``;
    the selected heads' outputs at the selected queries become ``probs @ v``."""

    select: torch.Tensor
    probs: torch.Tensor


def edit(*parts: Part, stage: str, many: bool = False, value_type: Callable | None = None, operand: str | None = None,
         target: str | None = None, doc: str = ""):
    """A field of :class:`CallPlan`: an edit made of ``parts``, applied at ``stage``.

    ``many``: a list of such edits (applied together: their union or in order, per stage);
    ``value_type``: the class holding the parts (built as ``value_type(*parts)``; None: one
    tensor); ``operand``: the :func:`headint.attention` argument it is (stage ``operator``);
    ``target``: ``"q"``, ``"k"`` or ``"v"`` (stage ``inputs``)."""
    assert stage in STAGES and all(a in AXES for p in parts for a in p.axes)
    meta = dict(parts=parts, stage=stage, many=many, value_type=value_type, operand=operand, target=target, doc=doc)
    return field(default_factory=list, metadata=meta) if many else field(default=None, metadata=meta)


@dataclass
class CallPlan:
    """The edits of one attention call (``Bp`` is 1 or the call's batch), in stage order.

    q_edit / k_edit / v_edit: :class:`Replacement` of q ``[Bp, Hq, Tq(, D)]``, k or v
    ``[Bp, Hkv, Tk(, D or Dv)]`` (after rotary embeddings); score_scale ``[Bp, Hq]``: pre-softmax
    scores multiplied; knockouts: :class:`~headint.ops.EdgeKnockout` list (queries
    ``[Bp, Hq, Tq]``, keys ``[Bp, Hq, Tk]``); head_mask ``[Bp, Hq, Tq]`` float32 and head_patch
    ``[Bp, Hq, Tq, Dv]`` (None: zeros): the blend ``m * attn + (1 - m) * patch`` of
    :func:`headint.attention`; pattern_edits: :class:`PatternEdit` list (see
    :mod:`headint.integration.pattern_patch`); output ``[Bp, Hq, Tq, Dv]``: the call's attention
    output when the plan already knows it (a scan variant whose inputs to this layer are the
    clean run's, see :class:`headint.scans.shortcuts.CleanAttentionPlan`), used in place of
    computing attention; head_bias ``[Bp, Hq, Tq, Dv]``: added to the attention output.
    """

    q_edit: Replacement | None = edit(Part("select", ("hq", "tq"), False), Part("values", ("hq", "tq", "dqk"), 0.0),
                                      stage="inputs", value_type=Replacement, target="q")
    k_edit: Replacement | None = edit(Part("select", ("hkv", "tk"), False), Part("values", ("hkv", "tk", "dqk"), 0.0),
                                      stage="inputs", value_type=Replacement, target="k")
    v_edit: Replacement | None = edit(Part("select", ("hkv", "tk"), False), Part("values", ("hkv", "tk", "dv"), 0.0),
                                      stage="inputs", value_type=Replacement, target="v")
    score_scale: torch.Tensor | None = edit(Part(None, ("hq",), 1.0), stage="operator", operand="score_scale")
    knockouts: list = edit(Part("queries", ("hq", "tq"), False), Part("keys", ("hq", "tk"), False),
                           stage="operator", many=True, value_type=EdgeKnockout, operand="knockout")
    head_mask: torch.Tensor | None = edit(Part(None, ("hq", "tq"), 1.0), stage="operator", operand="head_mask")
    head_patch: torch.Tensor | None = edit(Part(None, ("hq", "tq", "dv"), 0.0), stage="operator", operand="head_patch")
    pattern_edits: list = edit(Part("select", ("hq", "tq"), False), Part("probs", ("hq", "tq", "tk"), 0.0),
                               stage="pattern", many=True, value_type=PatternEdit)
    output: torch.Tensor | None = edit(Part(None, ("hq", "tq", "dv"), None), stage="output")
    head_bias: torch.Tensor | None = edit(Part(None, ("hq", "tq", "dv"), 0.0), stage="after")

    # -- what it holds --------------------------------------------------------------------------

    def items(self) -> Iterator[tuple["EditField", Any]]:
        """``(field, value)`` of every edit present, in stage order."""
        for f in EDITS:
            x = getattr(self, f.name)
            if x is not None and not (f.many and not x):
                yield f, x

    def present(self) -> frozenset[str]:
        """The names of the edits this plan holds."""
        return frozenset(f.name for f, _ in self.items())

    @property
    def empty(self) -> bool:
        return next(self.items(), None) is None

    # -- the same edits, transformed part by part ------------------------------------------------

    def map_parts(self, fn: Callable[[Any, Part, "EditField"], Any]) -> "CallPlan":
        """A plan whose every part ``x`` (tensors, or whatever an op-level knockout holds) is
        ``fn(x, part, field)``; absent parts (None) stay absent."""
        changes = {}
        for f, x in self.items():
            if f.many:
                changes[f.name] = [f.rebuild(e, [None if p is None else fn(p, part, f) for p, part in zip(f.parts_of(e), f.parts)]) for e in x]
            else:
                changes[f.name] = f.rebuild(x, [None if p is None else fn(p, part, f) for p, part in zip(f.parts_of(x), f.parts)])
        return replace(self, **changes)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor part."""
        out: list[torch.Tensor] = []

        def collect(x, _part, _field):
            if isinstance(x, torch.Tensor):
                out.append(x)
            return x

        self.map_parts(collect)
        return out

    def to(self, device) -> "CallPlan":
        """This plan with every tensor on ``device`` (the attention call's: a model split across
        devices gets each layer's operands on that layer's device); self when all already are."""
        device = torch.device(device)
        if all(t.device == device for t in self.tensors()):
            return self
        return self.map_parts(lambda x, _p, _f: x.to(device) if isinstance(x, torch.Tensor) else x)

    def for_heads(self, q: slice, kv: slice, n_heads: int, take: Callable | None = None) -> "CallPlan":
        """The edits of the heads one tensor-parallel rank holds: query heads ``q`` and key/value
        heads ``kv`` of the global numbering (``n_heads`` query heads). A part's ``hq``/``hkv``
        dim is sliced by ``take(x, sl)`` (default ``x[:, sl]``; the attention function passes one
        whose backward sums gradients over the ranks); a head dim of size 1 broadcasts and is kept."""
        take = take or (lambda x, sl: x[:, sl])

        def heads(x, part: Part, f: EditField):
            if not part.axes or part.axes[0] not in ("hq", "hkv"):
                return x
            if not (isinstance(x, torch.Tensor) and x.dim() == 1 + len(part.axes)):
                got = f"{type(x).__name__} {list(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)
                raise ValueError(f"a tensor-parallel call needs {f.name} parts as [B, H or 1, ...] tensors "
                                 f"(axes {part.axes}), got {got}")
            if x.shape[1] == 1:
                return x
            if part.axes[0] == "hq" and x.shape[1] != n_heads:
                raise ValueError(f"{f.name}: a tensor-parallel call needs [B, {n_heads} or 1, ...] query-head parts, got {list(x.shape)}")
            return take(x, q if part.axes[0] == "hq" else kv)

        return self.map_parts(heads)

    def window(self, q_start: int, Tq: int, k_start: int, Tk: int, where: str = "plan") -> "CallPlan":
        """A plan over absolute positions cut to one call: the ``tq`` dims to queries
        ``q_start .. q_start + Tq - 1`` and the ``tk`` dims to keys ``k_start .. k_start + Tk - 1``
        (a dim of size 1 broadcasts); a dim too short is refused naming ``where``."""
        spans = {"tq": (q_start, Tq), "tk": (k_start, Tk)}

        def cut(x, part: Part, f: EditField):
            if not isinstance(x, torch.Tensor):
                return x
            for i, axis in enumerate(part.axes):
                if axis not in spans or x.shape[1 + i] == 1:
                    continue
                lo, n = spans[axis]
                if lo < 0 or x.shape[1 + i] < lo + n:
                    raise ValueError(f"{where}: {f.name} covers {x.shape[1 + i]} positions on its {axis} axis, the call needs "
                                     f"{'queries' if axis == 'tq' else 'keys'} {lo}..{lo + n - 1}")
                x = x.narrow(1 + i, lo, n)
            return x

        return self.map_parts(cut)

    @staticmethod
    def stack(plans: list["CallPlan | None"], sizes: dict[str, int]) -> "CallPlan | None":
        """Single-row plans (``Bp == 1``; None: no edit) stacked into one plan of ``len(plans)``
        rows; ``sizes`` gives every axis's length (see :func:`axis_sizes`). A row without an
        edit gets its parts' fills; an edit whose part has no fill (``output``) must be in every
        row. None when no row edits anything."""
        if all(p is None or p.empty for p in plans):
            return None
        rows = [p if p is not None else CallPlan() for p in plans]
        changes = {}
        for f in EDITS:
            values = [getattr(p, f.name) for p in rows]
            if f.many:
                n = max(len(v) for v in values)
                if n:
                    changes[f.name] = [f.stack_rows([v[i] if i < len(v) else None for v in values], sizes) for i in range(n)]
            elif any(v is not None for v in values):
                changes[f.name] = f.stack_rows(values, sizes)
        return CallPlan(**changes)


@dataclass(frozen=True)
class EditField:
    """One field of :class:`CallPlan` and its metadata (see :func:`edit`)."""

    name: str
    parts: tuple[Part, ...]
    stage: str
    many: bool
    value_type: Callable | None
    operand: str | None
    target: str | None

    def parts_of(self, value) -> list:
        if self.value_type is None:
            return [value]
        return [getattr(value, p.name) for p in self.parts]

    def rebuild(self, value, parts: list):
        if self.value_type is None:
            return parts[0]
        return self.value_type(*parts)

    def stack_rows(self, values: list, sizes: dict[str, int]):
        """One value of this edit per row (None: the row has none), stacked part by part."""
        stacked = []
        for i, part in enumerate(self.parts):
            xs = [None if v is None else self.parts_of(v)[i] for v in values]
            present = [x for x in xs if x is not None]
            if not present:
                stacked.append(None)  # every row holds the fill: the part stays absent
                continue
            if part.fill is None and len(present) != len(xs):
                raise ValueError(f"{self.name}: rows without it cannot be stacked with rows that have it")
            like = present[0]
            full = (1, *(sizes[a] for a in part.axes))
            rows = []
            for x in xs:
                if x is None:
                    rows.append(torch.full(full, part.fill, dtype=like.dtype, device=like.device))
                    continue
                try:
                    if not isinstance(x, torch.Tensor) or x.dim() > len(full) or (x.dim() == len(full) and x.shape[0] != 1):
                        raise RuntimeError
                    rows.append(x.to(device=like.device, dtype=like.dtype).expand(full))
                except RuntimeError:
                    got = list(x.shape) if isinstance(x, torch.Tensor) else repr(x)
                    raise ValueError(f"{self.name}: a per-row plan's {part.name or 'tensor'} must broadcast to "
                                     f"[1, {', '.join(part.axes)}] = {list(full)}, got {got}") from None
            stacked.append(torch.cat(rows))
        return self.rebuild(None, stacked)


EDITS: tuple[EditField, ...] = tuple(
    EditField(f.name, f.metadata["parts"], f.metadata["stage"], f.metadata["many"], f.metadata["value_type"],
              f.metadata["operand"], f.metadata["target"])
    for f in fields(CallPlan)
)
INPUT_EDITS: dict[str, str] = {f.target: f.name for f in EDITS if f.stage == "inputs"}  # "q" -> "q_edit", ...


def axis_sizes(shape, Tq: int, Tk: int) -> dict[str, int]:
    """Every axis's length for a call of ``Tq`` queries and ``Tk`` keys at a layer of ``shape``
    (a :class:`~headint.shape.LayerShape`)."""
    return dict(hq=shape.n_heads, hkv=shape.n_kv_heads, tq=Tq, tk=Tk, dqk=shape.head_dim, dv=shape.v_head_dim)


def replace_input(which: str, select: torch.Tensor, values: torch.Tensor | None) -> CallPlan:
    """A plan replacing ``which`` (``"q"``, ``"k"`` or ``"v"``) where ``select``."""
    if which not in INPUT_EDITS:
        raise ValueError(f"which must be one of {tuple(INPUT_EDITS)}, got {which!r}")
    return CallPlan(**{INPUT_EDITS[which]: Replacement(select, values)})
