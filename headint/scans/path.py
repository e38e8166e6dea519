"""Path patching (Wang et al. 2022): the effect of sender heads on the metric that flows
only through receiver heads' query, key or value inputs."""

from __future__ import annotations

from typing import Sequence

import torch

from ..interventions import CallPlan, PatchQKV
from ..plan import InterventionPlan, ModelShape, TensorPlan
from ..integration.record import Recorder
from ..results import ScanResult
from .batching import auto_rows, check_batch_size, run_in_halves
from .distributed import agree_rows, data_parallel_ranks, run_chunks, running, settings_of
from .runner import VariantRunner
from .setup import prepare_scan
from .variants import head_grid


def _receivers(receivers, shape: ModelShape) -> list[tuple[int, int, str]]:
    out = []
    for r in receivers:
        if len(r) != 3:
            raise ValueError(f"receivers: each item must be (layer, head, which) with which in 'q', 'k', 'v' or a combination like 'qkv'; got {r!r}")
        l, h, which = int(r[0]), int(r[1]), str(r[2])
        if not which or set(which) - set("qkv"):
            raise ValueError(f"receivers: which must be made of 'q', 'k', 'v'; got {which!r}")
        if not 0 <= l < shape.n_layers:
            raise ValueError(f"receivers: layer {l} out of range; the model has {shape.n_layers} layers")
        if not shape.layer(l).has_attention:
            raise ValueError(f"receivers: layer {l} is a {shape.layer(l).kind!r} layer without attention; "
                             f"the layers with attention are {shape.attention_layers}")
        for w in which:
            n = shape.n_heads if w == "q" else shape.n_kv_heads
            if not 0 <= h < n:
                raise ValueError(f"receivers: {w} head {h} out of range at layer {l}; the model has {n} {'query' if w == 'q' else 'key/value'} heads")
            out.append((l, h, w))
    return out


