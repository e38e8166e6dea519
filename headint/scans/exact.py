"""Exact scans: the metric after replacing each head's output (or head at a position, or a
set of heads), for every example, batched many interventions per forward pass."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..integration.adapter import model_shape
from ..metrics import as_metric
from ..plan import ModelShape
from ..results import ScanResult
from .runner import VariantRunner, as_batch, base_runs, eval_mode, paired_batches
from .variants import Variant, build_plan, head_grid

logger = logging.getLogger("headint")

METHODS = ("zero", "mean", "resample", "patch")
DIRECTIONS = ("denoising", "noising")


def _derangement(n: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(n)`` with no fixed point (n >= 2), seeded."""
    if n < 2:
        raise ValueError("method='resample' needs at least 2 examples")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        if not (perm == torch.arange(n)).any():
            return perm


def _auto_batch_rows(shape: ModelShape, T: int, d_model: int, device: torch.device) -> int:
    """Rows per forward that fit a memory budget (activations and per-row patches)."""
    per_row = 4 * T * (16 * d_model + 4 * shape.n_heads * T + 2 * shape.n_heads * shape.head_dim)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 3
    else:
        budget = 1 << 30
    return int(max(1, min(4096, budget // max(per_row, 1))))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _fingerprint(model, batches: Sequence[dict | None], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for b in batches:
        if b is None:
            continue
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].detach().cpu().contiguous().numpy().tobytes())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(repr((tuple(p.shape), float(p.detach().double().sum()))).encode())
    return h.hexdigest()


class _Checkpoint:
    """Finished chunks of a scan, saved after each chunk; resumed when the fingerprint matches."""

    def __init__(self, path: str | os.PathLike | None, key: str):
        self.path = None if path is None else Path(path)
        self.key = key
        self.done: dict[int, torch.Tensor] = {}
        if self.path is not None and self.path.exists():
            data = torch.load(self.path, weights_only=True)
            if data.get("key") == key:
                self.done = dict(data["done"])
                logger.info("headint.scan: resuming from %s (%d chunks done)", self.path, len(self.done))
            else:
                logger.warning("headint.scan: checkpoint %s belongs to another scan; starting over", self.path)

    def save(self, i: int, values: torch.Tensor) -> None:
        self.done[i] = values
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"key": self.key, "done": self.done}, tmp)
        os.replace(tmp, self.path)


