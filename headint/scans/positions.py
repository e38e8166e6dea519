"""Position ids of padded scan batches: padding must never change a result.

A left-padded row's real tokens sit at columns ``T - n .. T - 1``. Without explicit
``position_ids`` a model numbers them ``T - n .. T - 1`` too, so learned absolute position
embeddings (GPT-2, BERT, ...) see other positions than when the prompt runs alone, and the
numbers change. The scans therefore pass ``position_ids`` derived from the attention mask
(the count of real tokens before each column) whenever a batch is left-padded, and refuse
left-padded batches for models whose forward takes no ``position_ids``.
"""

from __future__ import annotations

import inspect

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """``[N, T]`` positions: ``cumsum(mask) - 1`` clamped at 0, so a row's first real token is
    position 0 wherever the row's padding is (padding columns get 0 or the previous position)."""
    real = (attention_mask != 0).long()
    return (real.cumsum(dim=1) - 1).clamp_min(0)


def is_left_padded(attention_mask: torch.Tensor) -> bool:
    """Whether some row has a padding column before one of its real tokens."""
    real = attention_mask != 0
    seen_real_after = real.flip(1).cummax(dim=1).values.flip(1)  # [N, T]: a real token at or after t
    return bool((~real & seen_real_after).any())


def forward_takes_position_ids(model) -> bool:
    """Whether ``model.forward`` accepts a ``position_ids`` argument (checked on its signature)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params


def with_position_ids(model, batch: dict, name: str = "inputs", layout=None) -> dict:
    """``batch`` with ``position_ids`` ``[N, T]`` derived from its mask when it is left-padded.

    Position ids given by the caller are kept. A batch without left padding is returned as is
    (a model's default numbering is already right for it). A left-padded batch for a model
    whose forward takes no ``position_ids`` is refused: its positions would shift. ``layout``
    (the model's :class:`~headint.scans.inputs.InputLayout`): an encoder-decoder's batch holds
    the decoder's sequence (``position_ids`` are its ``decoder_position_ids``) and the encoder's
    inputs (``encoder_attention_mask``, ``encoder_position_ids``), checked the same way.
    """
    pairs = [("attention_mask", "position_ids", "input_ids")]
    if layout is not None and layout.encoder_decoder:
        pairs.append(("encoder_attention_mask", "encoder_position_ids", "encoder_input_ids"))
    for mask_key, pos_key, ids_key in pairs:
        mask = batch.get(mask_key)
        if pos_key in batch or mask is None or not is_left_padded(mask):
            continue
        takes = forward_takes_position_ids(model) if layout is None else layout.takes(pos_key)
        if not takes:
            what = pos_key if layout is None else layout.forward_name(pos_key)
            raise ValueError(
                f"{name} are left-padded{f' ({layout.forward_name(mask_key)})' if layout is not None and layout.encoder_decoder else ''}, but "
                f"{type(model).__name__}.forward takes no {what}, so padding would shift the positions of the real tokens "
                "and change the results; pad on the right instead (attention_mask 1s first), or scan prompts of equal length"
            )
        batch = {**batch, pos_key: position_ids_from_mask(mask).to(batch[ids_key].device if ids_key in batch else mask.device)}
    return batch
