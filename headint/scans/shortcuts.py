"""The exact scans' speed shortcuts: which a scan may take (:class:`Shortcuts`, an argument of
:func:`headint.scan`), the edits each one understands (allow-lists over the edits of
:mod:`headint.interventions.edits`), and the plans that enforce them.

Every shortcut gives exactly the values of a plain forward of the model under the plan; the
engine (:class:`~headint.scans.runner.VariantRunner`) runs them in a private replica of the
model (:mod:`headint.integration.replica`):

- depth reuse: a variant intervening at no layer below ``l`` replays the clean blocks ``< l``
  (checked against the plan's layers); any edit;
- position reuse: on causal models, a variant changing no position below ``p`` feeds tokens
  ``>= p`` with the clean keys/values before them as a KV cache; its attention calls hold a
  suffix of the queries, so only edits that act per absolute position are allowed
  (:data:`PER_POSITION_EDITS`);
- the final block for the last query only (``last_query``): the same, for the final layer;
- clean attention at the first intervened layer (``clean_attention``): that layer's inputs are
  the clean run's, so its attention output is the clean one blended with the replacement; only
  head-output edits (:data:`CLEAN_ATTENTION_EDITS`);
- restricted logits and the callable-metric probe (:mod:`.metric_logits`), and
  ``group_positions`` (which rows share a forward) change which values are computed, not how.

A plan whose edits a shortcut does not understand is refused at the call (``ValueError`` naming
the shortcut and the edits), never run wrong: an edit kind added later is outside every
allow-list until someone adds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..interventions.edits import CallPlan
from ..plan import Plan

# Edits that act per absolute query/key position (every part windowed by position or without a
# position axis), so a call over a suffix of the queries applies them as a full call would.
PER_POSITION_EDITS = frozenset({"q_edit", "k_edit", "v_edit", "score_scale", "knockouts", "head_mask", "head_patch",
                                "pattern_edits", "output", "head_bias"})
# Edits of the head outputs alone: the attention itself is the clean run's.
CLEAN_ATTENTION_EDITS = frozenset({"head_mask", "head_patch", "head_bias"})


@dataclass(frozen=True)
class Shortcuts:
    """The optional exact shortcuts of :func:`headint.scan` (values are identical either way;
    switch one off to measure what it saves, as ``bench/speed_paths.py`` does).

    ``clean_attention``: head-output scans take the clean attention at each variant's first
    intervened layer (and replay its q/k/v projections); ``last_query``: last-position metrics on
    causal models run the final block for the last query only.
    """

    clean_attention: bool = True
    last_query: bool = True

    @classmethod
    def of(cls, x: Any) -> "Shortcuts":
        """``x`` (a :class:`Shortcuts`, a dict of its fields, or None: all on) as a :class:`Shortcuts`."""
        if x is None:
            return cls()
        if isinstance(x, cls):
            return x
        if isinstance(x, dict):
            unknown = sorted(set(x) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"shortcuts: unknown {unknown}; expected some of {sorted(cls.__dataclass_fields__)}")
            bad = {k: v for k, v in x.items() if not isinstance(v, bool)}
            if bad:
                raise TypeError(f"shortcuts: values must be True or False, got {bad}")
            return cls(**x)
        raise TypeError(f"shortcuts must be a headint.scans.shortcuts.Shortcuts, a dict of its fields or None, got {type(x).__name__}")


NONE = Shortcuts(clean_attention=False, last_query=False)


class _Around(Plan):
    """A plan around ``plan``: the same layers and other stacks; :meth:`for_call` says what changes."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def layers(self) -> set[int]:
        return self.plan.layers()

    def for_stack_call(self, stack, layer, B, Tq, Tk, device, dtype, q_start=None, k_start=None):
        return self.plan.for_stack_call(stack, layer, B, Tq, Tk, device, dtype, q_start=q_start, k_start=k_start)


class AllowedEdits(_Around):
    """``plan``, refused (``ValueError``) at any call of ``layers`` (None: every layer) whose
    edits are not all in ``allowed``: the edits ``shortcut`` understands."""

    def __init__(self, plan: Plan, allowed: frozenset, shortcut: str, layers: set[int] | None = None):
        super().__init__(plan)
        self.allowed, self.shortcut, self.only = allowed, shortcut, layers

    def for_call(self, layer, B, Tq, Tk, device, dtype, q_start=None, k_start=None):
        call = self.plan.for_call(layer, B, Tq, Tk, device, dtype, q_start=q_start, k_start=k_start)
        if call is not None and (self.only is None or layer in self.only):
            check_edits(call, self.allowed, self.shortcut, layer)
        return call


def check_edits(call: CallPlan, allowed: frozenset, shortcut: str, layer: int) -> None:
    extra = call.present() - allowed
    if extra:
        raise ValueError(f"the {shortcut} shortcut does not understand the edits {sorted(extra)} at layer {layer} "
                         f"(it understands {sorted(allowed)}); run without it")


class CleanAttentionPlan(_Around):
    """``plan`` with the attention output of ``layer`` known: ``m * clean + (1 - m) * patch``
    from the plan's own head mask ``m`` and replacement ``patch`` and the clean run's head
    outputs ``clean`` ``[R, H, T, D]`` (absolute positions), valid when that layer's inputs are
    the clean run's. The plan at ``layer`` may only edit head outputs
    (:data:`CLEAN_ATTENTION_EDITS`, with a head mask; a head bias is kept: the attention function
    adds it to the known output as to a computed one)."""

    def __init__(self, plan: Plan, layer: int, clean: torch.Tensor):
        super().__init__(plan)
        self.layer, self.clean = layer, clean

    def for_call(self, layer, B, Tq, Tk, device, dtype, q_start=None, k_start=None):
        call = self.plan.for_call(layer, B, Tq, Tk, device, dtype, q_start=q_start, k_start=k_start)
        if layer != self.layer or call is None:
            return call
        check_edits(call, CLEAN_ATTENTION_EDITS, "clean_attention", layer)
        if call.head_mask is None:
            raise ValueError(f"clean_attention: the plan at layer {layer} must replace head outputs (a head mask)")
        q0 = Tk - Tq if q_start is None else q_start
        attn = self.clean[:, :, q0 : q0 + Tq].to(device=device, dtype=torch.float32)
        if attn.shape[0] != B or attn.shape[2] != Tq:
            raise ValueError(f"clean_attention: clean head outputs {list(self.clean.shape)} do not cover rows {B}, positions {q0}..{q0 + Tq - 1}")
        m = call.head_mask.to(device=device, dtype=torch.float32)[..., None]  # [Bp, H, Tq or 1, 1]
        out = m * attn
        if call.head_patch is not None:
            out = out + (1 - m) * call.head_patch.to(device=device, dtype=torch.float32)
        return CallPlan(output=out.to(dtype).expand(B, -1, Tq, -1), head_bias=call.head_bias)
