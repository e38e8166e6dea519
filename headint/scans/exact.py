"""Exact scans: the metric after replacing each head's output (or head at a position, or a
set of heads), for every example, batched many interventions per forward pass."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..distributed import is_active
from ..interventions.base import as_int
from ..results import ScanResult
from .batching import auto_rows, cpu_row_cap, positive_int, run_in_halves
from .checkpoint import ScanCheckpoint
from . import fingerprint as fingerprints
from .distributed import agree_rows, data_parallel_ranks, open_checkpoint, run_chunks, running, settings_of
from .positions import with_position_ids
from ..integration.record import record_in
from .metric_logits import ColumnsOf
from .runner import VariantRunner
from .setup import prepare_scan
from ..vocabulary import DIRECTIONS, EFFECTS, METHODS, TARGETS, Direction, Effect, Method, Target
from .shortcuts import Shortcuts
from .variants import Variant, build_plan, head_grid, target_heads


def _derangement(n: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(n)`` with no fixed point (n >= 2), seeded."""
    if n < 2:
        raise ValueError("method='resample' needs at least 2 examples")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        if not (perm == torch.arange(n)).any():
            return perm


def scan(
    model,
    inputs,
    metric,
    *,
    corrupt=None,
    method: Method = "zero",
    direction: Direction = "denoising",
    per_position: bool = False,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    head_sets: Sequence[Sequence[tuple[int, int]]] | None = None,
    positions: Sequence[int] | None = None,
    mean_inputs=None,
    batch_size: int | str = "auto",
    memory_budget: int | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_key: str | None = None,
    backend: str = "auto",
    seed: int = 0,
    distributed: bool | str = "auto",
    target: Target = "z",
    effect: Effect = "total",
    group_positions: int | str = "auto",
    shortcuts: Shortcuts | dict | None = None,
) -> ScanResult:
    """Exact causal scan of attention heads.

    For each head (or head at each position, or each head set) the head output ``z`` (or the
    head's query, key or value: ``target``) is replaced and ``metric`` recomputed, for every
    example; the result holds per-example values. It equals patching one intervention at a
    time with hooks, computed in far fewer layer-forwards.

    Args:
        inputs: ``[N, T]`` token ids or a dict with ``input_ids``, ``attention_mask``, what
            the metric reads (``target``, ``contrast``, ``labels``) and any other input the
            model's forward takes (``token_type_ids``, ``pixel_values``, ...; one row per example).
            An encoder-decoder model is scanned over its decoder: the dict needs
            ``decoder_input_ids`` (see :mod:`headint.scans.inputs`). Left-padded rows get
            ``position_ids`` from the mask, so each example's values are those it gives alone.
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
        batch_size: rows (variant x example) per forward, or ``"auto"``: as many as fit
            ``memory_budget`` given what a row allocates (hidden states, attention scratch, the
            plan, and the logits the metric reads times the vocabulary; see
            :mod:`headint.scans.batching`); on CPU at most ``CPU_TOKENS_PER_FORWARD`` (1024)
            tokens per forward, which keeps a forward's activations in cache (measured faster).
            Either way, a chunk that runs out of memory (CUDA or CPU) is retried in halves.
        memory_budget: bytes for ``"auto"``; default half the free CUDA memory, or half the
            available host memory on CPU.
        checkpoint: a folder; every finished chunk is saved there (one file per chunk, in a
            subfolder per scan, so scans sharing the folder keep their progress). A scan killed
            midway and re-run with the same arguments resumes from it and gives exactly the
            uninterrupted result (with the chunk size it started with). A scan's subfolder is named
            by a fingerprint of everything that determines its values (the model's weights, buffers
            and config, the metric's code and tensors, the inputs, ``mean_inputs`` and the
            settings; see :mod:`headint.scans.fingerprint`), so another scan never resumes it.
            Computed only with ``checkpoint=`` (one pass over the weights: 0.3 s of CPU for GPT-2
            small, a seventh of one forward of 8 x 32 tokens; ``bench/fingerprint_cost.py``). What cannot be hashed reliably (a metric that reads a random
            generator, a tokenizer or other C state; weights on the meta device with no offload
            hook holding them) is refused with :class:`~headint.scans.fingerprint.FingerprintError`.
        checkpoint_key: with ``checkpoint=``, a string that vouches for what the fingerprint
            cannot hash: mixed into the fingerprint, it stands in for those parts (change it
            whenever they change). Also separates runs that would otherwise share progress.
        distributed: ``"auto"`` splits the chunks over the ranks of an initialised
            torch.distributed process group (e.g. under ``torchrun``; see
            :mod:`headint.scans.distributed`), every rank returning the identical result, equal
            to a single process's; ``False`` runs everything in this process; ``True`` requires a group.
        target: what is replaced: ``"z"`` (head outputs, default), ``"q"`` (the head's queries),
            ``"k"`` or ``"v"`` (keys or values), all after rotary embeddings, with the method's
            values of that tensor (the other run's, the mean's, another example's, or zeros).
            With ``per_position=True`` a ``"q"`` position is a query position and a ``"k"``/``"v"``
            position a key position (the keys every later query reads). Under grouped-query
            attention ``"k"``/``"v"`` scans are over key/value heads: the result's ``"head"`` axis
            then indexes the ``n_kv_heads`` key/value heads (``settings["head_kind"]`` says
            ``"key/value"``), and ``heads=`` selects key/value heads. ``head_sets`` are for
            ``"z"`` only. ``"q"`` sources cost one extra recording forward per source run.
            ``"pattern"``: the head's attention probabilities are replaced by the source's (the
            other run's, the per-position mean over examples, another example's), per head or
            per head and query position; the head's output becomes ``probs @ v`` with this
            run's values, computed on the reference path for the affected heads and handed to
            the kernel as a head-output replacement. Memory: the source probabilities are kept
            for every layer, ``O(N*H*T^2)``, and every patched layer holds ``O(B*H*T^2)`` per
            batch of ``B`` rows. Methods ``"patch"``, ``"mean"``, ``"resample"``.
        effect: ``"total"`` (default): every later component recomputes, so the result is the
            head's total effect. ``"direct"``: every attention head of every layer above the
            variant's (lowest) layer keeps its output ``z`` of the run being intervened on (the
            base run: corrupt for denoising, clean otherwise), so nothing reaches the logits
            through later heads; the final norm (LayerNorm / RMSNorm) still recomputes its scale
            from the changed residual stream. So for a last-layer head "direct" equals "total",
            and the final norm's rescaling (a self-repair mechanism: Rushing & Nanda 2024,
            "Explorations of Self-Repair in Language Models") is part of the direct effect.
            ``"direct_frozen_ln"``: as ``"direct"``, and the final norm divides by its per-token
            scale in the base run instead of recomputing it (the convention of TransformerLens's
            direct logit attribution, which divides by the cached ``ln_final`` scale; see
            :mod:`headint.integration.final_norm`: which module is the final norm and which
            formula it computes are observed in the base run, and a model whose final norm is
            neither a LayerNorm nor an RMSNorm is refused). Neither freezes MLPs: on a model
            with MLPs both still include the paths through the MLPs after the head.
            ``"direct_path"``: as ``"direct_frozen_ln"``, and every MLP of the variant's (lowest)
            layer and above keeps its base-run output, so only the head's path straight to the
            unembedding remains, linear in the head's change (TransformerLens's direct logit
            attribution of the change; on an attention-only model equal to
            ``"direct_frozen_ln"``). Which module is a block's MLP comes from the circuit probe
            (:mod:`headint.circuits.structure`), which refuses models whose residual stream is
            not ``input + attention + MLP`` per block. Layers below the variant's recompute as
            in ``"total"``. :func:`headint.direct_vs_total` runs all four and splits the total
            effect into what flows through later heads, what the final norm's rescaling repairs
            and what flows through MLPs.
        group_positions: per-position scans with position reuse run the variants of each
            position from that position on; this many neighbouring scanned positions share
            their runs instead (fed from the first of them), which makes bigger batches at the
            price of a few more tokens. ``"auto"``: as many as fill one batch (``batch_size``
            rows). Measured on CPU (``bench/speed_paths.py``, GPT-2 small, 16 rows per position,
            32-row batches): 2, 4 and 8 grouped positions ran 1.17x, 1.24x and 1.36x faster than 1.
        shortcuts: which optional exact shortcuts may run (a
            :class:`~headint.scans.shortcuts.Shortcuts` or a dict of its fields; None: all). The
            values are identical either way; switch one off to measure what it saves.

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
      (``2`` for a logit difference instead of the vocabulary at every position);
    - a callable metric on full logits is probed on the base runs and, if it reads only the last
      real token, gets only that token's logits, and only the vocabulary columns it reads when
      the column probe finds them (``settings["metric_logits"]`` says which, and how many variant
      rows fell back to the full vocabulary);
    - last-position metrics on causal models: the final block computes keys/values at every
      position and the rest at the last one only (``settings["final_block"]``);
    - head-output scans (``target="z"``): the first intervened layer takes the clean attention
      output blended with the replacement, and for whole rows replays its q/k/v projections from
      one capture of the clean rows (``settings["clean_attention"]``; ``cost`` counts the rows in
      ``clean_attention_rows`` / ``replayed_projection_rows``).

    The counts that actually ran are in ``result.settings["cost"]`` next to
    ``result.settings["cost_one_forward_per_intervention"]``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if method == "patch" and corrupt is None:
        raise ValueError("method='patch' needs corrupt= inputs")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if effect not in EFFECTS:
        raise ValueError(f"effect must be one of {EFFECTS}, got {effect!r}")
    if target == "pattern" and method == "zero":
        raise ValueError("target='pattern' takes method 'patch', 'mean' or 'resample'; zero attention probabilities "
                         "would equal zeroing the head output (target='z')")
    if target != "z" and head_sets is not None:
        raise ValueError(f"head_sets are scanned with target='z' only, got target={target!r}")
    if not (isinstance(batch_size, str) and batch_size == "auto") and positive_int(batch_size) is None:
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    if not (isinstance(group_positions, str) and group_positions == "auto") and positive_int(group_positions) is None:
        raise ValueError(f"group_positions must be a positive int or 'auto', got {group_positions!r}")
    shortcuts = Shortcuts.of(shortcuts)
    if checkpoint_key is not None and checkpoint is None:
        raise ValueError("checkpoint_key= names a checkpoint's scan; it needs checkpoint= (a folder) too")
    setup = prepare_scan(model, inputs, corrupt, metric, kind="exact", backend=backend)
    metric, shape, N, T = setup.metric, setup.shape, setup.N, setup.T
    layers, heads, positions = _ints(layers, "layers"), _ints(heads, "heads"), _ints(positions, "positions (token positions)")
    variants, index, axes, grid_shape, labels = _variants(shape, T, per_position, layers, heads, head_sets, positions, target)
    settings = dict(setup.settings, target=target, effect=effect, head_kind="key/value" if target in ("k", "v") else "query",
                    method=method, direction=direction if method == "patch" else None, per_position=per_position,
                    layers=layers, heads=heads, head_sets=None if head_sets is None else [list(map(list, s)) for s in head_sets],
                    positions=positions, seed=seed)

    ranks = data_parallel_ranks(distributed, model, "headint.scan")

    with running(ranks), setup.base_runs() as runs:
        base = runs.corrupt if (method == "patch" and direction == "denoising") else runs.clean
        patch_source = _patch_source(method, model, runs.clean, runs.corrupt, base, mean_inputs, backend, seed, direction, target)
        if target == "pattern":
            _check_pattern_padding(patch_source, base, shape.n_layers, method)
        freeze_source = _freeze_source(base) if effect != "total" else None
        freeze_norm = effect in ("direct_frozen_ln", "direct_path")
        freeze_mlps = effect == "direct_path"
        if freeze_norm:
            base.final_norm()  # found (or refused) before any chunk runs
        if freeze_mlps:
            base.mlp_outputs()

        # Work list: rows (variant, example), grouped by where reuse lets them start.
        # Not where the model may be tensor-parallel (a process group, the scan not split by data): the
        # cached keys/values hold every head, a sharded module's cache only its own. The same holds
        # for the runner's other shortcuts (cached head outputs, the final block's cache).
        maybe_tp = is_active() and ranks is None
        position_reuse = per_position and base.causal and base.metric.position == "last" and not maybe_tp \
            and base.layout.reusable(base.batch) and not base.shares_kv
        # Clean attention at the first intervened layer: only for head-output replacements.
        shortcuts = Shortcuts(clean_attention=shortcuts.clean_attention and target == "z" and not maybe_tp,
                              last_query=shortcuts.last_query and not maybe_tp)
        if batch_size == "auto":
            patched = max(len({l for l, _ in v.heads}) for v in variants)
            if effect != "total":
                patched = shape.n_layers - min(v.start_layer for v in variants)
            rows_per_batch = auto_rows(setup.row_geometry(base, patched), setup.memory_budget(memory_budget))
            rows_per_batch = cpu_row_cap(rows_per_batch, T, setup.device)  # cache-sized forwards on CPU
            if target == "pattern":  # + per row: the replacement probabilities, its window and P @ v scratch
                per_row = 3 * shape.n_heads * T * (T + shape.head_dim) * 4
                rows_per_batch = max(1, min(rows_per_batch, setup.memory_budget(memory_budget) // max(1, per_row)))
        else:
            rows_per_batch = positive_int(batch_size)
        rows_per_batch = agree_rows(ranks, rows_per_batch)
        # The fingerprint leaves the chunk size out: a resumed scan keeps the chunks it started with.
        # It holds group_positions as asked; "auto" is resolved from the chunk size the scan keeps,
        # so a resumed scan groups positions as the interrupted one did.
        settings["group_positions"] = group_positions if group_positions == "auto" else positive_int(group_positions)
        key = None if checkpoint is None else fingerprints.fingerprint(
            model, metric, [setup.clean, setup.corrupt], settings, key=checkpoint_key,
            extra=dict(mean_inputs=mean_inputs, shortcuts=dict(vars(shortcuts))))
        ckpt = open_checkpoint(ranks, lambda: ScanCheckpoint(checkpoint, key, rows_per_batch, settings))
        rows_per_batch = ckpt.rows_per_batch
        group = _position_group(group_positions, variants, N, rows_per_batch) if position_reuse else 1
        settings["group_positions"] = group
        starts = _group_starts(variants, group) if position_reuse else {}
        groups: dict[tuple[int, int], list[int]] = {}
        for vi, v in enumerate(variants):
            groups.setdefault((v.start_layer, starts.get(v.position, 0)), []).append(vi)
        chunks = _chunks(groups, N, rows_per_batch)
        ckpt.check_chunks([len(c.ex) for c in chunks])

        def compute(i: int) -> torch.Tensor:
            c = chunks[i]
            ckpt.save(i, _run_chunk(base, shape, variants, c.var, c.ex, T, patch_source, setup.device, c.start_layer, c.start_pos,
                                  target, freeze_source, shortcuts, freeze_norm, freeze_mlps))
            return ckpt.done[i]

        todo = [i for i in range(len(chunks)) if i not in ckpt.done]
        ckpt.done.update(run_chunks(ranks, todo, compute, progress=progress, desc="headint.scan"))
        values = torch.full((len(variants), N), float("nan"))
        for i, c in enumerate(chunks):
            values[c.var, c.ex] = ckpt.done[i]
        settings.update(settings_of(ranks, runs.cost()))

    per_example = torch.full((*grid_shape, N), float("nan"))
    for vi, idx in enumerate(index):
        per_example[idx] = values[vi]
    V = len(variants)
    L = shape.n_layers
    settings["cost_one_forward_per_intervention"] = dict(layer_forwards=V * N * L, token_layer_forwards=V * N * L * T)
    settings["batch_rows"] = rows_per_batch
    settings["position_reuse"] = position_reuse and base.position_reuse_ok
    settings["restricted_logits"] = base.restricted
    settings["metric_logits"] = runs.metric_path + _column_fallbacks(runs.clean.metric)
    settings["final_block"] = base.last_query_note if shortcuts.last_query else "full final block (shortcut off)"
    settings["clean_attention"] = shortcuts.clean_attention
    if freeze_norm:
        f = base.final_norm()
        settings["final_norm"] = dict(module=f.path, kind="LayerNorm" if f.formula.centred else "RMSNorm",
                                      weight_offset=f.formula.weight_offset, eps=f.formula.eps, scale="frozen at the base run's")
    if freeze_mlps:
        settings["frozen_mlps"] = {str(l): path for l, (path, _) in base.mlp_outputs().items()}
    return ScanResult(per_example, axes, labels=labels, metric_name=metric.name, **setup.baselines(),
                      settings=settings, base_per_example=base.base_values())


def _column_fallbacks(metric) -> str:
    """What :func:`~headint.scans.metric_logits.column_values` fell back on, if anything."""
    rows = getattr(metric, "fallback_rows", 0) if isinstance(metric, ColumnsOf) else 0
    return f" ({rows} variant rows unembedded the full vocabulary: their values showed a column the base runs did not)" if rows else ""


def _variants(shape, T, per_position, layers, heads, head_sets, positions, target="z"):
    """The scan's variants and result grid: ``(variants, index of each in the grid, axes,
    grid shape, labels)``; arguments validated. ``"k"``/``"v"`` targets range over key/value heads."""
    if head_sets is not None:
        if per_position:
            raise ValueError("head_sets and per_position=True cannot be combined: head sets are scanned over all positions")
        sets = [tuple(sorted((int(l), int(h)) for l, h in s)) for s in head_sets]
        if not sets or any(len(s) == 0 for s in sets):
            raise ValueError("head_sets must be a non-empty list of non-empty sets of (layer, head) pairs")
        for s in sets:
            head_grid(shape, [l for l, _ in s], [h for _, h in s])
        return [Variant(s) for s in sets], list(range(len(sets))), ("head_set",), (len(sets),), [list(s) for s in sets]
    n = target_heads(shape, target)
    pairs = head_grid(shape, layers, heads, n_heads=n, kind="key/value " if target in ("k", "v") else "")
    if not per_position:
        return [Variant(((l, h),)) for l, h in pairs], pairs, ("layer", "head"), (shape.n_layers, n), None
    pos = list(range(T)) if positions is None else positions
    for p in pos:
        if not 0 <= p < T:
            raise ValueError(f"positions: {p} out of range for inputs of length {T}")
    variants = [Variant(((l, h),), p) for l, h in pairs for p in pos]
    index = [(l, h, p) for l, h in pairs for p in pos]
    return variants, index, ("layer", "head", "position"), (shape.n_layers, n, T), None


def _ints(values, name: str) -> list[int] | None:
    """``values`` as plain ints (numpy and 0-d tensor ints too: they are not JSON and leak into
    counts), never floats or bools; TypeError naming ``name`` otherwise."""
    return None if values is None else [as_int(v, f"each of {name}") for v in values]


def _position_group(group_positions: int | str, variants, N: int, rows_per_batch: int) -> int:
    """How many neighbouring scanned positions share their runs (see ``scan(group_positions=)``;
    validated there): ``"auto"``, as many as fill ``rows_per_batch`` rows."""
    if group_positions == "auto":
        n_pos = len({v.position for v in variants})
        rows_per_position = max(1, len(variants) // max(n_pos, 1) * N)
        return max(1, min(n_pos, rows_per_batch // rows_per_position))
    return positive_int(group_positions)


def _group_starts(variants, group: int) -> dict[int, int]:
    """``{position: the position its runs start from}``: the scanned positions, sorted, in runs of
    ``group``, each starting from the first of its run."""
    pos = sorted({v.position for v in variants if v.position is not None})
    return {p: pos[i - i % group] for i, p in enumerate(pos)}


@dataclass(frozen=True)
class _Chunk:
    """One forward's rows: ``var[r]`` applied to example ``ex[r]``, starting at a layer and position."""

    start_layer: int
    start_pos: int
    var: torch.Tensor
    ex: torch.Tensor