def scan(
    model,
    inputs,
    metric,
    *,
    corrupt=None,
    method: str = "zero",
    direction: str = "denoising",
    per_position: bool = False,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    head_sets: Sequence[Sequence[tuple[int, int]]] | None = None,
    positions: Sequence[int] | None = None,
    mean_inputs=None,
    batch_size: int | str = "auto",
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    backend: str = "auto",
    seed: int = 0,
) -> ScanResult:
    """Exact causal scan of attention heads.

    For each head (or head at each position, or each head set) the head output ``z`` is
    replaced and ``metric`` recomputed, for every example; the result holds per-example
    values. It equals patching ``z`` one intervention at a time with a hook on the output
    projection, computed in far fewer layer-forwards.

    Args:
        inputs: ``[N, T]`` token ids or a dict with ``input_ids``, ``attention_mask`` and what
            the metric reads (``target``, ``contrast``, ``labels``).
        metric: a :class:`~headint.metrics.Metric`, a name (``"logit_diff"``, ``"logprob"``,
            ``"prob"``, ``"kl"``, ``"loss"``) or a callable on logits ``[N, T, V] -> [N]``.
        corrupt: inputs of the corrupted run (same ``T``), needed by ``method="patch"`` and for
            the corrupted baseline (normalised results).
        method: ``"zero"``, ``"mean"`` (mean ``z`` over ``mean_inputs``, default the inputs,
            per position, padding excluded), ``"resample"`` (``z`` of another example: a seeded
            derangement) or ``"patch"`` (activation patching between clean and corrupt).
        direction: for ``"patch"``: ``"denoising"`` runs the corrupt inputs with clean ``z``
            patched in; ``"noising"`` runs the clean inputs with corrupt ``z`` patched in.
        per_position: one variant per (head, position) instead of per head.
        layers, heads, positions: restrict the grid. head_sets: instead of single heads, a list
            of sets of ``(layer, head)`` pairs replaced together (e.g. :func:`all_pairs`).
        batch_size: rows (variant x example) per forward, or ``"auto"`` (fits memory; halves
            and retries on out-of-memory).
        checkpoint: a file; a scan killed midway and re-run with the same arguments resumes
            from it and gives exactly the uninterrupted result.

    Cost, in layer-forwards (one block applied to one example), for ``L`` layers, ``H`` heads,
    ``N`` examples, ``P`` positions of length-``T`` inputs:

    - one forward per intervention (the hook loop): ``L*H*N*L`` (per position: ``L*H*P*N*L``),
      each over ``T`` tokens, plus full-vocabulary logits at every position;
    - this scan, with depth reuse (variants at layer ``l`` replay the cached clean blocks
      ``< l``): ``N*L`` (clean pass) ``+ H*N*L*(L+1)/2``, about half;
    - per position on causal models, position reuse also feeds only tokens ``>= p`` (clean
      keys/values of earlier tokens as a KV cache): token-layer-forwards drop from
      ``H*N*T*L*(L+1)/2`` per position to ``H*N*(T-p)*L*(L+1)/2``, about half again overall;
    - only the final position is unembedded, and only for the token ids the metric needs
      (``2`` for a logit difference instead of the vocabulary at every position).

    The counts that actually ran are in ``result.settings["cost"]`` next to
    ``result.settings["cost_one_forward_per_intervention"]``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if method == "patch" and corrupt is None:
        raise ValueError("method='patch' needs corrupt= inputs")
    metric = as_metric(metric)
    shape = model_shape(model)
    clean, corrupt_b = paired_batches(inputs, corrupt)
    N, T = clean["input_ids"].shape
    device = next(model.parameters()).device

    # Variants and the result grid.
    if head_sets is not None:
        if per_position:
            raise ValueError("head_sets and per_position=True cannot be combined: head sets are scanned over all positions")
        sets = [tuple(sorted((int(l), int(h)) for l, h in s)) for s in head_sets]
        if not sets or any(len(s) == 0 for s in sets):
            raise ValueError("head_sets must be a non-empty list of non-empty sets of (layer, head) pairs")
        for s in sets:
            head_grid(shape, [l for l, _ in s], [h for _, h in s])
        variants = [Variant(s) for s in sets]
        axes, grid_shape, labels = ("head_set",), (len(sets),), [list(s) for s in sets]
        index = list(range(len(sets)))
    else:
        pairs = head_grid(shape, layers, heads)
        if per_position:
            pos = list(range(T)) if positions is None else [int(p) for p in positions]
            for p in pos:
                if not 0 <= p < T:
                    raise ValueError(f"positions: {p} out of range for inputs of length {T}")
            variants = [Variant(((l, h),), p) for l, h in pairs for p in pos]
            index = [(l, h, p) for l, h in pairs for p in pos]
            axes, grid_shape = ("layer", "head", "position"), (shape.n_layers, shape.n_heads, T)
        else:
            variants = [Variant(((l, h),)) for l, h in pairs]
            index = pairs
            axes, grid_shape = ("layer", "head"), (shape.n_layers, shape.n_heads)
        labels = None

    settings = dict(method=method, direction=direction if method == "patch" else None, per_position=per_position,
                    layers=layers, heads=heads, head_sets=None if head_sets is None else [list(map(list, s)) for s in head_sets],
                    positions=positions, metric=repr(metric), model=type(model).__name__, seed=seed, n_examples=N, seq_len=T)

    # Base runs.
    with eval_mode(model):
        runs = base_runs(model, clean, corrupt_b, metric, backend)
        clean_runner, corrupt_runner = runs.clean, runs.corrupt
        clean_values, corrupt_values = runs.clean_values, runs.corrupt_values
        base = corrupt_runner if (method == "patch" and direction == "denoising") else clean_runner

        patch_source = _patch_source(method, model, clean_runner, corrupt_runner, base, mean_inputs, backend, seed, direction)

        # Work list: rows (variant, example), grouped by where reuse lets them start.
        position_reuse = per_position and base.causal and metric.position == "last"
        groups: dict[tuple[int, int], list[int]] = {}
        for vi, v in enumerate(variants):
            start_pos = v.position if (position_reuse and v.position is not None) else 0
            groups.setdefault((v.start_layer, start_pos), []).append(vi)
        rows_per_batch = _auto_batch_rows(shape, T, model.config.get_text_config().hidden_size, device) if batch_size == "auto" else int(batch_size)
        if rows_per_batch < 1:
            raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
        chunks = []
        for (l0, p0), vis in sorted(groups.items()):
            var = torch.tensor(vis).repeat_interleave(N)
            ex = torch.arange(N).repeat(len(vis))
            for s in range(0, len(var), rows_per_batch):
                chunks.append((l0, p0, var[s : s + rows_per_batch], ex[s : s + rows_per_batch]))

        key = _fingerprint(model, [clean, corrupt_b], {**settings, "batch_size": rows_per_batch})
        ckpt = _Checkpoint(checkpoint, key)
        values = torch.full((len(variants), N), float("nan"))
        for i, (l0, p0, var, ex) in enumerate(tqdm(chunks, desc="headint.scan", disable=not progress, unit="batch")):
            if i in ckpt.done:
                out = ckpt.done[i]
            else:
                out = _run_chunk(base, shape, variants, var, ex, T, patch_source, device, l0, p0)
                ckpt.save(i, out)
            values[var, ex] = out.cpu()

    per_example = torch.full((*grid_shape, N), float("nan"))
    for vi, idx in enumerate(index):
        per_example[idx] = values[vi]
    V = len(variants)
    L = shape.n_layers
    settings["cost"] = runs.cost()
    settings["cost_one_forward_per_intervention"] = dict(layer_forwards=V * N * L, token_layer_forwards=V * N * L * T)
    settings["batch_rows"] = rows_per_batch
    settings["position_reuse"] = position_reuse
    settings["restricted_logits"] = base.restricted
    return ScanResult(
        per_example, axes, labels=labels, metric_name=metric.name,
        clean_baseline=float(clean_values.mean()),
        corrupt_baseline=None if corrupt_values is None else float(corrupt_values.mean()),
        settings=settings, base_per_example=base.base_values(),
    )


def _run_chunk(base: VariantRunner, shape, variants, var, ex, T, patch_source, device, l0, p0) -> torch.Tensor:
    """Evaluate one chunk; on out-of-memory, split it in halves and retry."""
    try:
        plan = build_plan(shape, variants, ex.to(device), var, T, patch_source, device)
        return base.run(ex.to(device), plan, start_layer=l0, start_pos=p0)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e) or len(ex) == 1:
            raise
        logger.warning("headint.scan: out of memory with %d rows; retrying in halves", len(ex))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        h = len(ex) // 2
        return torch.cat([
            _run_chunk(base, shape, variants, var[:h], ex[:h], T, patch_source, device, l0, p0),
            _run_chunk(base, shape, variants, var[h:], ex[h:], T, patch_source, device, l0, p0),
        ])


def _patch_source(method, model, clean_runner, corrupt_runner, base, mean_inputs, backend, seed, direction):
    """``fn(layer, ex) -> [R or 1, H, T, D] | None``: replacement head outputs for rows ``ex``."""
    if method == "zero":
        return lambda layer, ex: None
    if method == "mean":
        if mean_inputs is None:
            zs, mask = base.base.z, base.batch["attention_mask"]
        else:
            from ..integration.record import record

            ref = as_batch(mean_inputs)
            if ref["input_ids"].shape[1] != base.T:
                raise ValueError(f"mean_inputs have length {ref['input_ids'].shape[1]} (shape {list(ref['input_ids'].shape)}); "
                                 f"the per-position mean needs the inputs' length {base.T}")
            cache = record(model, {k: ref[k] for k in ("input_ids", "attention_mask") if k in ref}, what=("z",), backend=backend)
            zs, mask = {l: cache.get("z", l) for l in cache.layers()}, ref["attention_mask"]
        w = mask.float()
        means = {l: ((z.float() * w[..., None, None]).sum(0) / w.sum(0).clamp_min(1)[:, None, None]) for l, z in zs.items()}
        return lambda layer, ex: means[layer].transpose(0, 1)[None].to(zs[layer].dtype)  # [1, H, T, D]
    if method == "resample":
        perm = _derangement(base.N, seed).to(base.batch["input_ids"].device)
        return lambda layer, ex: base.base.z[layer][perm[ex]].transpose(1, 2)
    source = clean_runner if direction == "denoising" else corrupt_runner
    return lambda layer, ex: source.base.z[layer][ex].transpose(1, 2)
