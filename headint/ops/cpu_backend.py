"""The native CPU kernel: builds ``csrc/attention_cpu.cpp`` and runs it on :class:`AttentionArgs`.

:func:`build` compiles the extension on first use (``torch.utils.cpp_extension``) into a cache
directory, loads it, and checks that the kernel's operand order matches
:meth:`AttentionArgs.operand_names`; :func:`forward` / :func:`backward` are the fused kernel
pair of backend ``"cpu"`` (its entry in :mod:`headint.ops.backends` says when it runs).

Build cache (``~/.cache/headint/`` - override with ``HEADINT_CACHE_DIR``): one directory per
*build key*, a hash of everything the binary depends on - the sources' names and contents, the
compiler flags, the compiler, torch's version, install and C++ ABI, the Python ABI and headers
and the CPU (the build uses ``-march=native``) - and of nothing else: the sources are copied into the cache
directory before building, so the generated ``build.ninja`` names paths inside it and two
checkouts or virtual environments with the same sources and toolchain share one build instead
of rebuilding in turn. Builds hold an exclusive file lock (``fcntl.flock`` on ``<dir>.lock``),
so concurrent processes wait for one build instead of corrupting it. Compiling prints one line
to stderr.

Outputs are allocated here by :func:`_alloc` and written by the kernel; set ``POISON_OUTPUTS``
to True to have them NaN-filled first, so that any element the kernel fails to write shows up.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import torch

from .arguments import AttentionArgs
from .errors import BackendUnavailable

logger = logging.getLogger("headint")

EXT_NAME = "headint_cpu_attention"
EXTRA_CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fno-math-errno"]
#: Environment variable naming another ``-march`` target than ``native`` (e.g. ``haswell`` for the
#: AVX2 code path, ``x86-64`` for SSE, ``icelake-server`` for Intel's AVX-512 tuning): for testing
#: the kernel's other vector widths and compiler tunings on one machine. Part of the build key.
MARCH_ENV = "HEADINT_CPU_MARCH"
EXTRA_LDFLAGS = ["-fopenmp"]
SOURCE_SUFFIXES = (".cpp", ".h", ".hpp")
COMPILING_MESSAGE = "headint: compiling the CPU attention kernel once (~30 s)..."

#: Testing aid: NaN-fill every output before the kernel writes it.
POISON_OUTPUTS = False

_LOCK = threading.Lock()
_LOADED: Path | None = None


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


def _sources(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.suffix in SOURCE_SUFFIXES and p.is_file())


def cache_root() -> Path:
    return Path(os.environ.get("HEADINT_CACHE_DIR", Path.home() / ".cache" / "headint"))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


_COMPILER_IDS: dict[str, str] = {}


def _compiler_id(path: str | None) -> str:
    """The compiler's path and ``--version`` banner (cached per process)."""
    if path is None:
        return "none"
    if path not in _COMPILER_IDS:
        try:
            banner = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            banner = ""
        _COMPILER_IDS[path] = f"{path}\n{banner.strip()}"
    return _COMPILER_IDS[path]


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return platform.machine() + "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def cflags() -> list[str]:
    """The compiler flags of the build: :data:`EXTRA_CFLAGS`, with ``-march=`` from
    ``HEADINT_CPU_MARCH`` when it is set."""
    march = os.environ.get(MARCH_ENV)
    flags = list(EXTRA_CFLAGS)
    if march:
        flags = [f"-march={march}" if f.startswith("-march=") else f for f in flags]
    return flags


def cpu_fingerprint() -> str:
    """The machine's architecture, CPU model name(s) and feature flags (what ``-march=native`` sees)."""
    return _cpu_fingerprint()


def cpu_model_name() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key(src: Path | None = None) -> str:
    """Hash of everything the built binary depends on, and of nothing about where ``src`` is."""
    src = source_dir() if src is None else Path(src)
    h = hashlib.sha256()

    def add(label: str, value: str | bytes) -> None:
        data = value if isinstance(value, bytes) else value.encode()
        h.update(f"{label}:{len(data)}:".encode())
        h.update(data)

    for p in _sources(src):
        add("source-name", p.name)
        add("source", p.read_bytes())
    add("cflags", " ".join(cflags()))
    add("ldflags", " ".join(EXTRA_LDFLAGS))
    add("compiler", _compiler_id(_compiler()))
    add("torch", f"{torch.__version__} {Path(torch.__file__).resolve().parent}")  # build.ninja names its headers
    add("cxx11-abi", str(torch.compiled_with_cxx11_abi()))
    add("python-abi", f"{sys.implementation.cache_tag} {sysconfig.get_config_var('SOABI')} {sysconfig.get_paths()['include']}")
    add("cpu", _cpu_fingerprint())  # -march=native: a binary is only valid on this CPU kind
    return h.hexdigest()[:16]


def build_dir(src: Path | None = None) -> Path:
    """The cache directory of the build of the sources in ``src`` (default: :func:`source_dir`)."""
    return cache_root() / f"cpu_attention_{build_key(src)}"


