"""Run a job in N processes joined by a gloo process group on this machine, as ``torchrun``
would (MASTER_ADDR=127.0.0.1, a free port, RANK/WORLD_SIZE/LOCAL_RANK in the environment), and
collect what each rank returns.

``run_ranks(job, world, tmp_path, **kwargs)`` spawns ``world`` processes; rank ``r`` calls
``dist_jobs.<job>(**kwargs)`` with one torch thread and returns its value (saved with
``torch.save``), or the exception it raised (as ``("error", type name, message)``). A job that
does not finish within ``timeout`` seconds fails the test (no hang).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

JOB_TIMEOUT_S = 600
GROUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, job: str, out: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    import dist_jobs

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        result = getattr(dist_jobs, job)(**kwargs)
    except Exception as e:
        result = ("error", type(e).__name__, str(e), traceback.format_exc())
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(job: str, world: int, tmp_path: Path, timeout: float = JOB_TIMEOUT_S, **kwargs) -> list:
    """Each rank's return value (or ``("error", type, message, traceback)``), in rank order."""
    out = Path(tmp_path) / f"ranks-{job}-{free_port()}"
    out.mkdir(parents=True)
    ctx = mp.start_processes(_entry, args=(world, free_port(), job, str(out), kwargs), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())) and time.monotonic() < deadline:
            pass
    except (mp.ProcessExitedException, mp.ProcessRaisedException):
        pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    missing = [r for r in range(world) if not (out / f"rank{r}.pt").exists()]
    if missing:
        raise AssertionError(f"job {job}: ranks {missing} returned nothing (crashed or hung past {timeout} s)")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def check_ok(results: list) -> list:
    """``results`` if no rank returned an error, else an AssertionError showing the first one."""
    for r, res in enumerate(results):
        if isinstance(res, tuple) and len(res) == 4 and res[0] == "error":
            raise AssertionError(f"rank {r} raised {res[1]}: {res[2]}\n{res[3]}")
    return results
