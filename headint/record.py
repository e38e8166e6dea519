"""Recording head activations: :func:`record` and :class:`ActivationCache`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

RECORDABLE = ("z", "q", "k", "v", "pattern")
LAYOUTS = {
    "z": "[B, T, H, D] head outputs before the output projection",
    "q": "[B, H, T, D] queries after rotary embeddings",
    "k": "[B, Hkv, T, D] keys after rotary embeddings",
    "v": "[B, Hkv, T, D] values",
    "pattern": "[B, H, Tq, Tk] attention probabilities (before any head-output blend)",
}


class ActivationCache:
    """Per-layer activations of one run.

    ``cache["z", layer]`` (or ``cache.get("z", layer)``) is ``[B, T, H, D]``; q is
    ``[B, H, T, D]``, k and v ``[B, Hkv, T, D]``, pattern ``[B, H, Tq, Tk]``.
    ``attention_mask`` ``[B, T]`` (if the run had one) lets means skip padding.
    """

    def __init__(self, tensors: dict[tuple[str, int], torch.Tensor] | None = None, attention_mask: torch.Tensor | None = None, meta: dict | None = None):
        self.tensors: dict[tuple[str, int], torch.Tensor] = dict(tensors or {})
        self.attention_mask = attention_mask
        self.meta = dict(meta or {})

    def get(self, what: str, layer: int) -> torch.Tensor:
        try:
            return self.tensors[(what, layer)]
        except KeyError:
            have = sorted({w for w, _ in self.tensors})
            raise KeyError(f"cache has no {what!r} for layer {layer}; it holds {have} for layers {self.layers()} (record with what=({what!r},))") from None

    __getitem__ = lambda self, key: self.get(*key)  # noqa: E731

    def layers(self) -> list[int]:
        return sorted({l for _, l in self.tensors})

    def mean_z(self, layer: int, over_positions: bool = False) -> torch.Tensor:
        """Mean head output over the batch: ``[T, H, D]``, or ``[H, D]`` if ``over_positions``.

        Padding positions (``attention_mask == 0``) are left out of the mean.
        """
        z = self.get("z", layer).float()
        if self.attention_mask is None:
            w = torch.ones(z.shape[:2], device=z.device)
        else:
            w = self.attention_mask.to(z.device, torch.float32)
        if over_positions:
            return (z * w[..., None, None]).sum((0, 1)) / w.sum().clamp_min(1)
        return (z * w[..., None, None]).sum(0) / w.sum(0).clamp_min(1)[:, None, None]

    def save(self, path: str | Path) -> None:
        """Write ``path`` (safetensors) with the tensors and metadata."""
        data = {f"{w}.{l}": t.contiguous().cpu() for (w, l), t in self.tensors.items()}
        if self.attention_mask is not None:
            data["attention_mask"] = self.attention_mask.contiguous().cpu()
        save_file(data, str(path), metadata={"headint": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> "ActivationCache":
        from safetensors import safe_open

        data = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("headint", "{}"))
        mask = data.pop("attention_mask", None)
        tensors = {(k.split(".")[0], int(k.split(".")[1])): v for k, v in data.items()}
        return cls(tensors, mask, meta)

    def __repr__(self) -> str:
        kinds = sorted({w for w, _ in self.tensors})
        return f"ActivationCache({kinds}, layers={self.layers()})"


class Recorder:
    """Collects activations from inside the attention function during a run."""

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
        what: any of ``"z"``, ``"q"``, ``"k"``, ``"v"``, ``"pattern"`` (see :data:`LAYOUTS`).
        interventions: optional interventions applied during the run.
    """
    from .integration.hf import intervene

    recorder = Recorder(what)
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    inputs = dict(inputs)
    with torch.no_grad(), intervene(model, interventions, backend=backend, recorder=recorder):
        model(**inputs, **forward_kwargs)
    return ActivationCache(recorder.tensors, inputs.get("attention_mask"), {"what": list(recorder.what)})