def _chunks(groups: dict[tuple[int, int], list[int]], N: int, rows_per_batch: int) -> list[_Chunk]:
    chunks = []
    for (l0, p0), vis in sorted(groups.items()):
        var = torch.tensor(vis).repeat_interleave(N)
        ex = torch.arange(N).repeat(len(vis))
        for s in range(0, len(var), rows_per_batch):
            chunks.append(_Chunk(l0, p0, var[s : s + rows_per_batch], ex[s : s + rows_per_batch]))
    return chunks


def _run_chunk(base: VariantRunner, shape, variants, var, ex, T, patch_source, device, l0, p0, target="z", freeze_source=None,
               shortcuts: Shortcuts | None = None, freeze_norm: bool = False, freeze_mlps: bool = False) -> torch.Tensor:
    """Evaluate one chunk ``[R]``; on out-of-memory (CUDA or CPU), split it in halves and retry."""

    def run(rows: torch.Tensor) -> torch.Tensor:
        e = ex[rows].to(device)
        plan = build_plan(shape, variants, e, var[rows], T, patch_source, device, target, freeze_source)
        # every row of a chunk starts at layer l0 (chunks are grouped so): its MLPs from l0 on are frozen
        return base.run(e, plan, start_layer=l0, start_pos=p0, shortcuts=shortcuts or Shortcuts(),
                        freeze_final_norm=freeze_norm, freeze_mlps_from=l0 if freeze_mlps else None).float().cpu()

    return run_in_halves(run, torch.arange(len(ex)), device)


