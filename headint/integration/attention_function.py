"""The attention function headint registers in ``transformers`` as ``"headint"``.

It only translates: it finds the calling thread's session for the calling module and the
module's site ``(stack, layer)``, asks the session's :class:`~headint.plan.Plan` for this call's
edits (:meth:`~headint.plan.Plan.for_call` for the default stack,
:meth:`~headint.plan.Plan.for_stack_call` for the others), applies them stage by stage (one
handler per stage of :mod:`headint.interventions.edits`: q/k/v replaced, operator arguments,
pattern replacement, a known output, what is added after), calls :func:`headint.attention` (or
takes the plan's known output), and hands the head outputs to the session's recorder. The
edits are moved to the call's device (models split across devices); under tensor parallelism
(:func:`headint.distributed.head_shard`) they are sliced to the heads this rank holds, and
recordings are gathered to every head.
"""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import gather_heads, head_shard, is_active, take_heads
from ..ops.arguments import prepare
from ..ops.attention import attention
from ..ops.reference import reference_probs
from .masks import headint_mask
from .pattern_patch import apply_pattern_edits
from .positions import call_positions
from .probs import call_probs, wants_probs
from .session import ATTN_NAME, current_session, switched_by_any_session


def register() -> None:
    """Register the attention function (and SDPA's mask builder under the same name, see :mod:`.masks`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, headint_attention_forward)
    if ALL_MASK_ATTENTION_FUNCTIONS.get(ATTN_NAME) is not headint_mask:
        AttentionMaskInterface.register(ATTN_NAME, headint_mask)


class _Applied:
    """A call's q/k/v and operator arguments with a plan's edits applied, stage by stage (see
    :mod:`headint.interventions.edits`: each field's stage picks its handler)."""

    def __init__(self, query, key, value):
        self.inputs = {"q": query, "k": key, "v": value}
        self.operands: dict[str, Any] = {}
        self.output: torch.Tensor | None = None  # known attention output [B, Hq, Tq, Dv]
        self.after: list = []  # added to the attention output

    def inputs_stage(self, f, r) -> None:  # q/k/v replaced before attention
        x = self.inputs[f.target]
        sel = r.select.to(x.device)[..., None]
        self.inputs[f.target] = x.masked_fill(sel, 0) if r.values is None else torch.where(sel, r.values.to(x.device, x.dtype), x)

    def operator_stage(self, f, x) -> None:  # an argument of headint.attention
        self.operands[f.operand] = x

    def pattern_stage(self, f, edits) -> None:  # probabilities replaced: folded into the head-output blend
        self.operands["head_mask"], self.operands["head_patch"] = apply_pattern_edits(
            edits, self.inputs["v"], self.operands.get("head_mask"), self.operands.get("head_patch"))

    def output_stage(self, f, x) -> None:
        self.output = x

    def after_stage(self, f, x) -> None:
        self.after.append(x)


def _apply(plan, query, key, value) -> _Applied:
    applied = _Applied(query, key, value)
    for f, x in plan.items():
        getattr(applied, f"{f.stage}_stage")(f, x)
    return applied


def headint_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Query ``[B, Hq, Tq, D]``, key ``[B, Hkv, Tk, D]``, value ``[B, Hkv, Tk, Dv]``; returns
    ``([B, Tq, Hq, Dv], probs)`` as ``transformers`` expects (``probs`` ``[B, Hq, Tq, Tk]`` only when
    the forward asks for attention weights, see :mod:`.probs`; else None). ``softcap`` (Gemma 2) and ``s_aux``
    (gpt-oss's per-head sinks) become the ``softcap`` / ``sinks`` operands."""
    session = current_session(module)
    if session is None and not switched_by_any_session(module):
        raise RuntimeError(
            f"{type(module).__name__} called headint's attention outside headint.intervene(); "
            "set the model's attn_implementation back to a transformers one"
        )
    model_name = type(session.model).__name__ if session is not None else type(module).__name__
    if dropout and dropout > 0:
        raise ValueError(f"headint attention does not implement attention dropout (dropout={dropout}); call model.eval()")
    ops = dict(softcap=softcap, sinks=kwargs.get("s_aux"))  # Gemma 2's soft-cap, gpt-oss's per-head sinks
    B, Hq, Tq, D = query.shape
    Tk = key.shape[2]

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    window = None
    if mask is not None:
        mask = mask[:, :, :, :Tk]
        causal = False  # the mask already carries causality and windows
    else:
        window = sliding_window

    if session is None:  # another thread's session switched the model: this forward is not intervened
        out = attention(query, key, value, causal=causal, attn_mask=mask, scale=scaling, window=window, backend="auto", **ops)
        weights = call_probs(query, key, value, causal=causal, mask=mask, scale=scaling, window=window, operands={}, ops=ops) \
            if wants_probs(module, kwargs) else None
        return out.transpose(1, 2).contiguous(), weights

    session.calls += 1
    site = session.site_of(module)
    stack, layer = site if site is not None else (None, None)
    placed = call_positions(session, module, stack, Tq, key, value, mask, causal)  # absolute query/key positions
    key, value, mask, q_start = placed.key, placed.value, placed.mask, placed.q_start
    Tk = key.shape[2]
    at = {"q_start": q_start} if placed.k_start is None else {"q_start": q_start, "k_start": placed.k_start}
    shard = None  # tensor parallel: this rank holds a slice of the heads; plans name global heads
    if layer is not None and is_active():
        shape = session.structure.shape
        shard = head_shard(module, Hq, key.shape[1], shape.n_heads, shape.n_kv_heads)
    plan = None
    if session.plan is not None and site is not None:
        if stack == session.structure.shape.default_stack:
            plan = session.plan.for_call(layer, B, Tq, Tk, query.device, query.dtype, **at)
        else:
            plan = session.plan.for_stack_call(stack, layer, B, Tq, Tk, query.device, query.dtype, **at)
        if plan is not None:
            plan = plan.to(query.device)
            if shard is not None:
                plan = plan.for_heads(shard.q, shard.kv, shape.n_heads, take=lambda x, sl: take_heads(x, sl, shard))
    applied = _apply(plan, query, key, value) if plan is not None else _Applied(query, key, value)
    query, key, value = applied.inputs["q"], applied.inputs["k"], applied.inputs["v"]
    kw = applied.operands
    if applied.output is not None:  # known from a clean run (see CallPlan.output)
        want = (B, query.shape[1], Tq, value.shape[-1])
        if tuple(applied.output.shape) != want:
            raise ValueError(f"the plan's output for layer {layer} has shape {list(applied.output.shape)}; expected {list(want)}")
        out = applied.output.to(query.dtype)
    else:
        out = attention(query, key, value, causal=causal, attn_mask=mask, scale=scaling, window=window, backend=session.backend, **kw, **ops)
    for x in applied.after:
        out = out + x.to(out.device, out.dtype)

    if session.observer is not None:
        session.observer(module, query, key, value, out.transpose(1, 2), kwargs)
    rec = session.recorder
    if rec is not None and site is not None and rec.records(stack, session.structure.shape.default_stack):
        def full(x, dim):  # every rank records all heads (a collective under tensor parallelism)
            return x if shard is None else gather_heads(x, dim, shard)

        for what, x, dim, concat in (("z", out.transpose(1, 2), 2, 1), ("q", query, 1, 2), ("k", key, 1, None), ("v", value, 1, None)):
            if what in rec.what:
                rec.add(layer, what, full(x, dim), concat_dim=concat)
        if "pattern" in rec.what:
            args = prepare(query, key, value, causal=causal, attn_mask=mask, scale=scaling, window=window,
                           knockout=kw.get("knockout"), score_scale=kw.get("score_scale"), **ops)
            rec.add(layer, "pattern", full(reference_probs(args), 1), concat_dim=None)
    weights = None
    if wants_probs(module, kwargs):  # output_attentions=True: the probabilities this call attended with
        weights = call_probs(query, key, value, causal=causal, mask=mask, scale=scaling, window=window, operands=kw, ops=ops,
                             pattern_edits=plan.pattern_edits if plan is not None else ())
    return out.transpose(1, 2).contiguous(), weights
