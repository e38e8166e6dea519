"""Scan inputs: normalised batches of ``[N, ...]`` tensors, and the model's keyword inputs for
some of their rows.

A scan batch is a dict of tensors with ``N`` rows each. Two entries are always there and name the
sequence the scan runs over - the tokens of the model's default attention stack, whose logits the
metric reads: ``input_ids`` ``[N, T]`` and ``attention_mask`` ``[N, T]`` (ones when not given).
Everything else is kept: what the model's forward takes is passed to it (:class:`InputLayout`),
split by rows like the ids; the rest (``target``, ``contrast``, ``labels``, ...) is for metrics.

Which inputs reach the model (:func:`input_layout`): every batch entry named like an explicit
parameter of the model's ``forward`` - ``token_type_ids``, ``position_ids``, ``pixel_values``,
image masks and sizes, ... - except ``labels`` (read by metrics; a model given labels would also
compute its own loss, and an encoder-decoder would build its decoder inputs from them). Every
input is split by rows, so an input must have ``N`` rows (``pixel_values [N, C, H, W]``); one
that does not (flattened image patches with a grid, as Qwen2-VL takes them) is refused naming it.

Encoder-decoder models (``config.is_encoder_decoder``): the scanned stack is the decoder, so the
batch's ``input_ids`` / ``attention_mask`` / ``position_ids`` are the decoder's
(``decoder_input_ids`` etc. as given) and the encoder's are kept as ``encoder_input_ids`` /
``encoder_attention_mask`` / ``encoder_position_ids`` (the user's ``input_ids`` etc.); metrics see
the decoder's sequence as ``input_ids``, the one their logits are over. :meth:`InputLayout.batch`
does this renaming and :meth:`InputLayout.model_inputs` undoes it for the forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")  # taken by a forward that lists none
SLICED_KEYS = ("input_ids", "token_type_ids", "position_ids")  # per fed token; the mask spans the cache too
NOT_FED = ("labels",)  # for metrics: never passed to the model
# an encoder-decoder's inputs as the user names them -> their names in a scan batch (decoder: the scanned sequence)
ENCODER_DECODER = {
    "decoder_input_ids": "input_ids", "decoder_attention_mask": "attention_mask", "decoder_position_ids": "position_ids",
    "input_ids": "encoder_input_ids", "attention_mask": "encoder_attention_mask", "position_ids": "encoder_position_ids",
}


def as_batch(inputs: Any) -> dict[str, torch.Tensor]:
    """Normalise scan inputs to a dict of ``[N, ...]`` tensors with ``input_ids`` ``[N, T]`` and
    ``attention_mask`` ``[N, T]`` (all ones when missing); other tensors (``target``, ``contrast``,
    ``labels``, ``position_ids``, ``pixel_values``, ...) are kept."""
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
        if v.dim() == 0 or v.shape[0] != ids.shape[0]:
            raise ValueError(f"inputs[{k!r}] has shape {list(v.shape)}, but input_ids has {ids.shape[0]} rows: scans split every "
                             "input by rows, so each must have one row per example (an input that is not per example, such as "
                             "flattened image patches with a grid, cannot be split)")
    return batch


@dataclass(frozen=True)
class InputLayout:
    """How a scan batch reaches one model's forward (see the module docstring).

    ``model``: its class name; ``params``: the forward's explicit keyword parameters;
    ``any_keywords``: it also takes ``**kwargs``; ``encoder_decoder``: the batch's sequence is
    the decoder's (inputs renamed, :data:`ENCODER_DECODER`)."""

    model: str
    params: frozenset[str]
    any_keywords: bool
    encoder_decoder: bool

    def takes(self, key: str) -> bool:
        """Whether the batch entry ``key`` (its scan-batch name) is passed to the forward."""
        if key in NOT_FED:
            return False
        return self.forward_name(key) in self.params or (self.any_keywords and key in MODEL_KEYS and not self.encoder_decoder)

    def forward_name(self, key: str) -> str:
        """The forward keyword of the batch entry ``key``."""
        if self.encoder_decoder:
            back = {v: k for k, v in ENCODER_DECODER.items()}
            return back.get(key, key)
        return key

    def batch(self, inputs: Any, name: str = "inputs") -> dict[str, torch.Tensor]:
        """``inputs`` as a scan batch (:func:`as_batch`; an encoder-decoder's renamed so the
        batch's sequence is the decoder's). An encoder-decoder needs ``decoder_input_ids``."""
        if isinstance(inputs, dict):
            names = {k: ENCODER_DECODER.get(k, k) for k in inputs} if self.encoder_decoder else {k: k for k in inputs}
            odd = sorted(k for k, v in inputs.items() if not isinstance(v, torch.Tensor) and self.takes(names[k]))
            if odd:
                raise TypeError(f"{name}: {odd} ({', '.join(type(inputs[k]).__name__ for k in odd)}) are inputs of "
                                f"{self.model}.forward but not tensors: scans split every input by rows, so pass them as "
                                "tensors with one row per example")
        if not self.encoder_decoder:
            return as_batch(inputs)
        if not isinstance(inputs, dict) or not isinstance(inputs.get("decoder_input_ids"), torch.Tensor):
            raise TypeError(
                f"{name}: {self.model} is an encoder-decoder model, whose scans run over its decoder's sequence (the heads of "
                "its decoder's self-attention, the logits of the decoder's tokens), so inputs must be a dict with "
                "'decoder_input_ids' [N, T] (and 'decoder_attention_mask' for padded rows) beside the encoder's 'input_ids' "
                "(and 'attention_mask')")
        clash = sorted(k for k in inputs if k in ("encoder_input_ids", "encoder_attention_mask", "encoder_position_ids"))
        if clash:
            raise ValueError(f"{name}: {clash} are the names scans give the encoder's inputs of {self.model}; pass them as "
                             "'input_ids' / 'attention_mask' / 'position_ids'")
        renamed = {ENCODER_DECODER.get(k, k): v for k, v in inputs.items()}
        return as_batch(renamed)

    def model_inputs(self, rows: dict, start: int = 0) -> dict:
        """The forward's keyword inputs for ``rows`` (a scan batch's rows); with ``start``
        (position reuse) only the tokens ``>= start`` are fed, and the mask still covers all ``T``."""
        out = {self.forward_name(k): (v[:, start:] if start and k in SLICED_KEYS else v) for k, v in rows.items() if self.takes(k)}
        return out

    def reusable(self, batch: dict) -> bool:
        """Whether a forward fed the tokens from a position on (position reuse) gets every input it
        takes cut alike: only per-token inputs of the sequence (:data:`SLICED_KEYS`) and the mask,
        and not an encoder-decoder (its encoder's inputs are not the sequence's)."""
        return not self.encoder_decoder and all(k in SLICED_KEYS or k == "attention_mask" for k in batch if self.takes(k))


