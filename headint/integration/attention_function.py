"""The attention function headint registers in ``transformers`` as ``"headint"``.

It only translates: it finds the calling thread's session for the calling module, asks the
session's :class:`~headint.plan.Plan` for this call's operands, applies q/k/v edits, calls
:func:`headint.attention`, adds the plan's head bias, and hands the head outputs to the
session's recorder.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops.arguments import prepare
from ..ops.attention import attention
from ..ops.reference import reference_probs
from .session import ATTN_NAME, current_session, switched_by_any_session


def register() -> None:
    """Register the attention function (and SDPA's mask builder under the same name)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, headint_attention_forward)
    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


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
    ``([B, Tq, Hq, Dv], None)`` as ``transformers`` expects. ``softcap`` (Gemma 2) and ``s_aux``
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
        return out.transpose(1, 2).contiguous(), None

    session.calls += 1
    layer = session.layer_of(module)
    q_start = session.q_start
    if q_start is not None and q_start + Tq < Tk:  # not a forward we saw the start of
        q_start = None
    plan = None
    if session.plan is not None and layer is not None:
        plan = session.plan.for_call(layer, B, Tq, Tk, query.device, query.dtype, q_start=q_start)
    kw: dict[str, Any] = {}
    if plan is not None:
        if plan.qkv_edits:
            query, key, value = _apply_qkv_edits(plan.qkv_edits, query, key, value)
        kw = dict(head_mask=plan.head_mask, head_patch=plan.head_patch, score_scale=plan.score_scale, knockout=plan.knockouts or None)
    out = attention(query, key, value, causal=causal, attn_mask=mask, scale=scaling, window=window, backend=session.backend, **kw, **ops)
    if plan is not None and plan.head_bias is not None:
        out = out + plan.head_bias.to(out.device, out.dtype)

    rec = session.recorder
    if rec is not None and layer is not None:
        rec.add(layer, "z", out.transpose(1, 2), concat_dim=1)
        rec.add(layer, "q", query, concat_dim=2)
        rec.add(layer, "k", key, concat_dim=None)
        rec.add(layer, "v", value, concat_dim=None)
        if "pattern" in rec.what:
            args = prepare(query, key, value, causal=causal, attn_mask=mask, scale=scaling, window=window,
                           knockout=kw.get("knockout"), score_scale=kw.get("score_scale"), **ops)
            rec.add(layer, "pattern", reference_probs(args), concat_dim=None)
    return out.transpose(1, 2).contiguous(), None
