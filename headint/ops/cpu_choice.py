"""``"auto"`` on CPU: the native kernel or SDPA, whichever this machine runs faster.

Every CPU call with interventions SDPA cannot run (compact knockouts, score scales, sinks,
soft-capping, additive masks) goes to the native kernel (backend ``"cpu"``). For a call both can
run (no intervention, head masks / patches, bool masks, windows) ``"auto"`` asks
:func:`kernel_faster`, which reads a table measured once on this machine:

- **what is timed**: both backends on the same probe calls - B=1, H=2, D=64, causal,
  ``T`` in :data:`PROBE_T`, the call's dtype and its mode (forward alone, or forward + backward
  through autograd) - interleaved, :data:`REPEATS` times each after one warm-up, on one intra-op
  thread and in CPU time of that thread (so that other processes on a shared machine do not
  decide it: wall time on two threads of a loaded machine swings by 2x); each keeps its fastest
  run. Both backends split a call over (batch, head, block) alike, so their ratio on one thread
  is their ratio on several;
- **what is kept**: per (dtype, mode, probe T), both times and whether the kernel's is at most
  :data:`KERNEL_BIAS` times SDPA's (a tie goes to the kernel, so that a call computes the same way
  with and without an intervention);
- **how a call is matched**: to the probe T nearest its key length in log scale (decoding
  included: the kernel's cost and SDPA's grow alike with the keys);
- **when**: the first time a (dtype, mode) pair is needed in a process whose cache has no entry
  for it: one line on stderr, ~1-2 s; then from memory;
- **where**: ``<cache>/auto_cpu_<key>.json`` next to the kernel's builds (``~/.cache/headint``,
  ``HEADINT_CACHE_DIR``: :mod:`headint.ops.cpu_backend`), ``key`` a hash of the CPU (model name
  and flags), torch's version and the kernel's build key (a changed kernel is measured again);
  concurrent processes measure one at a time (a file lock) and share the file.

``HEADINT_AUTO_CPU`` overrides the measurement: ``kernel`` (the kernel wherever it can run),
``sdpa`` (SDPA wherever it can run), ``measure`` (the default). ``HEADINT_CPU_KERNEL=0`` keeps
``"auto"`` off the kernel altogether (see :mod:`headint.ops.backends`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch

from . import cpu_backend
from .arguments import AttentionArgs, prepare
from .sdpa import sdpa_attention

logger = logging.getLogger("headint")

ENV = "HEADINT_AUTO_CPU"
MODES = ("measure", "kernel", "sdpa")
#: key lengths of the probe calls
PROBE_T = (256, 1024, 4096)
PROBE_B, PROBE_H, PROBE_D = 1, 2, 64
REPEATS = 3
#: the kernel is kept where its time is at most this factor of SDPA's
KERNEL_BIAS = 1.02
MEASURING_MESSAGE = "headint: timing the CPU kernel against SDPA once on this machine ({what}, ~2 s)..."

_LOCK = threading.Lock()
_TABLES: dict[str, dict] = {}  # cache file path -> its contents
_ENTRIES: dict[tuple[str, str], dict] = {}  # (HEADINT_CACHE_DIR, "dtype/mode") -> the table's entry


def mode() -> str:
    """``HEADINT_AUTO_CPU``: ``measure`` (default), ``kernel`` or ``sdpa``."""
    value = os.environ.get(ENV, "measure").strip().lower() or "measure"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}; expected one of {MODES}")
    return value


def table_key() -> str:
    """Hash of what the measured table depends on: the CPU, torch, the kernel build."""
    h = hashlib.sha256()
    for part in (cpu_backend.cpu_fingerprint(), torch.__version__, cpu_backend.build_key()):
        h.update(f"{len(part)}:{part}".encode())
    return h.hexdigest()[:16]


def table_path() -> Path:
    return cpu_backend.cache_root() / f"auto_cpu_{table_key()}.json"


def _entry_name(dtype: torch.dtype, grad: bool) -> str:
    return f"{str(dtype).replace('torch.', '')}/{'fwdbwd' if grad else 'fwd'}"


def nearest_probe(tk: int, probes=None) -> int:
    """The probe key length nearest ``tk`` in log scale."""
    probes = PROBE_T if probes is None else probes
    return min(probes, key=lambda p: abs(math.log(max(tk, 1)) - math.log(p)))


def kernel_faster(a: AttentionArgs, requires_grad: bool) -> bool:
    """Should ``"auto"`` run this call (which SDPA could run too) with the native kernel?"""
    m = mode()
    if m != "measure":
        return m == "kernel"
    entry = measured(a.q.dtype, requires_grad)
    row = entry["rows"][str(nearest_probe(a.k.shape[2], [int(t) for t in entry["rows"]]))]
    return bool(row["kernel"])


def measured(dtype: torch.dtype, grad: bool) -> dict:
    """The table's entry for (dtype, mode): ``{"rows": {T: {"cpu_s", "sdpa_s", "kernel"}}, ...}``,
    measured now if the cache does not hold it yet. After the first call per (dtype, mode) and
    cache root, a dictionary lookup (the table's key hashes the kernel's sources and reads
    ``/proc/cpuinfo``: once per process, not per attention call)."""
    name = _entry_name(dtype, grad)
    memo_key = (os.environ.get("HEADINT_CACHE_DIR", ""), name)  # the cache root, cheaply
    entry = _ENTRIES.get(memo_key)
    if entry is not None:
        return entry
    path = table_path()
    with _LOCK:
        table = _TABLES.get(str(path))
        if table is None or name not in table["entries"]:
            with cpu_backend.exclusive(path.with_name(path.name + ".lock")):
                table = _read(path)
                if name not in table["entries"]:
                    print(MEASURING_MESSAGE.format(what=name), file=sys.stderr, flush=True)
                    table["entries"][name] = measure(dtype, grad)
                    _write(path, table)
            _TABLES[str(path)] = table
        _ENTRIES[memo_key] = table["entries"][name]
        return _ENTRIES[memo_key]


def _read(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
        if isinstance(table.get("entries"), dict):
            return table
    except (OSError, ValueError):
        pass
    return {"cpu": cpu_backend.cpu_model_name(), "torch": torch.__version__, "kernel_build": cpu_backend.build_key(),
            "entries": {}}


def _write(path: Path, table: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _probe(T: int, dtype: torch.dtype, grad: bool):
    """One probe call per backend: ``{"cpu": step, "sdpa": step}``."""
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(PROBE_B, PROBE_H, T, PROBE_D, generator=g).to(dtype).requires_grad_(grad) for _ in range(3))
    dout = torch.randn(PROBE_B, PROBE_H, T, PROBE_D, generator=g).to(dtype)
    a = prepare(q, k, v, causal=True)

    def kernel():
        tensors, present, scalars = a.flatten()
        return torch.ops.headint.attention_fwd(tensors, present, *scalars, "cpu")[0]

    def step(fn):
        def run():
            if grad:
                q.grad = k.grad = v.grad = None
                fn().backward(dout)
            else:
                with torch.no_grad():
                    fn()

        return run

    return {"cpu": step(kernel), "sdpa": step(lambda: sdpa_attention(a))}


def measure(dtype: torch.dtype, grad: bool, probes=None, repeats: int | None = None) -> dict:
    """Time both backends on the probe calls (see the module docstring); the table's entry."""
    probes = PROBE_T if probes is None else probes
    repeats = REPEATS if repeats is None else repeats
    cpu_backend.build()
    rows = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for T in probes:
            steps = _probe(T, dtype, grad)
            best = {name: math.inf for name in steps}
            for name in steps:
                steps[name]()  # warm-up
            for r in range(repeats):
                for name in (steps if r % 2 == 0 else reversed(list(steps))):
                    t0 = time.thread_time()
                    steps[name]()
                    best[name] = min(best[name], time.thread_time() - t0)
            rows[str(T)] = {"cpu_s": best["cpu"], "sdpa_s": best["sdpa"], "kernel": best["cpu"] <= KERNEL_BIAS * best["sdpa"]}
            logger.info("headint: auto on CPU, %s T=%d: kernel %.2f ms, SDPA %.2f ms", _entry_name(dtype, grad), T,
                        1e3 * best["cpu"], 1e3 * best["sdpa"])
    finally:
        torch.set_num_threads(threads)
    return {"rows": rows, "probe": dict(B=PROBE_B, H=PROBE_H, D=PROBE_D, causal=True, repeats=repeats, threads=1,
                                        clock="thread CPU time, fastest run"),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def forget() -> None:
    """Drop the tables held in memory (the cache files stay)."""
    with _LOCK:
        _TABLES.clear()
        _ENTRIES.clear()
