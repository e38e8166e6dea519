"""Recording head activations: :func:`record` runs a model once and fills an
:class:`~headint.activations.ActivationCache`; :class:`Recorder` collects from inside the
attention function."""

from __future__ import annotations

from typing import Iterable

import torch

from ..activations import RECORDABLE, ActivationCache
from .adapter import padding_position_ids
from .hf import intervene

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds")


class Recorder:
    """Collects activations from inside the attention function during a run: ``tensors`` maps
    ``(what, layer)`` to the layouts of :data:`headint.activations.LAYOUTS`."""

    def __init__(self, what: Iterable[str]):
        what = tuple(what)
        for w in what:
            if w not in RECORDABLE:
                raise ValueError(f"record: unknown activation {w!r}; choose from {RECORDABLE}")
        self.what = what
        self.tensors: dict[tuple[str, int], torch.Tensor] = {}

    def add(self, layer: int, what: str, x: torch.Tensor, concat_dim: int | None) -> None:
        if what not in self.what:
            return
        x = x.detach()
        key = (what, layer)
        if concat_dim is not None and key in self.tensors:
            x = torch.cat([self.tensors[key], x], dim=concat_dim)
        self.tensors[key] = x


def record(model, inputs, what: Iterable[str] = ("z",), *, interventions=(), backend: str = "auto", **forward_kwargs) -> ActivationCache:
    """Run ``model`` once and return its per-layer head activations.

    Args:
        inputs: a ``[B, T]`` tensor of token ids, or a dict of model inputs (``input_ids``,
            ``attention_mask``, ...), e.g. a tokenizer's output.
        what: any of ``"z"``, ``"q"``, ``"k"``, ``"v"``, ``"pattern"`` (see
            :data:`headint.activations.LAYOUTS`).
        interventions: optional interventions applied during the run.
        forward_kwargs: more model inputs (e.g. ``attention_mask=``), passed to the forward.

    The attention mask (from ``inputs`` or a keyword) is stored in the cache, so means skip
    padding. For a padded batch without ``position_ids``, position ids are derived from the
    mask when the model takes them (see
    :func:`headint.integration.adapter.padding_position_ids`), so padding changes no value.
    """
    recorder = Recorder(what)
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    inputs = dict(inputs)
    for k in MODEL_INPUTS:
        if k in forward_kwargs:
            if k in inputs:
                raise TypeError(f"record: {k} was given both in inputs and as a keyword")
            inputs[k] = forward_kwargs.pop(k)
    mask = inputs.get("attention_mask")
    if "position_ids" not in inputs:
        pos = padding_position_ids(model, mask)
        if pos is not None:
            inputs["position_ids"] = pos
    with torch.no_grad(), intervene(model, interventions, backend=backend, recorder=recorder):
        model(**inputs, **forward_kwargs)
    return ActivationCache(recorder.tensors, mask, {"what": list(recorder.what)})
