"""Which implementation runs an attention call.

Backends:
- ``"reference"``: pure PyTorch (:mod:`headint.ops.reference`), any device, the ground truth.
- ``"sdpa"``: PyTorch's fused SDPA with the head blend after it (:mod:`headint.ops.sdpa`), for
  calls without knockouts or score scales.
- ``"triton"``: the fused Triton kernels (``headint_kernels``) on CUDA tensors, or on CPU
  tensors in the Triton interpreter when ``TRITON_INTERPRET=1`` is set.
- ``"cpu"``: the native C++ kernel built from ``csrc/`` for CPU tensors.

``"auto"`` picks the fastest available one for the tensors' device. Asking for an
unavailable backend raises :class:`BackendUnavailable`; nothing falls back silently.
:func:`last_backend` says which backend ran the most recent call.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from typing import Callable

import torch

logger = logging.getLogger("headint")

BACKENDS = ("reference", "sdpa", "triton", "cpu")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run these tensors on this machine."""


# name -> (loader returning None or raising BackendUnavailable with a reason)
_LOADERS: dict[str, Callable[[], None]] = {}
_LOADED: dict[str, str | None] = {}  # name -> None when loaded, else the reason it is unavailable
_STATE = threading.local()
_AUTO_CPU: list[str] = ["sdpa", "reference"]  # the CPU order of "auto"
_CPU_RULE: list = [None]  # optional predicate(args) -> bool: where the native CPU kernel wins


def register_loader(name: str, loader: Callable[[], None]) -> None:
    """Register the function that imports/builds backend ``name`` and registers its fused impl."""
    _LOADERS[name] = loader


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(name: str) -> str | None:
    """Load a backend once; return None if usable, else why not."""
    if name not in _LOADED:
        loader = _LOADERS.get(name)
        if loader is None:
            _LOADED[name] = f"backend {name!r} is not part of this installation"
        else:
            try:
                loader()
                _LOADED[name] = None
            except BackendUnavailable as e:
                _LOADED[name] = str(e)
    return _LOADED[name]


def unavailable_reason(name: str, device: torch.device, args=None) -> str | None:
    """None if ``name`` can run tensors on ``device`` (and these ``args``, if given), else why not."""
    if name == "reference":
        return None
    if name == "sdpa":
        from .sdpa import supports

        return None if args is None else supports(args)
    if name == "triton":
        if device.type == "cpu" and not triton_interpreting():
            return (
                "backend 'triton' got CPU tensors; Triton runs on CPU only in interpreter mode: "
                "set TRITON_INTERPRET=1 before importing triton, or use backend='reference' / 'cpu'"
            )
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' does not run on {device.type} tensors"
    elif name == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs CPU tensors only, got {device.type} tensors"
    else:
        return f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}"
    return _load(name)


def auto_backend(device: torch.device, args=None) -> str:
    """The backend ``"auto"`` uses for tensors on ``device`` (and these ``args``, if given)."""
    if device.type == "cuda" and unavailable_reason("triton", device) is None:
        return "triton"
    if device.type == "cpu":
        for name in _AUTO_CPU:
            if name == "cpu" and args is not None and _CPU_RULE[0] is not None and not _CPU_RULE[0](args):
                continue
            reason = unavailable_reason(name, device, args)
            if reason is None:
                return name
            logger.debug("headint: %s backend not used on CPU (%s); trying the next", name, reason)
    return "reference"


def set_auto_cpu_preference(order: list[str], cpu_rule=None) -> None:
    """Set the order in which ``"auto"`` tries backends for CPU tensors (reference is always last).

    ``cpu_rule(args) -> bool``, if given, restricts the ``"cpu"`` kernel to the calls where it
    measured faster or leaner.
    """
    order = [o for o in order if o != "reference"] + ["reference"]
    _AUTO_CPU[:] = order
    _CPU_RULE[0] = cpu_rule


def resolve(backend: str, device: torch.device, args=None) -> str:
    """Return the concrete backend for a call, or raise BackendUnavailable."""
    if backend == "auto":
        name = auto_backend(device, args)
    else:
        name = backend
        reason = unavailable_reason(name, device, args)
        if reason is not None:
            raise BackendUnavailable(reason)
    _STATE.last = name
    logger.debug("headint.attention: backend=%s device=%s", name, device)
    return name


def last_backend() -> str | None:
    """Name of the backend that ran the most recent ``headint.attention`` call in this thread."""
    return getattr(_STATE, "last", None)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run tensors on ``device`` here."""
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def _import_backend(module: str) -> Callable[[], None]:
    def loader() -> None:
        try:
            importlib.import_module(module)
        except BackendUnavailable:
            raise
        except ImportError as e:
            raise BackendUnavailable(f"cannot import {module}: {e}") from e

    return loader


register_loader("triton", _import_backend("headint.ops.triton_backend"))
register_loader("cpu", _import_backend("headint.ops.cpu_backend"))