@contextlib.contextmanager
def exclusive(lock_path: Path):
    """An exclusive inter-process lock held while the block runs (``fcntl.flock``)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _stage_sources(src: Path, dest: Path) -> list[Path]:
    """Copy the sources into ``dest`` (the build reads them there, so its paths are the cache's)."""
    dest.mkdir(parents=True, exist_ok=True)
    staged = []
    for p in _sources(src):
        target = dest / p.name
        data = p.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            tmp = dest / f".{p.name}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target)
        staged.append(target)
    return staged


def compile_and_load(src: Path, name: str = EXT_NAME, verbose: bool = False) -> Path:
    """Build the sources of ``src`` in their cache directory (once, under the lock) and load
    the library into this process; return its path. Raises BackendUnavailable on failure."""
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
    root = build_dir(src)
    library = root / "build" / f"{name}.so"
    with exclusive(root.with_name(root.name + ".lock")):
        staged = _stage_sources(src, root / "src")
        compiling = not library.is_file()
        if compiling:
            print(COMPILING_MESSAGE, file=sys.stderr, flush=True)
            logger.info("headint: building the CPU attention kernel in %s", root)
        (root / "build").mkdir(parents=True, exist_ok=True)
        try:
            cpp_extension.load(
                name=name,
                sources=[str(p) for p in staged if p.suffix == ".cpp"],
                extra_cflags=cflags(),  # a copy: cpp_extension appends to the lists it gets
                extra_ldflags=list(EXTRA_LDFLAGS),
                build_directory=str(root / "build"),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as e:  # compiler errors, linker errors, load errors
            raise BackendUnavailable(f"backend 'cpu': building/loading the CPU attention kernel failed: {e}") from e
    return library


def build(verbose: bool = False) -> Path:
    """Build (or find in the cache) and load the kernel once per process; return the library's path.

    Raises BackendUnavailable when there is no compiler or ninja, the build fails, or the built
    kernel's operand order disagrees with :class:`AttentionArgs`.
    """
    global _LOADED
    with _LOCK:
        if _LOADED is None:
            path = compile_and_load(source_dir(), verbose=verbose)
            mismatch = operand_order_mismatch()
            if mismatch:
                raise BackendUnavailable(f"backend 'cpu': the kernel in {path} does not match AttentionArgs: {mismatch}")
            _LOADED = path
        return _LOADED


def kernel_operand_names() -> tuple[str, ...]:
    """The kernel's tensor operand order (its ``enum Operand``)."""
    return tuple(_ops().operand_names())


def kernel_scalar_names() -> tuple[str, ...]:
    """The scalar arguments of the kernel's forward op, in schema order."""
    args = [a.name for a in _ops().attention_fwd.default._schema.arguments]
    return tuple(args[args.index("operands") + 1: args.index("out")])


def operand_order_mismatch() -> str | None:
    """None when the loaded kernel's operand list and scalars match :class:`AttentionArgs`'s fields."""
    tensors, scalars = kernel_operand_names(), kernel_scalar_names()
    if tensors != AttentionArgs.operand_names():
        return f"tensor operands {tensors} != {AttentionArgs.operand_names()}"
    if scalars != AttentionArgs.scalar_names():
        return f"scalars {scalars} != {AttentionArgs.scalar_names()}"
    return None


def _alloc(shape, dtype) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.empty(shape, dtype=dtype)


def _ops():
    return torch.ops.headint_cpu


def forward(a: AttentionArgs):
    """``(out, lse, attn or None)``: see :mod:`headint.ops.fused`."""
    shape = a.output_shape
    out = _alloc(shape, a.q.dtype)
    lse = _alloc(shape[:3], torch.float32)
    attn = _alloc(shape, a.q.dtype) if a.blends else a.q.new_empty(0)
    _ops().attention_fwd(a.operands(), *a.scalars(), out, lse, attn)
    return out, lse, (attn if a.blends else None)


def backward(a: AttentionArgs, dout: torch.Tensor, attn: torch.Tensor, lse: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the present differentiable operands: see :mod:`headint.ops.fused`.

    ``grads`` handed to the kernel is indexed like the operand list: a fresh tensor at the
    operand's full shape and dtype for each present differentiable operand, empty elsewhere.
    """
    differentiable = set(AttentionArgs.differentiable_names())
    slots = [
        _alloc(tuple(x.shape), x.dtype) if (x is not None and n in differentiable) else a.q.new_empty(0)
        for n, x in zip(AttentionArgs.operand_names(), a.operands())
    ]
    _ops().attention_bwd(dout.contiguous(), attn, lse, a.operands(), *a.scalars(), slots)
    return {
        n: g for n, x, g in zip(AttentionArgs.operand_names(), a.operands(), slots)
        if x is not None and n in differentiable
    }


def vector_width() -> int:
    """Floats per SIMD vector the kernel was compiled for (16: AVX-512, 8: AVX2, 4: SSE/NEON)."""
    build()
    return int(_ops().vector_width())
