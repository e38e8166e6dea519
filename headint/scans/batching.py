"""How many rows (variant x example) a scan runs per forward, and what to do when memory runs out.

:func:`row_bytes` estimates everything one row of a variant run allocates; :func:`auto_rows`
divides a memory budget (:func:`default_memory_budget`: a share of the free CUDA memory or of
the available host memory) by it. Out-of-memory errors of CUDA (``torch.OutOfMemoryError``)
and of the CPU allocator (``RuntimeError: ... DefaultCPUAllocator: can't allocate memory``)
are recognised by :func:`is_oom`; :func:`run_in_halves` retries a chunk in halves.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..metrics import Metric
from ..plan import ModelShape

logger = logging.getLogger("headint")

MAX_ROWS = 4096
BUDGET_SHARE = 0.5  # of the free / available memory
FALLBACK_BUDGET = 1 << 30  # bytes, where the available memory cannot be read
METRIC_COPIES = 3  # logits, their float log-softmax, and a temporary of the same size
OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")
# Exact scans on CPU: at most this many tokens per forward. Bigger forwards fit memory but not the
# caches: on the 2-core development machine, an all-heads GPT-2-small scan (N=8, T=32) took 10%
# less CPU time at 32 rows per forward than at the memory-sized 2,284 (medians of 2), and 16-64
# rows beat 128+ on a two-layer subset (medians of 5). CUDA keeps the memory-sized batches.
CPU_TOKENS_PER_FORWARD = 1024


@dataclass(frozen=True)
class RowGeometry:
    """What a scan row's forward looks like.

    ``T``: tokens per row; ``d_model``/``d_ffn``: residual and MLP widths; ``vocab``: the
    vocabulary size; ``metric_logits``: logits the run materialises per row (``K`` ids, ``V``
    at the last position, or ``T * V``); ``param_bytes``: bytes per activation element;
    ``patched_layers``: layers whose head outputs the plan replaces (``[H, T, D]`` each);
    ``keeps_graph``: the run is differentiated (every layer's working set is kept for backward).
    """

    shape: ModelShape
    T: int
    d_model: int
    d_ffn: int
    vocab: int
    metric_logits: int
    param_bytes: int = 4
    patched_layers: int = 1
    keeps_graph: bool = False


def metric_logits_per_row(metric: Metric, batch: dict, T: int, vocab: int, restricted: bool) -> int:
    """Logit elements one row materialises: ``K`` (a few ids at the last position, restricted
    unembedding), ``V`` (the full vocabulary at the last position) or ``T * V`` (every position:
    position-"all" metrics, and any model whose logits cannot be restricted)."""
    if metric.position == "all" or not restricted:
        return T * vocab
    ids = metric.token_ids(batch)
    return vocab if ids is None else int(ids.shape[1])


def row_bytes(g: RowGeometry) -> int:
    """Bytes one row allocates in a variant run (forward, no graph).

    - hidden states kept per layer: ``L * T * d_model``;
    - one block's working set: q, k, v, attention output, residual (``~6 * T * d_model``) and
      the MLP (``2 * T * d_ffn``);
    - attention scratch: scores and probabilities, ``2 * H * T * T`` in float32;
    - the plan: head mask and replacement head outputs, ``H * T * (D + 1)`` per patched layer,
      and the clean keys/values a KV cache replays, ``2 * L * Hkv * T * D``;
    - logits the metric reads (see :func:`metric_logits_per_row`) in float32, with the
      metric's own copies (log-softmax and a temporary);
    - with ``keeps_graph``, the block working set and attention scratch of every layer.
    """
    s, T = g.shape, g.T
    e = g.param_bytes
    hidden = s.n_layers * T * g.d_model * e
    block = (6 * T * g.d_model + 2 * T * g.d_ffn) * e
    scratch = 2 * s.n_heads * T * T * 4
    plan = g.patched_layers * s.n_heads * T * (s.head_dim + 1) * 4 + 2 * s.n_layers * s.n_kv_heads * T * s.head_dim * e
    logits = METRIC_COPIES * g.metric_logits * 4
    if g.keeps_graph:
        block, scratch = block * s.n_layers, scratch * s.n_layers
    return int(hidden + block + scratch + plan + logits)


def _available_host_memory() -> int | None:
    """Available host memory in bytes (psutil if installed, else /proc/meminfo), or None."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_memory_budget(device: torch.device) -> int:
    """Bytes a scan may use for its batches: half the free CUDA memory of ``device``, or half
    the available host memory on CPU (1 GiB where that cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * BUDGET_SHARE)
    avail = _available_host_memory()
    return FALLBACK_BUDGET if avail is None else int(avail * BUDGET_SHARE)


def auto_rows(g: RowGeometry, budget: int) -> int:
    """Rows per forward that fit ``budget`` bytes: ``budget // row_bytes``, in ``[1, MAX_ROWS]``."""
    n = positive_int(budget)
    if n is None and isinstance(budget, float) and budget >= 1:  # e.g. 8e9
        n = int(budget)
    if n is None:
        raise ValueError(f"memory_budget must be a positive number of bytes (at least 1), got {budget!r}")
    return int(max(1, min(MAX_ROWS, n // max(row_bytes(g), 1))))


def cpu_row_cap(rows: int, T: int, device) -> int:
    """``rows`` capped, on a CPU ``device``, to ``CPU_TOKENS_PER_FORWARD // T`` (at least 1)."""
    if torch.device(device).type != "cpu":
        return rows
    return max(1, min(rows, CPU_TOKENS_PER_FORWARD // max(T, 1)))


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` says memory ran out: ``torch.OutOfMemoryError`` (CUDA), ``MemoryError``, or
    a ``RuntimeError`` with an allocator's message (CUDA's "out of memory", the CPU allocator's
    "can't allocate memory")."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in OOM_MESSAGES)


def run_in_halves(fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, device: torch.device, what: str = "headint.scan") -> torch.Tensor:
    """``fn(rows)``, where ``fn`` returns one value per row along dim 0; on out-of-memory, the
    rows are split in halves and each half retried (recursively), results concatenated in order.
    A single row that runs out of memory re-raises the error."""
    try:
        return fn(rows)
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e) or len(rows) <= 1:
            raise
        logger.warning("%s: out of memory with %d rows; retrying in halves", what, len(rows))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    h = len(rows) // 2
    return torch.cat([run_in_halves(fn, rows[:h], device, what), run_in_halves(fn, rows[h:], device, what)])


def positive_int(x) -> int | None:
    """``x`` as an int if it is a positive integer (an ``int``, numpy integer, ...; not a bool), else None."""
    if isinstance(x, bool):
        return None
    try:
        n = operator.index(x)
    except TypeError:
        return None
    return n if n >= 1 else None


def check_batch_size(batch_size) -> int | None:
    """``batch_size`` of attribution and path patching: a positive int, or None (sized from memory)."""
    if batch_size is None:
        return None
    n = positive_int(batch_size)
    if n is None:
        raise ValueError(f"batch_size must be a positive int or None (sized from the memory budget), got {batch_size!r}")
    return n
