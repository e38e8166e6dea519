"""Where an attention call's queries and keys sit in the sequence (absolute positions).

Interventions name absolute positions, so every attention call must know which absolute
positions its ``Tq`` queries and ``Tk`` keys are. A forward pre-hook on each sub-model
(:mod:`.session`) reads, before any layer runs:

- ``q_start``: the position of the forward's first query (``cache_position``, else the 2D
  attention mask, which covers past and new tokens in ``generate``, else the KV cache's length);
- ``kv_offsets``: for each static layer of the KV cache (a preallocated buffer of
  ``max_cache_len`` slots), the absolute position of the first key its attention will be handed
  (``Cache.get_mask_sizes(...)[1]``, the offset ``transformers`` builds that layer's attention
  mask with: column ``j`` of the mask is position ``kv_offset + j``) and the buffer's length.

From these, :func:`call_positions` places one call (``CallPositions``):

- self-attention with a dynamic cache (or none, or keys handed over by a stand-in cache such as
  the scans' last-query block): keys end with the last query;
- a static cache (``StaticCache``, its sliding-window layers, offloaded static caches) hands
  attention its whole preallocated buffer: keys ``kv_offset .. kv_offset + Tk - 1`` of which
  those after the last query are empty slots. They are cut off (they are masked for every
  query, checked on the mask; without a mask a causal call never sees them), which also keeps
  ``transformers``' prefill shortcut (no mask, SDPA's top-left aligned ``is_causal``) right;
  where the mask lets a query see one, the keys are kept and placed from ``kv_offset``. Only a
  call whose ``Tk`` is its layer's buffer length is taken for one;
- cross-attention (stack ``"cross"`` or ``"<part>.cross"``): queries are the decoder's
  positions (those of the decoder's self-attention in the same forward), keys the encoder's
  ``0 .. Tk - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def cache_kv_offsets(cache: Any) -> dict[int, tuple[int, int]]:
    """``{layer_idx: (kv_offset, buffer length)}`` for every layer of a ``transformers`` ``Cache``
    that hands attention a preallocated buffer (a static layer: ``max_cache_len`` slots, those
    after the last token empty), as it is now (before the forward updates it); empty for anything
    else (dynamic layers hand over exactly the keys up to the last query). Reads no tensor (no
    device sync)."""
    cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache: the decoder's own
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, (list, tuple)) or not hasattr(cache, "get_mask_sizes"):
        return {}
    out: dict[int, tuple[int, int]] = {}
    for i, layer in enumerate(layers):
        size = getattr(layer, "max_cache_len", None)
        if not isinstance(size, int) or isinstance(size, bool):
            continue
        try:
            _, offset = cache.get_mask_sizes(1, i)
        except (ValueError, TypeError, AttributeError, IndexError):  # a layer without keys (linear attention, ...)
            continue
        if isinstance(offset, int):
            out[i] = (offset, size)
    return out


def is_cross(stack: str | None) -> bool:
    """Whether ``stack`` names a cross-attention stack (``"cross"``, ``"decoder.cross"``, ...)."""
    return stack is not None and (stack == "cross" or stack.endswith(".cross"))


@dataclass
class CallPositions:
    """One call's placement: queries at ``q_start .. q_start + Tq - 1`` (None: unknown, the
    plan's default ``Tk - Tq`` applies), keys at ``k_start .. k_start + Tk - 1`` (None: the keys
    end with the last query), and the key/value/mask tensors the call attends over (static-cache
    slots after the last query cut off)."""

    q_start: int | None
    k_start: int | None
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None


def _masked_from(mask: torch.Tensor, n: int) -> bool:
    """Whether every column ``n..`` of the 4D mask is masked for every row and query."""
    rest = mask[..., n:]
    if rest.numel() == 0:
        return True
    if rest.dtype == torch.bool:
        return not bool(rest.any())
    return bool((rest <= torch.finfo(rest.dtype).min / 2).all()) if rest.is_floating_point() else False


def call_positions(session, module, stack: str | None, Tq: int, key: torch.Tensor, value: torch.Tensor,
                   mask: torch.Tensor | None, causal: bool) -> CallPositions:
    """Place one attention call of ``session``'s current forward (see the module docstring)."""
    q_start = session.q_start
    Tk = key.shape[2]
    if is_cross(stack):
        q = session.self_q_start if session.self_q_start is not None else (q_start if q_start is not None else 0)
        return CallPositions(q, 0, key, value, mask)
    layer_idx = getattr(module, "layer_idx", None)
    buffer = session.kv_offsets.get(layer_idx) if isinstance(layer_idx, int) else None
    kv_offset = buffer[0] if buffer is not None and buffer[1] == Tk else None  # the keys are that layer's buffer
    k_start = None
    if q_start is not None and kv_offset is not None and kv_offset <= q_start and kv_offset + Tk > q_start + Tq:
        n = q_start + Tq - kv_offset  # keys up to the last query; the rest are empty static-cache slots
        if mask is None:
            cut = causal
        else:  # one check per mask and forward (the mask is kept alive, so its storage is not reused)
            memo = (mask.data_ptr(), tuple(mask.shape), mask.stride(), mask.dtype, n)
            if memo not in session.masked_columns:
                session.masked_columns[memo] = (mask, _masked_from(mask, n))
            cut = session.masked_columns[memo][1]
        if cut:
            key, value = key[:, :, :n], value[:, :, :n]
            mask = mask[..., :n] if mask is not None else None
        else:
            k_start = kv_offset
    elif q_start is not None and q_start + Tq < Tk:  # not a forward we saw the start of
        q_start = None
    session.self_q_start = q_start if q_start is not None else key.shape[2] - Tq
    return CallPositions(q_start, k_start, key, value, mask)