def path_patch(
    model,
    clean,
    corrupt,
    metric="logit_diff",
    *,
    senders: Sequence | None = None,
    receivers: Sequence[tuple[int, int, str]],
    batch_size: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    distributed: bool | str = "auto",
) -> ScanResult:
    """Path patching from each sender (or sender set) to the receivers' q/k/v inputs.

    For every sender and every clean example:

    1. run the clean input with the sender's output replaced by its corrupt-run value and
       every other head's output frozen at its clean-run value; record the receivers' query,
       key or value inputs in that run;
    2. run the clean input again with only the receivers' q/k/v replaced by those records,
       and evaluate ``metric``.

    Args:
        senders: ``(layer, head)`` pairs (one variant each), or a list of sets of pairs; default
            every head in layers below the deepest receiver.
        receivers: ``(layer, head, which)`` with ``which`` in ``"q"``, ``"k"``, ``"v"`` (or e.g.
            ``"qkv"``); for ``"k"``/``"v"`` under grouped-query attention ``head`` is a key/value head.
        batch_size: rows (sender x example) per pair of runs; None sizes them from
            ``memory_budget`` (bytes; default a share of the free memory). A chunk that runs
            out of memory is retried in halves.
        distributed: ``"auto"`` splits the chunks of rows over the ranks of an initialised
            torch.distributed process group (see :mod:`headint.scans.distributed`); every rank
            returns the identical result, equal to a single process's. ``False``: this process only.

    MLPs and other non-attention components are recomputed in step 1 (as in Wang et al.), so
    paths sender -> MLP -> receiver count; paths through other attention heads do not.
    Returns a :class:`~headint.results.ScanResult` over the senders (axes ``("head_set",)``).
    """
    if corrupt is None:
        raise ValueError("path_patch needs corrupt= inputs")
    batch_size = check_batch_size(batch_size)
    setup = prepare_scan(model, clean, corrupt, metric, kind="path_patch", backend=backend, name="clean")
    shape, N, device = setup.shape, setup.N, setup.device
    recv = _receivers(receivers, shape)
    if not recv:
        raise ValueError("receivers must name at least one (layer, head, which)")
    top = max(l for l, _, _ in recv)
    sets = _sender_sets(senders, shape, top)

    ranks = data_parallel_ranks(distributed, model, "headint.path_patch")
    with running(ranks), setup.base_runs() as runs:
        clean_runner = runs.clean
        zc, zx = clean_runner.base.z, runs.corrupt.base.z
        if batch_size is None:
            geometry = setup.row_geometry(clean_runner, patched_layers=top + 1)
            batch_size = auto_rows(geometry, setup.memory_budget(memory_budget))
        batch_size = agree_rows(ranks, batch_size)
        var = torch.arange(len(sets)).repeat_interleave(N)
        exs = torch.arange(N).repeat(len(sets))
        whats = tuple(sorted({w for _, _, w in recv}))

        def patch_paths(rows: torch.Tensor) -> torch.Tensor:
            """Metric values ``[R]`` of rows ``(var[rows], exs[rows])``."""
            v_rows, ex = var[rows], exs[rows].to(device)
            R = len(ex)
            # Step 1: senders corrupt, every other head frozen clean; record receivers' inputs.
            spec = {}
            for l in range(top + 1):
                if l not in zc:  # a layer without attention (hybrid models)
                    continue
                at = ex.to(zc[l].device)  # each layer's cached z sits on that layer's device
                patch = zc[l][at].transpose(1, 2).clone()  # [R, H, T, D]
                for r, vi in enumerate(v_rows.tolist()):
                    for sl, sh in sets[vi]:
                        if sl == l:
                            patch[r, sh] = zx[l][at[r], :, sh]
                spec[l] = CallPlan(head_mask=torch.zeros(R, shape.n_heads, 1, device=device), head_patch=patch)
            rec = Recorder(whats)
            _record_run(clean_runner, ex, TensorPlan(spec), rec)
            # Step 2: only the receivers' q/k/v replaced.
            ivs = [PatchQKV(layer=l, head=h, which=w, source=rec.tensors[(w, l)]) for l, h, w in recv]
            plan = InterventionPlan(shape, rows=[ivs] * R)
            return clean_runner.run(ex, plan, start_layer=min(l for l, _, _ in recv)).float().cpu()

        chunks = [torch.arange(s, min(len(var), s + batch_size)) for s in range(0, len(var), batch_size)]
        done = run_chunks(ranks, range(len(chunks)), lambda i: run_in_halves(patch_paths, chunks[i], device, "headint.path_patch"),
                          progress=False, desc="headint.path_patch")
        values = torch.empty(len(sets), N)
        for i, rows in enumerate(chunks):
            values[var[rows], exs[rows]] = done[i]
        run_settings = settings_of(ranks, runs.cost())

    settings = dict(setup.settings, receivers=[list(r) for r in recv], batch_rows=batch_size)
    if "distributed" in run_settings:
        settings["distributed"] = run_settings["distributed"]
    return ScanResult(values, ("head_set",), labels=[list(s) for s in sets], metric_name=setup.metric.name,
                      **setup.baselines(), settings=settings, base_per_example=runs.clean_values)


def _sender_sets(senders, shape: ModelShape, top: int) -> list[tuple[tuple[int, int], ...]]:
    """Sender sets as sorted tuples of ``(layer, head)``; default every head below layer ``top``."""
    if senders is None:
        senders = [((l, h),) for l, h in head_grid(shape, range(top), None)]
    sets = []
    for s in senders:
        s = (tuple(s),) if isinstance(s[0], int) else tuple(tuple(x) for x in s)
        head_grid(shape, [l for l, _ in s], [h for _, h in s])
        if any(l >= top for l, _ in s) and all(l >= top for l, _ in s):
            raise ValueError(f"senders {s}: a sender must sit below the receivers' layers (deepest receiver layer {top})")
        sets.append(tuple(sorted((int(l), int(h)) for l, h in s)))
    return sets


@torch.no_grad()
def _record_run(runner: VariantRunner, ex, plan, recorder) -> None:
    runner.run_differentiable(ex, plan, recorder=recorder)