def _check_pattern_padding(patch_source, base: VariantRunner, n_layers: int, method: str) -> None:
    """Source attention probabilities must put no weight on keys that are padding in the example
    they are patched into (such weight would read padding's values: padding would change the
    result). Checked once, for every example and layer."""
    mask = base.batch["attention_mask"].bool()
    ex = torch.arange(base.N, device=mask.device)
    for l in range(n_layers):
        probs = patch_source(l, ex)  # [N or 1, H, T, T]
        m = mask.to(probs.device)
        leak = (probs.abs() * (m[:, None, :, None] & ~m[:, None, None, :])).amax(dim=(1, 2, 3))  # [N]
        if bool((leak > 0).any()):
            n = int((leak > 0).nonzero()[0])
            raise ValueError(f"target='pattern' with method={method!r}: the source attention pattern for example {n} (layer {l}) "
                             f"puts weight on keys that are padding in that example; patterns only transfer between examples "
                             f"padded alike (use unpadded inputs, or method='patch' with corrupt inputs padded like the clean ones)")


def _freeze_source(base: VariantRunner):
    """``fn(layer, ex) -> [R, H, T, D]``: the base run's head outputs, to freeze (direct effects)."""
    return lambda layer, ex: base.base.z[layer][ex.to(base.base.z[layer].device)].transpose(1, 2)


