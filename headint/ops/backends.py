"""The backend table: which implementation runs an attention call.

:data:`TABLE` has one :class:`Backend` entry per backend, in the order ``"auto"`` considers them;
everything about backends reads it: ``"auto"``'s choice (:func:`auto_backend`), the error for an
unavailable backend (:class:`BackendUnavailable`, :func:`unavailable_reason`),
:func:`available_backends`, :func:`last_backend`, :func:`backend_names` (the CLI's
``--backend`` choices) and the fused op's kernels (:func:`kernel`).

Backends:

- ``"triton"``: the fused Triton kernels (``headint_kernels``) on CUDA tensors, or on CPU
  tensors in the Triton interpreter when ``TRITON_INTERPRET=1`` is set.
- ``"cpu"``: the native C++ kernel built from ``csrc/`` (:mod:`headint.ops.cpu_backend`); on CPU
  ``"auto"`` runs it for every fp32/fp16/bf16 call SDPA cannot run, and for the others where
  this machine measured it faster than SDPA (:mod:`headint.ops.cpu_choice`).
- ``"sdpa"``: PyTorch's fused SDPA with the head blend after it (:mod:`headint.ops.sdpa`), for
  calls without knockouts or score scales.
- ``"reference"``: pure PyTorch (:mod:`headint.ops.reference`), any device, the ground truth.

``"auto"`` takes the first entry (lowest ``auto_rank``) that lists the tensors' device in its
``auto_devices``, whose ``prefer`` rule accepts the call, and that is available; the reference
accepts everything. Asking for an unavailable backend raises :class:`BackendUnavailable`
naming the reason; nothing falls back silently.

Adding a backend:

1. write its implementation: either a whole-call function ``run(args) -> out`` (autograd by
   PyTorch, like ``sdpa``), or a fused kernel pair ``forward(args)`` / ``backward(args, dout,
   attn, lse)`` (see :mod:`headint.ops.fused`) returned by a ``load()`` function that raises
   :class:`BackendUnavailable` with the reason when it cannot be used here;
2. add a :class:`Backend` entry to :data:`TABLE`: devices, dtypes, the optional operands it takes, any further per-call limits
   (``limits``), and when ``auto`` prefers it (``auto_devices``, ``prefer``, ``auto_rank``);
3. add it to the conformance tests.

No other module changes: :func:`headint.attention`, the CLI and :func:`available_backends` read
the table.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from . import cpu_backend, cpu_choice
from .arguments import AttentionArgs
from .errors import BackendUnavailable, UnsupportedDtype, UnsupportedShape
from .reference import reference_attention
from .sdpa import sdpa_attention

__all__ = [
    "Backend", "Kernel", "TABLE", "BackendUnavailable", "backend_names", "entry", "kernel", "resolve",
    "auto_backend", "unavailable_reason", "available_backends", "last_backend",
]

logger = logging.getLogger("headint")

_KERNEL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_ALL_FLOATS = _KERNEL_FLOATS + (torch.float64,)


@dataclass(frozen=True)
class Kernel:
    """A fused kernel pair (signatures in :mod:`headint.ops.fused`)."""

    forward: Callable
    backward: Callable


def _never(*_) -> str | None:
    return None


def _always(*_) -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    """One row of the backend table.

    name: what ``backend=`` takes. devices: device types it runs (empty: any). dtypes: input
    dtypes it takes.
    operands: the optional operands of :class:`AttentionArgs` it takes, tensors and scalars
    (:meth:`AttentionArgs.optional_names`; None: every one).
    run: the whole call ``run(args) -> out``, for backends whose autograd is PyTorch's; or
    load: returns the :class:`Kernel` run by the fused op (raising BackendUnavailable if it
    cannot be loaded here; called once per process).
    device_limits(device) / limits(args): further reasons it cannot run (None: it can; a
    string, or a BackendUnavailable subclass instance such as UnsupportedShape).
    auto_devices: devices where ``"auto"`` considers it (``"*"``: all); prefer(args, requires_grad):
    whether ``"auto"`` takes it for such a call; auto_rank: ``"auto"`` tries lower ranks first.
    """

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    operands: frozenset[str] | None = None
    run: Callable[[AttentionArgs], torch.Tensor] | None = None
    load: Callable[[], Kernel] | None = None
    device_limits: Callable[[torch.device], str | None] = _never
    limits: Callable[[AttentionArgs], str | None] = _never
    auto_devices: tuple[str, ...] = ()
    prefer: Callable[[AttentionArgs, bool], bool] = _always
    auto_rank: int = 0


# --------------------------------------------------------------------------------------------
# triton
# --------------------------------------------------------------------------------------------

TRITON_MAX_HEAD_DIM = 256


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_device_limits(device: torch.device) -> str | None:
    if device.type == "cpu" and not triton_interpreting():
        return (
            "backend 'triton' got CPU tensors; Triton runs on CPU only in interpreter mode: "
            "set TRITON_INTERPRET=1 before importing triton, or use backend='reference' / 'cpu'"
        )
    return None


def _triton_limits(a: AttentionArgs) -> UnsupportedShape | None:
    for name, x in (("q", a.q), ("v", a.v)):
        if x.shape[-1] > TRITON_MAX_HEAD_DIM:
            return UnsupportedShape(
                f"backend 'triton' supports head dims up to {TRITON_MAX_HEAD_DIM}, got {name} of shape {list(x.shape)}"
            )
    return None


def _load_triton() -> Kernel:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        raise BackendUnavailable(f"backend 'triton' needs the triton package, which cannot be imported: {e}") from e
    try:
        launch = importlib.import_module("headint_kernels.launch")
    except ImportError as e:
        raise BackendUnavailable(
            f"backend 'triton': the kernel package headint_kernels cannot be imported ({e}); "
            "install headint from a source checkout (pip install -e .)"
        ) from e
    except Exception as e:  # triton API mismatch at kernel definition time
        raise BackendUnavailable(f"backend 'triton': defining the Triton kernels failed with this triton: {e}") from e
    return Kernel(launch.attention_forward, launch.attention_backward)


# --------------------------------------------------------------------------------------------
# cpu: when "auto" runs the native kernel
# --------------------------------------------------------------------------------------------

def _cpu_kernel_preferred(a: AttentionArgs, requires_grad: bool) -> bool:
    """Should ``"auto"`` run this call with the native CPU kernel? (``HEADINT_CPU_KERNEL=0``: never)

    fp64 stays off the kernel (it computes in fp32, the reference and SDPA in fp64). A
    fp32/fp16/bf16 call that SDPA cannot run (knockouts, score scales, sinks, soft-capping,
    additive masks) goes to the kernel: it is faster than the reference in every measured shape
    (``bench/bench_cpu_attention.py``), decoding included. A call SDPA can run too goes to
    whichever of the two this machine runs faster, as measured once per CPU, torch version,
    kernel build and thread count (:mod:`headint.ops.cpu_choice`; ``HEADINT_AUTO_CPU`` overrides).
    """
    if os.environ.get("HEADINT_CPU_KERNEL", "1") == "0":
        return False
    if a.q.dtype not in _KERNEL_FLOATS:
        return False
    if _args_problem(_BY_NAME["sdpa"], a) is not None or isinstance(_load(_BY_NAME["cpu"]), str):
        return True  # SDPA cannot run it (or the kernel is unavailable: auto then says why and moves on)
    return cpu_choice.kernel_faster(a, requires_grad)


def _load_cpu() -> Kernel:
    cpu_backend.build()
    return Kernel(cpu_backend.forward, cpu_backend.backward)


# --------------------------------------------------------------------------------------------
# sdpa
# --------------------------------------------------------------------------------------------


def _sdpa_limits(a: AttentionArgs) -> str | None:
    if a.mask is not None and a.mask.dtype != torch.bool:
        return "backend 'sdpa' runs bool masks only (an additive mask may remove every key of a row)"
    return None


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

TABLE: tuple[Backend, ...] = (
    Backend(name="reference", devices=(), dtypes=_ALL_FLOATS, run=reference_attention, auto_devices=("*",), auto_rank=3),
    Backend(
        name="sdpa", devices=(), dtypes=_ALL_FLOATS, operands=frozenset({"mask", "head_mask", "head_patch", "window"}),
        run=sdpa_attention, limits=_sdpa_limits, auto_devices=("cpu",), auto_rank=2,
    ),
    Backend(
        name="triton", devices=("cuda", "cpu"), dtypes=_KERNEL_FLOATS, load=_load_triton,
        device_limits=_triton_device_limits, limits=_triton_limits, auto_devices=("cuda",), auto_rank=0,
    ),
    Backend(
        name="cpu", devices=("cpu",), dtypes=_ALL_FLOATS, load=_load_cpu,
        auto_devices=("cpu",), prefer=_cpu_kernel_preferred, auto_rank=1,
    ),
)

_BY_NAME = {b.name: b for b in TABLE}
_STATE = threading.local()
_LOADED: dict[str, Kernel | str] = {}  # name -> its Kernel, or why it cannot be loaded
_LOAD_LOCK = threading.Lock()


def backend_names() -> tuple[str, ...]:
    """Every value ``backend=`` takes: ``"auto"``, then the table's backends in table order
    (``("auto", "reference", "sdpa", "triton", "cpu")``)."""
    return ("auto",) + tuple(b.name for b in TABLE)


def entry(name: str) -> Backend:
    """The table entry of backend ``name``; BackendUnavailable for an unknown name."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {backend_names()}") from None


