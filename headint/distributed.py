"""torch.distributed, as headint uses it: the ranks of a data-parallel scan, failure-aware
exchanges between them, and the head shard of a tensor-parallel attention module.

Data parallel (:class:`Ranks`): every collective a scan makes is :meth:`Ranks.exchange`, an
``all_gather_object`` of ``(ok, payload)``. A rank whose work raised sends ``(False, error)``
at its next exchange (:meth:`Ranks.guard`), so every other rank raises :class:`RankFailed`
naming that rank and its error instead of waiting for it; a rank that dies outright breaks
the process group, whose own timeout (:func:`init_from_env`) ends the others.

Tensor parallel (:class:`HeadShard`): ``transformers``' tensor parallelism (``tp_plan``) splits
each attention module's query heads (and key/value heads) into equal contiguous slices, one per
rank of the tensor-parallel group: rank ``r`` of ``W`` holds query heads
``r * H / W .. (r + 1) * H / W - 1``. :func:`head_shard` reads that from the call's local head
counts and the group (the DTensor mesh of the module's sharded weights, or the default process
group for a model sharded by hand the same way); :func:`gather_heads` reassembles a head-sharded
tensor on every rank of the group.

This module imports nothing from headint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger("headint")

DEFAULT_TIMEOUT_S = 1800.0  # process-group timeout of init_from_env: a rank that hangs ends the job
_SPLIT = threading.local()  # .depth: data-parallel scans open in this thread


class RankFailed(RuntimeError):
    """Another rank of a distributed scan failed; the message names the rank and its error."""


def _brief(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def is_active() -> bool:
    """Whether a torch.distributed process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 when none is initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process is rank 0 (or the only process): the one that prints and writes."""
    return rank() == 0


def init_from_env(timeout_s: float | None = None) -> bool:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE > 1`` in
    the environment) and none exists yet: NCCL when CUDA is available, else gloo, with a timeout
    (``timeout_s``, default env ``HEADINT_DIST_TIMEOUT`` or 1800 s) so that a rank that stops
    answering ends the job. Returns whether a group with more than one rank is active."""
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_active()
    if timeout_s is None:
        timeout_s = float(os.environ.get("HEADINT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return is_active()


def is_tensor_parallel(model) -> bool:
    """Whether any parameter of ``model`` is a DTensor (sharded by ``transformers``' ``tp_plan``)."""
    DTensor = _dtensor_class()
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


@dataclass(frozen=True)
class Ranks:
    """The ranks a data-parallel scan splits its work over: this process's ``rank`` of ``world``
    in the default process group, ``what`` naming the scan in messages."""

    rank: int
    world: int
    what: str = "headint.scan"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence) -> list:
        """This rank's items: ``items[rank::world]`` (round robin, so every rank gets work
        whatever the order, and the items are those a single process would run)."""
        return list(items)[self.rank :: self.world]

    def exchange(self, payload: Any = None, ok: bool = True) -> list:
        """Every rank's ``payload``, in rank order (``all_gather_object``); raises
        :class:`RankFailed` if any rank reported a failure (``ok=False``, payload its message)."""
        got: list = [None] * self.world
        dist.all_gather_object(got, (ok, payload))
        failed = [(r, p) for r, (o, p) in enumerate(got) if not o]
        if failed:
            raise RankFailed("; ".join(f"{self.what}: rank {r} of {self.world} failed: {p}" for r, p in failed))
        return [p for _, p in got]

    @contextlib.contextmanager
    def guard(self) -> Iterator["Ranks"]:
        """Inside, an exception on this rank is reported to the other ranks (at their next
        :meth:`exchange`) before it propagates here; :class:`RankFailed` passes through.
        Inside, ranks run different rows, so an attention call that turns out to be sharded
        over the ranks (:func:`head_shard`) is an error rather than a silent mix of rows."""
        _SPLIT.depth = getattr(_SPLIT, "depth", 0) + 1
        try:
            yield self
        except RankFailed:
            raise
        except BaseException as e:
            msg = _brief(e)
            logger.error("%s: rank %d of %d failed: %s", self.what, self.rank, self.world, msg)
            with contextlib.suppress(Exception):  # the group itself may be broken
                self.exchange(msg, ok=False)
            raise
        finally:
            _SPLIT.depth -= 1

    def agree_min(self, n: int) -> int:
        """The smallest of every rank's ``n`` (e.g. rows per batch sized from each rank's memory)."""
        return min(self.exchange(int(n)))

    @contextlib.contextmanager
    def quiet_unless_main(self) -> Iterator[None]:
        """Inside, the ``headint`` logger of ranks other than 0 shows errors only."""
        if self.is_main:
            yield
            return
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def data_parallel_ranks(distributed: Any, model, what: str) -> Ranks | None:
    """The :class:`Ranks` a scan splits over, or None (one process does all the work).

    ``distributed="auto"``: when a process group with more than one rank is initialised and the
    model is not tensor-parallel (a tensor-parallel model needs every rank in every forward, so
    each rank runs the whole scan); ``True``: the same, but an error when there is no such
    group or the model is tensor-parallel; ``False``: never.
    """
    if not (distributed is True or distributed is False or (isinstance(distributed, str) and distributed == "auto")):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
    if distributed is False:
        return None
    active = is_active()
    tp = active and is_tensor_parallel(model)
    if distributed is True:
        if not active:
            raise ValueError("distributed=True needs an initialised torch.distributed process group with more than one "
                             "rank (launch with torchrun); none is initialised")
        if tp:
            raise ValueError("distributed=True: the model is tensor-parallel (DTensor parameters), so every rank must run "
                             "every forward; use distributed='auto' or False, which run the whole scan on each rank")
    if not active or tp:
        return None
    return Ranks(dist.get_rank(), dist.get_world_size(), what)


# -- tensor parallel ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadShard:
    """The heads one rank's attention module holds: query heads ``q_start .. q_start + n_q - 1``
    and key/value heads ``kv_start .. kv_start + n_kv - 1`` of the model's global numbering;
    ``group`` (None: the default group) has ``world`` ranks, this one at ``rank``."""

    q_start: int
    n_q: int
    kv_start: int
    n_kv: int
    rank: int
    world: int
    group: Any = None

    @property
    def q(self) -> slice:
        return slice(self.q_start, self.q_start + self.n_q)

    @property
    def kv(self) -> slice:
        return slice(self.kv_start, self.kv_start + self.n_kv)


def _module_group(module) -> tuple[Any, int, int] | None:
    """``(group, rank, world)`` of the first DTensor parameter of ``module``'s tensor-parallel mesh."""
    DTensor = _dtensor_class()
    if DTensor is None:
        return None
    for p in module.parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            dim = "tp" if mesh.ndim > 1 and "tp" in (mesh.mesh_dim_names or ()) else 0
            if mesh.ndim > 1 and dim == 0:
                return None
            return mesh.get_group(dim), mesh.get_local_rank(dim), mesh.size(dim)
    return None


def head_shard(module, n_q_local: int, n_kv_local: int, n_heads: int, n_kv_heads: int) -> HeadShard | None:
    """Which global heads an attention call of ``module`` holds, given its local head counts.

    None when the call has every head (``n_q_local == n_heads`` and ``n_kv_local ==
    n_kv_heads``), or when there is no tensor parallelism to explain fewer heads (no DTensor
    parameter in ``module`` and no initialised process group): such calls are left to the
    shape checks downstream. A sharded call must hold ``n_heads / W`` query and
    ``n_kv_heads / W`` key/value heads for the group's ``W`` ranks; anything else is an error
    naming the module and the counts.
    """
    if n_q_local == n_heads and n_kv_local == n_kv_heads:
        return None
    found = _module_group(module)
    if found is None:
        if not is_active():
            return None
        found = (None, dist.get_rank(), dist.get_world_size())
    group, r, world = found
    if getattr(_SPLIT, "depth", 0):
        raise RuntimeError(
            f"{type(module).__name__} holds {n_q_local} of {n_heads} query heads (tensor-parallel over {world} ranks), "
            "inside a scan split over the ranks by data (distributed='auto' found no DTensor parameters); "
            "scan a model sharded by hand with distributed=False"
        )
    if n_q_local * world != n_heads or n_kv_local * world != n_kv_heads:
        raise ValueError(
            f"{type(module).__name__}: the attention call has {n_q_local} query / {n_kv_local} key-value heads on rank {r} "
            f"of a {world}-rank tensor-parallel group, but the model has {n_heads} / {n_kv_heads}; expected "
            f"{n_heads / world:g} / {n_kv_heads / world:g} per rank (headint maps equal contiguous head slices only)"
        )
    return HeadShard(r * n_q_local, n_q_local, r * n_kv_local, n_kv_local, r, world, group)


def gather_heads(x: torch.Tensor, dim: int, shard: HeadShard) -> torch.Tensor:
    """The full tensor from every rank's head slice ``x`` (heads along ``dim``), in rank order,
    on every rank of ``shard``'s group (a collective: every rank of the group must call it)."""
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(shard.world)]
    dist.all_gather(parts, x, group=shard.group)
    return torch.cat(parts, dim=dim)


class _TakeHeads(torch.autograd.Function):
    """``x[:, sl]`` whose backward sums the full-size gradient over the shard's group, so a
    per-head tensor shared by every rank (e.g. an attribution head mask) gets the gradient of
    every rank's heads, not only this rank's."""

    @staticmethod
    def forward(ctx, x, sl, shard):
        ctx.sl, ctx.shard, ctx.shape = sl, shard, x.shape
        return x[:, sl]

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape)
        full[:, ctx.sl] = grad
        dist.all_reduce(full, group=ctx.shard.group)
        return full, None, None


def take_heads(x: torch.Tensor, sl: slice, shard: HeadShard) -> torch.Tensor:
    """This rank's heads ``x[:, sl]`` of a per-head tensor over global heads (dim 1); with
    autograd, the gradient of ``x`` is summed over the tensor-parallel group (a collective in
    backward)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _TakeHeads.apply(x, sl, shard)
    return x[:, sl]


def main_rank_done(what: str = "headint scan") -> None:
    """Under torchrun: every rank waits here until rank 0 has written the outputs (an
    :meth:`Ranks.exchange`, so a rank that failed is named). Nothing without a process group."""
    if is_active():
        Ranks(dist.get_rank(), dist.get_world_size(), what).exchange()
