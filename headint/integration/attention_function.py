"""The attention function headint registers in ``transformers`` as ``"headint"``.

It only translates: it finds the calling thread's session for the calling module and the
module's site ``(stack, layer)``, asks the session's :class:`~headint.plan.Plan` for this call's
operands (:meth:`~headint.plan.Plan.for_call` for the default stack,
:meth:`~headint.plan.Plan.for_stack_call` for the others), applies q/k/v edits, calls
:func:`headint.attention` (or takes the plan's known output), adds the plan's head bias, and hands the head outputs to the
session's recorder. The operands are moved to the call's device (models split across
devices); under tensor parallelism (:func:`headint.distributed.head_shard`) they are sliced to
the heads this rank holds, and recordings are gathered to every head.
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


def _apply_qkv_edits(edits, q, k, v):
    tensors = {"q": q, "k": k, "v": v}
    for which, sel, values in edits:
        x = tensors[which]
        tensors[which] = torch.where(sel.to(x.device)[..., None], values.to(x.device, x.dtype), x)
    return tensors["q"], tensors["k"], tensors["v"]


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
    kw: dict[str, Any] = {}
    if plan is not None:
        if plan.qkv_edits:
            query, key, value = _apply_qkv_edits(plan.qkv_edits, query, key, value)
        kw = dict(head_mask=plan.head_mask, head_patch=plan.head_patch, score_scale=plan.score_scale, knockout=plan.knockouts or None)
        if plan.pattern_edits:
            kw["head_mask"], kw["head_patch"] = apply_pattern_edits(plan.pattern_edits, value, plan.head_mask, plan.head_patch)
    if plan is not None and plan.output is not None:  # known from a clean run (see CallPlan.output)
        want = (B, query.shape[1], Tq, value.shape[-1])
        if tuple(plan.output.shape) != want:
            raise ValueError(f"the plan's output for layer {layer} has shape {list(plan.output.shape)}; expected {list(want)}")
        out = plan.output.to(query.dtype)
    else:
        out = attention(query, key, value, causal=causal, attn_mask=mask, scale=scaling, window=window, backend=session.backend, **kw, **ops)
    if plan is not None and plan.head_bias is not None:
        out = out + plan.head_bias.to(out.device, out.dtype)

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