def _recorded(runner: VariantRunner, target: str, backend: str = "auto") -> dict[int, torch.Tensor]:
    """``{layer: [N, Hx, T, D]}``: the runner's base-run values of ``target``, head-major.
    ``z``, ``k`` and ``v`` come from the clean pass; ``q`` and ``pattern`` (``[N, H, T, T]``)
    are recorded by one more forward (in the runner's replica)."""
    if target == "z":
        return {l: z.transpose(1, 2) for l, z in runner.base.z.items()}
    if target in ("k", "v"):
        return dict(runner.base.k if target == "k" else runner.base.v)
    cache = _record_inputs(runner, runner.batch, target, backend)
    return {l: cache.get(target, l) for l in cache.layers()}


def _record_inputs(runner: VariantRunner, batch: dict, target: str, backend: str):
    return record_in(runner.replica, runner.layout.model_inputs(batch), what=(target,), backend=backend)


def _patch_source(method, model, clean_runner, corrupt_runner, base, mean_inputs, backend, seed, direction, target="z"):
    """``fn(layer, ex) -> [R or 1, Hx, T, D] | None``: replacement values of ``target`` (head
    outputs, queries, keys or values, head-major) for rows ``ex``."""
    if method == "zero":
        return lambda layer, ex: None
    if method == "mean":
        if mean_inputs is None:
            acts, mask = _recorded(base, target, backend), base.batch["attention_mask"]
        else:
            ref = with_position_ids(model, base.layout.batch(mean_inputs, "mean_inputs"), "mean_inputs", base.layout)
            if ref["input_ids"].shape[1] != base.T:
                raise ValueError(f"mean_inputs have length {ref['input_ids'].shape[1]} (shape {list(ref['input_ids'].shape)}); "
                                 f"the per-position mean needs the inputs' length {base.T}")
            cache = _record_inputs(base, ref, target, backend)
            acts = {l: cache.get(target, l) for l in cache.layers()}
            if target == "z":
                acts = {l: x.transpose(1, 2) for l, x in acts.items()}
            mask = ref["attention_mask"]
        means = {}
        for l, x in acts.items():  # x [N, Hx, T, D or T]; per-position mean over the non-padding examples
            w = mask.to(x.device).float()[:, None, :, None]
            means[l] = ((x.float() * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp_min(1)).to(x.dtype)
        return lambda layer, ex: means[layer]  # [1, Hx, T, D]
    if method == "resample":
        acts = _recorded(base, target, backend)
        perm = _derangement(base.N, seed).to(base.batch["input_ids"].device)
        return lambda layer, ex: acts[layer][perm[ex].to(acts[layer].device)]
    acts = _recorded(clean_runner if direction == "denoising" else corrupt_runner, target, backend)
    # each layer's cached values sit on that layer's device (models split across devices)
    return lambda layer, ex: acts[layer][ex.to(acts[layer].device)]
