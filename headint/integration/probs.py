"""Attention probabilities for ``output_attentions=True`` inside an ``intervene`` block.

``transformers`` collects ``outputs.attentions`` from the second value its attention function
returns. headint's kernels never form the probabilities, so the attention function computes them
only when the forward asks for them (:func:`wants_probs`) and returns them: the probabilities the
call attended with, interventions included (q/k/v replaced, scores scaled, edges knocked out,
patterns replaced; head-output edits such as ``Ablate``, ``Patch`` or ``Scale`` of outputs replace
what the head writes, not where it looks, so they leave them as they are). ``[B, Hq, Tq, Tk]`` in
the query's dtype, as eager attention returns them.
"""

from __future__ import annotations

import torch

from ..ops.arguments import prepare
from ..ops.reference import reference_probs


def _collecting_attentions() -> bool:
    """Whether ``transformers``' output capture collects attention weights in this forward."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers layout: rely on the keyword and the config
        return False
    collected = _active_collector.get()
    return isinstance(collected, dict) and any("attention" in k for k in collected)


def wants_probs(module, kwargs: dict) -> bool:
    """Whether this attention call must return its probabilities (``output_attentions``)."""
    if kwargs.get("output_attentions"):
        return True
    cfg = getattr(module, "config", None)
    if getattr(cfg, "output_attentions", False) is True:
        return True
    return _collecting_attentions()


def call_probs(query, key, value, *, causal, mask, scale, window, operands: dict, ops: dict,
               pattern_edits=()) -> torch.Tensor:
    """``[B, Hq, Tq, Tk]`` probabilities of one call: ``operands`` are the kernel's intervention
    arguments (``knockout``, ``score_scale``; output blends are ignored), ``ops`` its softcap and
    sinks; ``pattern_edits`` (``(select [Bp, Hq, Tq], probs [Bp, Hq, Tq, Tk])``) replace rows."""
    args = prepare(query, key, value, causal=causal, attn_mask=mask, scale=scale, window=window,
                   knockout=operands.get("knockout"), score_scale=operands.get("score_scale"), **ops)
    p = reference_probs(args)
    for sel, probs in pattern_edits:
        p = torch.where(sel.to(p.device)[..., None], probs.to(p.device, p.dtype), p)
    return p.to(query.dtype)