def input_layout(model) -> InputLayout:
    """The :class:`InputLayout` of ``model`` (read from its ``forward``'s signature and config)."""
    names, any_kw = _parameters(model.forward)
    inner = getattr(model, "get_base_model", None)  # a wrapper (PEFT) whose forward passes **kwargs on to the model's
    if any_kw and callable(inner):
        try:
            names |= _parameters(inner().forward)[0]
        except Exception:  # noqa: BLE001 - a get_base_model of another kind: its own forward's names only
            pass
    config = getattr(model, "config", None)
    return InputLayout(type(model).__name__, names, any_kw, bool(getattr(config, "is_encoder_decoder", False)))


def _parameters(forward) -> tuple[frozenset[str], bool]:
    """The keyword parameter names of ``forward`` and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return frozenset(MODEL_KEYS), False
    names = frozenset(n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names, any(p.kind == p.VAR_KEYWORD for p in params.values())


def paired_batches(clean: Any, corrupt: Any, name: str = "inputs", layout: InputLayout | None = None) -> tuple[dict, dict | None]:
    """Clean and (optional) corrupted inputs as batches (``layout``: the model's, see
    :meth:`InputLayout.batch`) with sequences of the same ``[N, T]``."""
    make = (lambda x, n: as_batch(x)) if layout is None else layout.batch
    clean_b = make(clean, name)
    corrupt_b = make(corrupt, "corrupt") if corrupt is not None else None
    shape = tuple(clean_b["input_ids"].shape)
    if corrupt_b is not None and tuple(corrupt_b["input_ids"].shape) != shape:
        what = "decoder_input_ids" if layout is not None and layout.encoder_decoder else "input_ids"
        raise ValueError(f"corrupt {what} has shape {list(corrupt_b['input_ids'].shape)}; expected {list(shape)} like {name}")
    return clean_b, corrupt_b


def rows_of(batch: dict, ex: torch.Tensor) -> dict:
    """The rows ``ex`` of every tensor of ``batch``."""
    return {k: v[ex] for k, v in batch.items()}
