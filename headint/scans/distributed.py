"""Scans split over the ranks of a torch.distributed process group (data parallel).

Each rank runs the scan's base runs itself (they are cheap and every chunk reads them), then
the chunks of work a single process would run (variant rows of an exact scan, examples of
attribution and path patching) are dealt out round robin: rank ``r`` of ``W`` computes
chunks ``r, r + W, ...`` of the chunks still to do. The chunks are exactly the
single-process chunks (same rows in the same batches, with the rows per batch agreed across
ranks), so the values are bit-identical to a single-process run. The per-chunk values are then
gathered to every rank (``all_gather_object``), which returns the same result.

Checkpoints: rank 0 opens (creates or checks) the scan's folder first, then the others; every
rank writes the chunk files it computes into that shared folder. A resumed job, with any
number of ranks or a single process, loads every finished chunk and computes only the rest.

Every collective goes through :meth:`headint.distributed.Ranks.exchange` inside
:meth:`~headint.distributed.Ranks.guard`, so a rank that fails makes the others fail with
its rank and error (:class:`~headint.distributed.RankFailed`) instead of hanging.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..distributed import Ranks, data_parallel_ranks, is_main
from .checkpoint import ScanCheckpoint

__all__ = ["Ranks", "data_parallel_ranks", "running", "open_checkpoint", "run_chunks", "agree_rows", "settings_of"]


@contextlib.contextmanager
def running(ranks: Ranks | None) -> Iterator[None]:
    """The scan's distributed part: failures reported to the other ranks, logging on rank 0 only."""
    if ranks is None:
        yield
        return
    with ranks.guard(), ranks.quiet_unless_main():
        yield


def agree_rows(ranks: Ranks | None, rows: int) -> int:
    """Rows per batch every rank uses: the smallest of the ranks' own sizes."""
    return rows if ranks is None else ranks.agree_min(rows)


def open_checkpoint(ranks: Ranks | None, make: Callable[[], ScanCheckpoint]) -> ScanCheckpoint:
    """``make()`` on rank 0 first (it creates or checks the scan's folder), then on the others;
    no rank writes a chunk before every rank has read the finished ones, so all agree on them."""
    if ranks is None:
        return make()
    ckpt = make() if ranks.is_main else None
    ranks.exchange()
    if ckpt is None:
        ckpt = make()
    done = ranks.exchange(sorted(ckpt.done))
    if any(d != done[0] for d in done):
        raise RuntimeError(f"{ranks.what}: the ranks read different finished chunks from {ckpt.folder} "
                           f"({[len(d) for d in done]} chunks); is another job writing to it?")
    return ckpt


def run_chunks(ranks: Ranks | None, todo: Sequence[int], run: Callable[[int], torch.Tensor], *,
               progress: bool, desc: str, unit: str = "batch") -> dict[int, torch.Tensor]:
    """``{i: run(i)}`` for every chunk index in ``todo``, on every rank; each rank runs its
    round-robin share (one process: all of them)."""
    mine = list(todo) if ranks is None else ranks.share(todo)
    show = progress and is_main()  # under any process group (also tensor parallel), rank 0 only
    with tqdm(mine, desc=desc, disable=not show, unit=unit) as bar:  # closed on Ctrl-C too, before the CLI's last line
        out = {i: run(i) for i in bar}
    if ranks is None:
        return out
    merged: dict[int, torch.Tensor] = {}
    for part in ranks.exchange(out):
        merged.update(part)
    return merged


def settings_of(ranks: Ranks | None, cost: dict) -> dict:
    """``{"cost": ..., "distributed": ...}`` for a result's settings: the work summed over ranks
    (base runs counted on each rank that ran them) and, when split over ranks, the world size."""
    if ranks is None:
        return {"cost": cost}
    costs = ranks.exchange(cost)
    total = {k: sum(c[k] for c in costs) for k in cost}
    return {"cost": total, "distributed": {"world_size": ranks.world, "cost_per_rank": costs}}