def _load(b: Backend) -> Kernel | str:
    """Load a kernel backend once per process: its Kernel, or why it cannot be loaded."""
    with _LOAD_LOCK:
        if b.name not in _LOADED:
            try:
                _LOADED[b.name] = b.load()
            except BackendUnavailable as e:
                _LOADED[b.name] = str(e)
        return _LOADED[b.name]


def kernel(name: str) -> Kernel:
    """The loaded :class:`Kernel` of a fused backend (used by :mod:`headint.ops.fused`)."""
    b = entry(name)
    if b.load is None:
        raise BackendUnavailable(f"backend {name!r} has no fused kernel")
    k = _load(b)
    if isinstance(k, str):
        raise BackendUnavailable(k)
    return k


def _device_problem(b: Backend, device: torch.device) -> BackendUnavailable | None:
    if b.devices and device.type not in b.devices:
        return BackendUnavailable(f"backend {b.name!r} runs {'/'.join(b.devices)} tensors, got {device.type} tensors")
    return _as_error(b.device_limits(device))


def _args_problem(b: Backend, a: AttentionArgs) -> BackendUnavailable | None:
    if a.q.dtype not in b.dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in b.dtypes)
        return UnsupportedDtype(f"backend {b.name!r} takes {names} inputs, got q of dtype {a.q.dtype}")
    if b.operands is not None:
        for name in AttentionArgs.optional_names():
            if getattr(a, name) is not None and name not in b.operands:
                what = _OPERAND_WORDS.get(name, name)
                return BackendUnavailable(f"backend {b.name!r} does not support {what} (use 'reference', 'cpu' or 'triton')")
    return _as_error(b.limits(a))


