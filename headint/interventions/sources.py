"""Where replacement values come from: an :class:`~headint.activations.ActivationCache` or a tensor."""

from __future__ import annotations

from typing import Any

import torch

from ..activations import ActivationCache


def check_source_stack(x: Any, stack: str, default_stack: str, what: str) -> None:
    """A cache recorded on one attention stack cannot patch another: refuse naming both."""
    if isinstance(x, ActivationCache):
        recorded = x.meta.get("stack") or default_stack
        if recorded != stack:
            raise ValueError(f"{what} was recorded on the {recorded!r} attention stack, but the intervention acts on the "
                             f"{stack!r} stack; record with stack={stack!r}")


def z_source(x: Any, layer: int, what: str) -> torch.Tensor:
    """A recorded head output for ``layer`` as ``[Bs, T, H, D]``."""
    if isinstance(x, ActivationCache):
        return x.get("z", layer)
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{what} must be an ActivationCache or a tensor, got {type(x).__name__}")


def qkv_source(x: Any, which: str, layer: int, what: str) -> torch.Tensor:
    """A recorded q/k/v for ``layer`` as ``[Bs, Hx, T, D]``."""
    if isinstance(x, ActivationCache):
        return x.get(which, layer)
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{what} must be an ActivationCache or a tensor [B, H, T, D], got {type(x).__name__}")


def mean_source(x: Any, layer: int) -> torch.Tensor:
    """The mean head output for ``layer`` as ``[1, T, H, D]`` (``T`` 1 = every position)."""
    if isinstance(x, ActivationCache):
        return x.mean_z(layer)[None]
    if isinstance(x, torch.Tensor):
        if x.dim() == 2:
            return x[None, None]
        if x.dim() == 3:
            return x[None]
        raise ValueError(f"Ablate mean value for layer {layer} has shape {list(x.shape)}; expected [H, D] or [T, H, D]")
    raise TypeError("Ablate(kind='mean') needs value=: an ActivationCache from headint.record or a mean tensor [H, D] / [T, H, D]")
