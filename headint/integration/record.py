"""Recording head activations: :func:`record` runs a model once and fills an
:class:`~headint.activations.ActivationCache`; :class:`Recorder` collects from inside the
attention function."""

from __future__ import annotations

from typing import Iterable

import torch

from ..activations import RECORDABLE, ActivationCache
from .adapter import padding_position_ids
from .hf import intervene
from .replica import Replica
from .structure import model_shape
from ..tokens import check_token_ids, vocab_size

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds")


class Recorder:
    """Collects activations from inside the attention function during a run: ``tensors`` maps
    ``(what, layer)`` to the layouts of :data:`headint.activations.LAYOUTS`, for the layers of
    one attention stack (``stack``; None: the model's default stack)."""

    def __init__(self, what: Iterable[str], stack: str | None = None):
        what = tuple(what)
        self.stack = stack
        for w in what:
            if w not in RECORDABLE:
                raise ValueError(f"record: unknown activation {w!r}; choose from {RECORDABLE}")
        self.what = what
        self.tensors: dict[tuple[str, int], torch.Tensor] = {}

    def records(self, stack: str, default_stack: str) -> bool:
        """Whether calls of ``stack`` are recorded (this recorder's stack; None: the default)."""
        return stack == (self.stack or default_stack)

    def add(self, layer: int, what: str, x: torch.Tensor, concat_dim: int | None) -> None:
        if what not in self.what:
            return
        x = x.detach()
        key = (what, layer)
        if concat_dim is not None and key in self.tensors:
            x = torch.cat([self.tensors[key], x], dim=concat_dim)
        self.tensors[key] = x


def record(model, inputs, what: Iterable[str] = ("z",), *, interventions=(), backend: str = "auto", stack: str | None = None,
           **forward_kwargs) -> ActivationCache:
    """Run ``model`` once and return its per-layer head activations.

    Args:
        inputs: a ``[B, T]`` tensor of token ids, or a dict of model inputs (``input_ids``,
            ``attention_mask``, ...), e.g. a tokenizer's output.
        what: any of ``"z"``, ``"q"``, ``"k"``, ``"v"``, ``"pattern"`` (see
            :data:`headint.activations.LAYOUTS`).
        interventions: optional interventions applied during the run.
        stack: the attention stack whose layers are recorded (None: the model's default stack,
            see :mod:`headint.shape`); the cache's ``meta["stack"]`` names it, and patching
            from it on another stack is refused.
        forward_kwargs: more model inputs (e.g. ``attention_mask=``), passed to the forward.

    The attention mask (from ``inputs`` or a keyword) is stored in the cache, so means skip
    padding. For a padded batch without ``position_ids``, position ids are derived from the
    mask when the model takes them (see
    :func:`headint.integration.adapter.padding_position_ids`), so padding changes no value.
    """
    recorder = Recorder(what, stack)
    inputs, mask, resolved = _recording_inputs(model, inputs, stack, forward_kwargs)
    with torch.no_grad(), intervene(model, interventions, backend=backend, recorder=recorder):
        model(**inputs, **forward_kwargs)
    return _cache(recorder, mask, resolved, stack)


def record_in(replica: Replica, inputs, what: Iterable[str] = ("z",), *, backend: str = "auto") -> ActivationCache:
    """:func:`record` (default stack, no interventions) run in a private
    :class:`~headint.integration.replica.Replica` of the model: the model itself is only read."""
    recorder = Recorder(what)
    inputs, mask, resolved = _recording_inputs(replica.model, inputs, None, {})
    with torch.no_grad(), replica.session(None, backend, recorder):
        replica.root(**inputs)
    return _cache(recorder, mask, resolved, None)


def _recording_inputs(model, inputs, stack, forward_kwargs: dict) -> tuple[dict, torch.Tensor | None, str]:
    """``(model inputs, the recorded stack's attention mask, the stack's name)``; inputs named in
    ``forward_kwargs`` move into the inputs, and padded batches get position ids."""
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    inputs = dict(inputs)
    for k in MODEL_INPUTS:
        if k in forward_kwargs:
            if k in inputs:
                raise TypeError(f"record: {k} was given both in inputs and as a keyword")
            inputs[k] = forward_kwargs.pop(k)
    if isinstance(inputs.get("input_ids"), torch.Tensor):
        check_token_ids(inputs["input_ids"], vocab_size(model), "record: input_ids", shape="[B, T]")
    mask = inputs.get("attention_mask")
    shape = model_shape(model)
    resolved = shape.resolve_stack(stack, "record stack")
    if resolved.startswith("decoder."):  # decoder positions: the decoder's mask (if given), not the encoder's
        mask = inputs.get("decoder_attention_mask")
    if "position_ids" not in inputs:
        pos = padding_position_ids(model, mask)
        if pos is not None:
            inputs["position_ids"] = pos
    return inputs, mask, resolved


def _cache(recorder: Recorder, mask, resolved: str, stack) -> ActivationCache:
    if mask is not None:
        lengths = {t.shape[1] for (w, _), t in recorder.tensors.items() if w == "z"}
        if lengths and lengths != {mask.shape[-1]}:
            if not bool(mask.bool().all()):
                raise ValueError(
                    f"record: the attention mask covers {mask.shape[-1]} positions but the {resolved!r} stack's head outputs "
                    f"cover {sorted(lengths)}; pass the mask of that stack's inputs (e.g. decoder_attention_mask)"
                )
            mask = None  # an all-ones mask of another stack's inputs: no padding to leave out
    meta = {"what": list(recorder.what)}
    if stack is not None:
        meta["stack"] = stack
    return ActivationCache(recorder.tensors, mask, meta)
