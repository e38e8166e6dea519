"""Recorded activations: the :class:`ActivationCache` container, its means and its file format.

A container only: :func:`headint.record` (in :mod:`headint.integration.record`) fills one.
This module imports nothing from headint but :mod:`headint.files` and its vocabulary (:mod:`headint.vocabulary`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .files import available_memory, parse_json, regular_file
from .vocabulary import HEAD_TENSORS

RECORDABLE = HEAD_TENSORS
LAYOUTS = {
    "z": "[B, T, H, D] head outputs before the output projection",
    "q": "[B, H, T, D] queries after rotary embeddings",
    "k": "[B, Hkv, T, D] keys after rotary embeddings",
    "v": "[B, Hkv, T, D] values",
    "pattern": "[B, H, Tq, Tk] attention probabilities (before any head-output blend)",
}
_KEY = re.compile(r"^(" + "|".join(RECORDABLE) + r")\.(\d+)$")

_TL_NAME = re.compile(r"^blocks\.(\d+)\.attn\.(hook_\w+)$")
TL_NAMES = {"hook_z": "z", "hook_pattern": "pattern"}
"""TransformerLens hook names (``blocks.{layer}.attn.<name>``) that ``cache[name]`` accepts:
the same activation in the same layout. Others get a KeyError naming the headint key to use
(:data:`TL_ADVICE`)."""
TL_ADVICE = {
    "hook_q": "headint's q is [B, H, T, D], after rotary embeddings (TransformerLens' hook_rot_q for rotary models, "
              "hook_q otherwise); TransformerLens' layout [batch, pos, head, d_head] is cache['q', {layer}].transpose(1, 2)",
    "hook_k": "headint's k is [B, Hkv, T, D], after rotary embeddings (TransformerLens' hook_rot_k for rotary models, "
              "hook_k otherwise); TransformerLens' layout [batch, pos, head, d_head] is cache['k', {layer}].transpose(1, 2)",
    "hook_v": "headint's v is [B, Hkv, T, D]; TransformerLens' layout [batch, pos, head, d_head] is "
              "cache['v', {layer}].transpose(1, 2)",
    "hook_attn_scores": "headint does not record attention scores (before the softmax); record what=('pattern',) for the "
                        "probabilities, cache['pattern', {layer}] [B, H, Tq, Tk]",
    "hook_result": "headint records head outputs before the output projection: cache['z', {layer}] [B, T, H, D] "
                   "(TransformerLens' hook_z); multiply by the head's slice of W_O for hook_result",
}
TL_ADVICE["hook_rot_q"], TL_ADVICE["hook_rot_k"] = TL_ADVICE["hook_q"], TL_ADVICE["hook_k"]


class ActivationCache:
    """Per-layer activations of one run.

    ``cache["z", layer]`` (or ``cache.get("z", layer)``) is ``[B, T, H, D]``; q is
    ``[B, H, T, D]``, k and v ``[B, Hkv, T, D]``, pattern ``[B, H, Tq, Tk]`` (see :data:`LAYOUTS`).
    ``attention_mask`` ``[B, T]`` (if the run had one) lets means skip padding.

    TransformerLens names work where they mean the same tensor in the same layout:
    ``cache["blocks.0.attn.hook_z"]`` is ``cache["z", 0]`` and ``"blocks.0.attn.hook_pattern"``
    is ``cache["pattern", 0]`` (:data:`TL_NAMES`); for the others (``hook_q``, ``hook_k``,
    ``hook_v``, ``hook_attn_scores``, ``hook_result``, ...) the KeyError says which headint key
    to use and how its layout differs.
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

    def __getitem__(self, key: tuple[str, int] | str) -> torch.Tensor:
        if isinstance(key, str):
            return self.get(*self._tl_key(key))
        if not (isinstance(key, tuple) and len(key) == 2):
            raise KeyError(f"index the cache with (what, layer), e.g. cache['z', 0], or a TransformerLens name such as "
                           f"'blocks.0.attn.hook_z'; got {key!r}")
        return self.get(*key)

    def __contains__(self, key) -> bool:
        if isinstance(key, str):
            m = _TL_NAME.match(key)
            return bool(m) and m.group(2) in TL_NAMES and (TL_NAMES[m.group(2)], int(m.group(1))) in self.tensors
        return key in self.tensors

    @staticmethod
    def _tl_key(name: str) -> tuple[str, int]:
        """``(what, layer)`` of a TransformerLens hook name (:data:`TL_NAMES`), or a KeyError
        naming the headint key to use."""
        m = _TL_NAME.match(name)
        if m is None:
            raise KeyError(f"{name!r} is not a cache key: headint records the heads' {', '.join(RECORDABLE)} only; index with "
                           f"(what, layer), e.g. cache['z', 0], or a TransformerLens name blocks.<layer>.attn.hook_z / hook_pattern")
        layer, hook = int(m.group(1)), m.group(2)
        if hook in TL_NAMES:
            return TL_NAMES[hook], layer
        advice = TL_ADVICE.get(hook, f"headint records {list(RECORDABLE)} only (layouts: ActivationCache LAYOUTS)")
        raise KeyError(f"{name!r}: {advice.format(layer=layer)}")

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
        """Write ``path`` (safetensors: tensors named ``"{what}.{layer}"``, the mask as
        ``"attention_mask"``, ``meta`` as JSON under the metadata key ``"headint"``)."""
        from safetensors.torch import save_file

        data = {f"{w}.{l}": t.contiguous().cpu() for (w, l), t in self.tensors.items()}
        if self.attention_mask is not None:
            data["attention_mask"] = self.attention_mask.contiguous().cpu()
        save_file(data, str(path), metadata={"headint": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> "ActivationCache":
        """Read a file written by :meth:`save`; anything else raises ``ValueError`` naming ``path``.

        Only a regular file is opened (a FIFO or device is refused), and only one that fits in
        the host memory available now (it is read whole); its metadata must be a JSON object."""
        from safetensors import safe_open

        path = str(path)
        regular_file(path, "ActivationCache file", _load_cap())
        try:
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
                data = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated/foreign files
            raise ValueError(f"ActivationCache.load: {path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        if "headint" not in metadata:
            raise ValueError(f"ActivationCache.load: {path} was not written by ActivationCache.save (no 'headint' metadata)")
        try:
            meta = parse_json(metadata["headint"], f"{path} (its 'headint' metadata)")
        except ValueError as e:
            raise ValueError(f"ActivationCache.load: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"ActivationCache.load: {path} has 'headint' metadata that is a JSON {type(meta).__name__}; "
                             "ActivationCache.save writes an object")
        mask = data.pop("attention_mask", None)
        tensors = {}
        for k, v in data.items():
            m = _KEY.match(k)
            if m is None:
                raise ValueError(f"ActivationCache.load: {path} holds a tensor named {k!r}; expected names '<what>.<layer>' with what in {RECORDABLE}")
            tensors[(m.group(1), int(m.group(2)))] = v
        return cls(tensors, mask, meta)

    def __repr__(self) -> str:
        kinds = sorted({w for w, _ in self.tensors})
        return f"ActivationCache({kinds}, layers={self.layers()})"


def _load_cap() -> int | None:
    """The largest ActivationCache file :meth:`ActivationCache.load` reads: the host memory
    available now (the tensors are read whole); None where the system does not say."""
    return available_memory()
