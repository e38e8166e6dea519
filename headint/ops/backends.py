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


def _cpu_kernel_wins(args, requires_grad: bool) -> bool:
    """Whether the native CPU kernel should run this call under ``"auto"`` (measured rule in
    :func:`headint.ops.cpu_backend.prefer_cpu_kernel`); False if it cannot be built here."""
    if os.environ.get("HEADINT_CPU_KERNEL", "1") == "0":
        return False
    reason = unavailable_reason("cpu", torch.device("cpu"))
    if reason is not None:
        logger.debug("headint: CPU kernel unavailable (%s); auto uses PyTorch on CPU", reason)
        return False
    from . import cpu_backend

    return bool(cpu_backend.prefer_cpu_kernel(args, requires_grad))


def auto_backend(device: torch.device, args=None, requires_grad: bool = False) -> str:
    """The backend ``"auto"`` uses for a call on ``device`` (with these canonical ``args``).

    CUDA: the Triton kernels. CPU: the native kernel where ``bench/RESULTS.md`` measured it
    faster (see :func:`_cpu_kernel_wins`; ``HEADINT_CPU_KERNEL=0`` turns it off); otherwise
    PyTorch's SDPA when the call has no knockouts or score scales; otherwise the reference.
    """
    if device.type == "cuda" and unavailable_reason("triton", device) is None:
        if args is None or args.q.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return "triton"
        return "reference"  # the kernels take fp16/bf16/fp32
    if device.type == "cpu" and args is not None:
        if _cpu_kernel_wins(args, requires_grad):
            return "cpu"
        if unavailable_reason("sdpa", device, args) is None:
            return "sdpa"
    return "reference"


def resolve(backend: str, device: torch.device, args=None, requires_grad: bool = False) -> str:
    """Return the concrete backend for a call, or raise BackendUnavailable."""
    if backend == "auto":
        name = auto_backend(device, args, requires_grad)
    else:
        name = backend
        reason = unavailable_reason(name, device, args)
        if reason is not None:
            raise BackendUnavailable(reason)
    if not torch.compiler.is_compiling():  # keep torch.compile graphs whole
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
