"""Inputs of the circuit methods: batches, pairing, the model's forward keywords, metric values."""

from __future__ import annotations

import inspect

import torch

from ..integration.adapter import padding_position_ids
from ..metrics import Metric, as_metric, select_logits

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def as_batch(x, name: str) -> dict:
    """``{"input_ids": [N, T], "attention_mask": [N, T], ...}`` from a ``[N, T]`` id tensor or a dict
    (other per-example entries, e.g. ``target`` / ``contrast``, are kept)."""
    if isinstance(x, torch.Tensor):
        x = {"input_ids": x}
    if not isinstance(x, dict) or not isinstance(x.get("input_ids"), torch.Tensor):
        raise TypeError(f"{name} must be a [N, T] tensor of token ids or a dict with 'input_ids'; got {type(x).__name__}")
    b = dict(x)
    ids = b["input_ids"]
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name}['input_ids'] must be integer token ids [N, T]; got {ids.dtype} {list(ids.shape)}")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"{name}['input_ids'] is empty: {list(ids.shape)}")
    mask = b.get("attention_mask")
    if mask is None:
        b["attention_mask"] = torch.ones_like(ids)
    elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}['attention_mask'] must have the shape of input_ids {list(ids.shape)}; got {got}")
    for k, v in b.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] != ids.shape[0]:
            raise ValueError(f"{name}[{k!r}] has {v.shape[0]} rows but input_ids has {ids.shape[0]} examples")
    return b


def paired(clean, corrupt, what: str = "corrupt") -> tuple[dict, dict | None]:
    """Both batches, checked to be aligned (same shape and padding); per-example keys of the
    clean batch that the corrupt one lacks (``target``...) are copied over."""
    c = as_batch(clean, "clean")
    if corrupt is None:
        return c, None
    x = as_batch(corrupt, what)
    if x["input_ids"].shape != c["input_ids"].shape:
        raise ValueError(f"{what} inputs have shape {list(x['input_ids'].shape)} but the clean inputs "
                         f"{list(c['input_ids'].shape)}; edges are patched position by position, example by example")
    if not torch.equal(x["attention_mask"].bool(), c["attention_mask"].bool()):
        raise ValueError(f"{what} inputs are padded differently from the clean inputs (their attention masks differ); "
                         "positions are patched one to one, so pad both alike")
    for k, v in c.items():
        x.setdefault(k, v)
    return c, x


def rows(batch: dict, idx: torch.Tensor) -> dict:
    """The rows ``idx`` of every per-example tensor of ``batch``."""
    n = batch["input_ids"].shape[0]
    return {k: v[idx.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v
            for k, v in batch.items()}


def forward_kwargs(model, batch: dict, device) -> dict:
    """The model's keyword inputs for ``batch``: ids, mask, position ids of a padded batch, no cache."""
    params = inspect.signature(model.forward).parameters
    kw = {"input_ids": batch["input_ids"].to(device)}
    if "attention_mask" in params:
        kw["attention_mask"] = batch["attention_mask"].to(device)
    if "position_ids" in batch:
        kw["position_ids"] = batch["position_ids"].to(device)
    else:
        pos = padding_position_ids(model, batch["attention_mask"])
        if pos is not None:
            kw["position_ids"] = pos.to(device)
    if "use_cache" in params:
        kw["use_cache"] = False
    return kw


def logits_of(out) -> torch.Tensor:
    x = getattr(out, "logits", None)
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(out, (tuple, list)) and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"the model returned {type(out).__name__}; headint.circuits needs logits")


def metric_values(metric: Metric, logits: torch.Tensor, batch: dict, clean_logits: torch.Tensor | None) -> torch.Tensor:
    """``[B]``: ``metric`` on full ``[B, T, V]`` logits (``clean_logits``: the clean run's, for
    metrics that compare with it)."""
    b = {k: v.to(logits.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    sel = select_logits(logits, metric, b)
    clean = None if clean_logits is None or not metric.needs_clean else select_logits(clean_logits.to(logits.device), metric, b)
    v = metric(sel, b, clean_logits=clean)
    if v.dim() != 1 or v.shape[0] != logits.shape[0]:
        raise ValueError(f"metric {metric.name!r} returned shape {list(v.shape)}; expected [{logits.shape[0]}]")
    return v


def resolve_metric(metric) -> Metric:
    return as_metric(metric)
