"""Path patching (Wang et al. 2022): the effect of sender heads on the metric that flows
only through receiver heads' query, key or value inputs."""

from __future__ import annotations

from typing import Sequence

import torch

from ..interventions import PatchQKV
from ..integration.adapter import model_shape
from ..metrics import as_metric
from ..plan import InterventionPlan, ModelShape, TensorPlan
from ..integration.record import Recorder
from ..results import ScanResult
from .runner import VariantRunner, base_runs, eval_mode, paired_batches
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
    backend: str = "auto",
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

    MLPs and other non-attention components are recomputed in step 1 (as in Wang et al.), so
    paths sender -> MLP -> receiver count; paths through other attention heads do not.
    Returns a :class:`~headint.results.ScanResult` over the senders (axes ``("head_set",)``).
    """
    if corrupt is None:
        raise ValueError("path_patch needs corrupt= inputs")
    metric = as_metric(metric)
    shape = model_shape(model)
    recv = _receivers(receivers, shape)
    if not recv:
        raise ValueError("receivers must name at least one (layer, head, which)")
    top = max(l for l, _, _ in recv)
    if senders is None:
        senders = [((l, h),) for l, h in head_grid(shape, range(top), None)]
    sets = []
    for s in senders:
        s = (tuple(s),) if isinstance(s[0], int) else tuple(tuple(x) for x in s)
        head_grid(shape, [l for l, _ in s], [h for _, h in s])
        if any(l >= top for l, _ in s) and all(l >= top for l, _ in s):
            raise ValueError(f"senders {s}: a sender must sit below the receivers' layers (deepest receiver layer {top})")
        sets.append(tuple(sorted((int(l), int(h)) for l, h in s)))
    clean_b, corrupt_b = paired_batches(clean, corrupt, "clean")
    N, T = clean_b["input_ids"].shape
    device = next(model.parameters()).device

    with eval_mode(model):
        runs = base_runs(model, clean_b, corrupt_b, metric, backend)
        clean_runner, corrupt_runner = runs.clean, runs.corrupt
        clean_values, corrupt_values = runs.clean_values, runs.corrupt_values
        zc, zx = clean_runner.base.z, corrupt_runner.base.z

        rows_per = batch_size or max(N, 1)
        var = torch.arange(len(sets)).repeat_interleave(N)
        exs = torch.arange(N).repeat(len(sets))
        values = torch.empty(len(sets), N)
        whats = tuple(sorted({w for _, _, w in recv}))
        for s in range(0, len(var), rows_per):
            v_rows, ex = var[s : s + rows_per], exs[s : s + rows_per].to(device)
            R = len(ex)
            # Step 1: senders corrupt, every other head frozen clean; record receivers' inputs.
            spec = {}
            for l in range(top + 1):
                patch = zc[l][ex].transpose(1, 2).clone()  # [R, H, T, D]
                for r, vi in enumerate(v_rows.tolist()):
                    for sl, sh in sets[vi]:
                        if sl == l:
                            patch[r, sh] = zx[l][ex[r], :, sh]
                spec[l] = {"head_mask": torch.zeros(R, shape.n_heads, 1, device=device), "head_patch": patch}
            rec = Recorder(whats)
            _record_run(clean_runner, ex, TensorPlan(spec), rec)
            # Step 2: only the receivers' q/k/v replaced.
            ivs = [PatchQKV(layer=l, head=h, which=w, source=rec.tensors[(w, l)]) for l, h, w in recv]
            plan = InterventionPlan(shape, rows=[ivs] * R)
            values[v_rows, ex.cpu()] = clean_runner.run(ex, plan, start_layer=min(l for l, _, _ in recv)).cpu()

    settings = dict(kind="path_patch", receivers=[list(r) for r in recv], metric=repr(metric), model=type(model).__name__,
                    n_examples=N, seq_len=T)
    return ScanResult(values, ("head_set",), labels=[list(s) for s in sets], metric_name=metric.name,
                      clean_baseline=float(clean_values.mean()), corrupt_baseline=float(corrupt_values.mean()), settings=settings,
                      base_per_example=clean_values)


@torch.no_grad()
def _record_run(runner: VariantRunner, ex, plan, recorder) -> None:
    runner.run_differentiable(ex, plan, recorder=recorder)
