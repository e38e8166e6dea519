"""The native CPU backend: the C++ fused attention kernel from ``csrc/attention_cpu.cpp``.

Importing this module builds the extension on first use (``torch.utils.cpp_extension``, cached
under ``~/.cache/headint/`` - override with ``HEADINT_CACHE_DIR``), registers the fused
implementation as backend ``"cpu"`` and tells ``backend="auto"`` where to use it
(:func:`prefer_cpu_kernel`).  It raises :class:`~headint.ops.backends.BackendUnavailable` with
the reason when the kernel cannot be built or loaded (no C++ compiler, no ninja, a failed build).

Outputs are allocated here by :func:`_alloc` and written by the kernel; set ``POISON_OUTPUTS``
to True to have them NaN-filled first, so that any element the kernel fails to write shows up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

from .backends import BackendUnavailable
from .fused import register_impl

logger = logging.getLogger("headint")

EXT_NAME = "headint_cpu_attention"
EXTRA_CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fno-math-errno"]
EXTRA_LDFLAGS = ["-fopenmp"]

#: Testing aid: NaN-fill every output before the kernel writes it.
POISON_OUTPUTS = False

_LOCK = threading.Lock()
_LOADED = False


def source_dir() -> Path:
    """The ``csrc/`` directory holding the kernel sources.

    It sits next to the ``headint`` package in a source checkout (``<repo>/csrc``); an installed
    wheel may ship it inside the package (``headint/csrc``). ``HEADINT_CSRC`` overrides both.
    """
    env = os.environ.get("HEADINT_CSRC")
    candidates = [Path(env)] if env else []
    pkg = Path(__file__).resolve().parent.parent  # .../headint
    candidates += [pkg.parent / "csrc", pkg / "csrc"]
    for c in candidates:
        if (c / "attention_cpu.cpp").is_file():
            return c
    raise BackendUnavailable(
        "backend 'cpu': the kernel source csrc/attention_cpu.cpp was not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); install headint from a source checkout or set HEADINT_CSRC"
    )


def _sources() -> list[Path]:
    d = source_dir()
    return sorted(p for p in d.iterdir() if p.suffix in (".cpp", ".h", ".hpp")) or [d / "attention_cpu.cpp"]


def _build_dir() -> Path:
    h = hashlib.sha256()
    for p in _sources():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(" ".join(EXTRA_CFLAGS).encode())
    h.update(_cpu_fingerprint().encode())  # -march=native: a binary is only valid on this CPU kind
    root = Path(os.environ.get("HEADINT_CACHE_DIR", Path.home() / ".cache" / "headint"))
    return root / f"cpu_attention_{h.hexdigest()[:16]}"


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return platform.machine() + "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx)


def build(verbose: bool = False) -> Path:
    """Build (or find in the cache) and load the extension; return the shared library's path.

    Raises BackendUnavailable when there is no compiler or ninja, or the build fails.
    """
    global _LOADED
    with _LOCK:
        if _LOADED:
            return _library_path()
        if _compiler() is None:
            raise BackendUnavailable(
                f"backend 'cpu' needs a C++ compiler to build its kernel, and {os.environ.get('CXX', 'c++')!r} "
                "was not found (install g++ or clang, or set CXX)"
            )
        from torch.utils import cpp_extension

        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError as e:
            raise BackendUnavailable(f"backend 'cpu' needs ninja to build its kernel: {e} (pip install ninja)") from e
        build_dir = _build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        cached = (build_dir / f"{EXT_NAME}.so").is_file()
        if not cached:
            msg = "headint: compiling the CPU attention kernel (first use, ~1 min)..."
            logger.info(msg)
            print(msg, file=sys.stderr, flush=True)
        try:
            cpp_extension.load(
                name=EXT_NAME,
                sources=[str(p) for p in _sources() if p.suffix == ".cpp"],
                extra_cflags=EXTRA_CFLAGS,
                extra_ldflags=EXTRA_LDFLAGS,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as e:  # compiler errors, linker errors, load errors
            raise BackendUnavailable(f"backend 'cpu': building/loading the CPU attention kernel failed: {e}") from e
        if not cached:
            logger.info("headint: CPU attention kernel built in %s", build_dir)
        _LOADED = True
        return _library_path()


def _library_path() -> Path:
    return _build_dir() / f"{EXT_NAME}.so"


def _alloc(shape, dtype) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.empty(shape, dtype=dtype)


def _ops():
    return torch.ops.headint_cpu


class CpuImpl:
    """The fused implementation of backend ``"cpu"`` (signatures: see :mod:`headint.ops.fused`)."""

    @staticmethod
    def forward(q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, scale, causal, window):
        B, H, T, D = q.shape
        out = _alloc((B, H, T, D), q.dtype)
        lse = _alloc((B, H, T), torch.float32)
        attn = _alloc((B, H, T, D), q.dtype) if head_mask is not None else q.new_empty(0)
        _ops().attention_fwd(
            q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale,
            float(scale), bool(causal), int(window), out, lse, attn,
        )
        return out, lse, attn

    @staticmethod
    def backward(dout, q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, scale, causal, window,
                 attn, lse):
        B, H, T, _ = q.shape
        dq = _alloc(tuple(q.shape), q.dtype)
        dk = _alloc(tuple(k.shape), k.dtype)
        dv = _alloc(tuple(v.shape), v.dtype)
        dm = _alloc((B, H, T), torch.float32) if head_mask is not None else q.new_empty(0, dtype=torch.float32)
        dss = _alloc((B, H), torch.float32) if score_scale is not None else q.new_empty(0, dtype=torch.float32)
        _ops().attention_bwd(
            dout, q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale,
            float(scale), bool(causal), int(window), attn, lse, dq, dk, dv, dm, dss,
        )
        return dq, dk, dv, dm, dss


def vector_width() -> int:
    """Floats per SIMD vector the kernel was compiled for (16: AVX-512, 8: AVX2, 4: SSE/NEON)."""
    return int(_ops().vector_width())


def prefer_cpu_kernel(args, requires_grad: bool) -> bool:
    """Should ``backend="auto"`` run these canonical :class:`AttentionArgs` with this kernel?

    Measured with ``bench/bench_cpu_attention.py`` (B=1, H=8, D=64, causal; T = 256 ... 8192;
    no intervention / per-row head masks / compact knockouts; forward and forward+backward) and
    small decoding shapes: the kernel is faster than the reference in every fp32/fp16/bf16 case
    (2.4-6x at T=256, growing with T; fp16/bf16 5-40x since the reference's low-precision CPU
    matmuls are slow) and its extra memory is O(T * D) instead of O(H * T^2).  The exceptions:

    * fp64: the kernel computes in fp32, the reference in fp64 - keep fp64 on the reference;
    * single-query decoding against a long cache without grad (Tq == 1, Tk >= 2048): the
      reference's matrix-vector products are ~10% faster there.
    """
    q, k = args.q, args.k
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    Tq, Tk = q.shape[2], k.shape[2]
    if not requires_grad and Tq <= _DECODE_MAX_TQ and Tk >= _DECODE_MIN_TK:
        return False
    return True


# decoding shapes left to the reference (see prefer_cpu_kernel)
_DECODE_MAX_TQ = 1
_DECODE_MIN_TK = 2048


build()
register_impl("cpu", CpuImpl())
