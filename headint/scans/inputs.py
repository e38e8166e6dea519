"""Scan inputs: normalised batches of ``[N, ...]`` tensors, and the model's keyword inputs for
some of their rows."""

from __future__ import annotations

from typing import Any

import torch

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")  # what a forward takes
SLICED_KEYS = ("input_ids", "token_type_ids", "position_ids")  # per fed token; the mask spans the cache too


def as_batch(inputs: Any) -> dict[str, torch.Tensor]:
    """Normalise scan inputs to a dict of ``[N, ...]`` tensors with ``input_ids`` ``[N, T]`` and
    ``attention_mask`` ``[N, T]`` (all ones when missing); other tensors (``target``, ``contrast``,
    ``labels``, ``position_ids``, ...) are kept."""
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        raise TypeError("inputs must be a [N, T] tensor of token ids or a dict with 'input_ids' (and e.g. 'attention_mask', 'target', 'contrast')")
    batch = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids has shape {list(ids.shape)}; expected [N, T]")
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.ones_like(ids)
    for k, v in batch.items():
        if v.shape[0] != ids.shape[0]:
            raise ValueError(f"inputs[{k!r}] has {v.shape[0]} rows (shape {list(v.shape)}), input_ids has {ids.shape[0]}")
    return batch


def paired_batches(clean: Any, corrupt: Any, name: str = "inputs") -> tuple[dict, dict | None]:
    """Clean and (optional) corrupted inputs as batches of the same ``[N, T]``."""
    clean_b = as_batch(clean)
    corrupt_b = as_batch(corrupt) if corrupt is not None else None
    shape = tuple(clean_b["input_ids"].shape)
    if corrupt_b is not None and tuple(corrupt_b["input_ids"].shape) != shape:
        raise ValueError(f"corrupt input_ids has shape {list(corrupt_b['input_ids'].shape)}; expected {list(shape)} like {name}")
    return clean_b, corrupt_b


def rows_of(batch: dict, ex: torch.Tensor) -> dict:
    """The rows ``ex`` of every tensor of ``batch``."""
    return {k: v[ex] for k, v in batch.items()}


def model_inputs(rows: dict, start: int = 0) -> dict:
    """The model's keyword inputs for ``rows``; with ``start`` (position reuse) only the tokens
    ``>= start`` are fed, with their own position ids, and the mask still covers all ``T``."""
    out = {k: rows[k] for k in MODEL_KEYS if k in rows}
    if start:
        for k in SLICED_KEYS:
            if k in out:
                out[k] = out[k][:, start:]
    return out