def _as_error(reason) -> BackendUnavailable | None:
    if reason is None or isinstance(reason, BackendUnavailable):
        return reason
    return BackendUnavailable(reason)


_OPERAND_WORDS = {
    "q_bits": "compact knockouts", "k_bits": "compact knockouts", "sinks": "attention sinks (sinks)",
    "softcap": "logit soft-capping (softcap)", "window": "sliding windows (window)",
}


def _problem(name: str, device: torch.device, args: AttentionArgs | None) -> BackendUnavailable | None:
    """Why backend ``name`` cannot run tensors on ``device`` (and these ``args``, if given), or None."""
    try:
        b = entry(name)
    except BackendUnavailable as e:
        return e
    problem = _device_problem(b, torch.device(device))
    if problem is None and args is not None:
        problem = _args_problem(b, args)
    if problem is None and b.load is not None:
        loaded = _load(b)
        problem = BackendUnavailable(loaded) if isinstance(loaded, str) else None
    return problem


def unavailable_reason(name: str, device: torch.device, args: AttentionArgs | None = None) -> str | None:
    """None if backend ``name`` can run tensors on ``device`` (and these ``args``, if given), else why not."""
    problem = _problem(name, device, args)
    return None if problem is None else str(problem)


def auto_backend(device: torch.device, args: AttentionArgs | None = None, requires_grad: bool = False) -> str:
    """The backend ``"auto"`` uses for a call on ``device`` (with these canonical ``args``).

    The first table entry (by ``auto_rank``) that lists the device in ``auto_devices``, whose ``prefer`` rule takes
    the call and that can run it. Without ``args`` only the device decides.
    """
    device = torch.device(device)
    for b in sorted(TABLE, key=lambda b: b.auto_rank):
        if device.type not in b.auto_devices and "*" not in b.auto_devices:
            continue
        if args is not None and not b.prefer(args, requires_grad):
            continue
        reason = unavailable_reason(b.name, device, args)
        if reason is None:
            return b.name
        logger.debug("headint: auto skips backend %s: %s", b.name, reason)
    return "reference"


def resolve(backend: str, device: torch.device, args: AttentionArgs | None = None, requires_grad: bool = False) -> Backend:
    """The table entry that runs a call, or raise BackendUnavailable; records :func:`last_backend`."""
    if backend == "auto":
        name = auto_backend(device, args, requires_grad)
    else:
        name = entry(backend).name
        problem = _problem(name, device, args)
        if problem is not None:
            raise problem
    if not torch.compiler.is_compiling():  # keep torch.compile graphs whole
        _STATE.last = name
        logger.debug("headint.attention: backend=%s device=%s", name, device)
    return _BY_NAME[name]


def last_backend() -> str | None:
    """Name of the backend that ran the most recent ``headint.attention`` call in this thread."""
    return getattr(_STATE, "last", None)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run tensors on ``device`` here."""
    device = torch.device(device)
    return [n for n in backend_names()[1:] if unavailable_reason(n, device) is None]
