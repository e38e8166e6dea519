"""Attention-knockout scans (Geva et al. 2023): block the edges from a target position to a set
of source positions in a window of consecutive layers, for every window start.

Every (window, head, source set) variant of every example is one batch row of a
:class:`~headint.plan.TensorPlan` whose layers in the window carry a compact
:class:`~headint.ops.EdgeKnockout` (a query selector ``[R, H | 1, T]`` true at the row's
target position, a key selector ``[R, 1, T]`` true at its sources), so a row costs ``O(T)``
on top of its forward, never ``O(T^2)``. Rows reuse the clean run: blocks below the window
are replayed, and on causal models with a last-position metric only the tokens from the
earliest target position on are fed (the clean keys/values of earlier ones as a KV cache).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from tqdm.auto import tqdm

from ..interventions import CallPlan
from ..metrics import last_positions
from ..ops.knockout import EdgeKnockout
from ..plan import TensorPlan
from ..results.knockout import KnockoutResult
from .batching import auto_rows, positive_int, run_in_halves
from .setup import prepare_scan


def _positions(x: Any, N: int, T: int, what: str) -> torch.Tensor:
    """A source set as bool ``[N, T]``: a list of absolute columns (shared), an int, or a bool
    tensor ``[T]`` / ``[N, T]``."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.bool:
        if x.dim() == 1 and x.shape[0] == T:
            return x[None].expand(N, T).cpu()
        if x.dim() == 2 and tuple(x.shape) == (N, T):
            return x.cpu()
        raise ValueError(f"knockout_scan: {what} as a bool tensor must be [T] = [{T}] or [N, T] = [{N}, {T}], got {list(x.shape)}")
    items = x.tolist() if isinstance(x, torch.Tensor) and x.dim() <= 1 and not x.is_floating_point() else x
    if isinstance(items, numbers.Integral) and not isinstance(items, bool):
        items = [items]
    if not isinstance(items, (list, tuple, range)) or not items or any(
            isinstance(p, bool) or not isinstance(p, numbers.Integral) for p in items):
        raise TypeError(f"knockout_scan: {what} must be 'each', a non-empty list of int positions, a bool tensor [T] or [N, T], "
                        f"or a dict of such sets; got {x!r}")
    bad = [int(p) for p in items if not 0 <= int(p) < T]
    if bad:
        raise ValueError(f"knockout_scan: {what} positions {bad} out of range for inputs of length {T} (0..{T - 1})")
    sel = torch.zeros(N, T, dtype=torch.bool)
    sel[:, [int(p) for p in items]] = True
    return sel


def _source_sets(sources: Any, N: int, T: int) -> tuple[torch.Tensor, list]:
    """``(sets [S, N, T] bool, labels)``."""
    if isinstance(sources, str):
        if sources != "each":
            raise ValueError(f"knockout_scan: sources must be 'each', positions, a bool tensor or a dict of them; got {sources!r}")
        return torch.eye(T, dtype=torch.bool)[:, None, :].expand(T, N, T), list(range(T))
    if isinstance(sources, dict):
        if not sources:
            raise ValueError("knockout_scan: sources is an empty dict")
        labels = [str(k) for k in sources]
        return torch.stack([_positions(v, N, T, f"sources[{k!r}]") for k, v in sources.items()]), labels
    return _positions(sources, N, T, "sources")[None], ["sources"]


def _targets(target_position: Any, mask: torch.Tensor) -> torch.Tensor:
    """Absolute target column per example ``[N]``: a negative int counts back from each
    example's last real token (-1: the last one), a non-negative int is a column, a 1-D int
    tensor / list gives one column per example; every target must be a real token."""
    N, T = mask.shape
    last = last_positions(mask).cpu()
    if isinstance(target_position, numbers.Integral) and not isinstance(target_position, bool):
        t = int(target_position)
        cols = last + 1 + t if t < 0 else torch.full((N,), t)
    elif isinstance(target_position, (list, tuple)) or (isinstance(target_position, torch.Tensor) and target_position.dim() == 1
                                                         and not target_position.is_floating_point() and target_position.dtype != torch.bool):
        cols = torch.as_tensor(list(target_position) if not isinstance(target_position, torch.Tensor) else target_position.cpu())
        if cols.dim() != 1 or cols.shape[0] != N or cols.is_floating_point() or cols.dtype == torch.bool:
            raise ValueError(f"knockout_scan: target_position as a list/tensor must hold one int column per example ([{N}]), got {target_position!r}")
        cols = cols.long()
    else:
        raise TypeError(f"knockout_scan: target_position must be an int (negative: from each example's last real token) "
                        f"or one int column per example; got {target_position!r}")
    bad = ((cols < 0) | (cols >= T)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"knockout_scan: target_position {target_position!r} gives columns {cols[bad].tolist()} outside 0..{T - 1} "
                         f"for examples {bad}")
    real = mask.cpu()[torch.arange(N), cols] != 0
    if not bool(real.all()):
        raise ValueError(f"knockout_scan: target_position {target_position!r} points at padding in examples "
                         f"{(~real).nonzero().flatten().tolist()}")
    return cols


def knockout_scan(
    model,
    inputs,
    metric,
    *,
    sources: Any = "each",
    target_position: Any = -1,
    window: int = 1,
    per_head: bool = False,
    batch_size: int | str = "auto",
    memory_budget: int | None = None,
    progress: bool = True,
    backend: str = "auto",
) -> KnockoutResult:
    """The metric with the attention edges from ``target_position`` to ``sources`` blocked in
    ``window`` consecutive layers, for every window start (and every head with ``per_head``).

    Args:
        inputs: ``[N, T]`` token ids or a dict (see :func:`headint.scan`); left-padded batches
            get position ids from their mask.
        metric: a metric name, :class:`~headint.metrics.Metric` or callable.
        sources: ``"each"`` (every position in turn: one column per absolute position ``0 .. T-1``),
            a list of absolute positions or a bool tensor ``[T]`` / ``[N, T]`` (one set, e.g. the
            subject tokens of each example), or a dict ``name -> set`` (one column per set).
        target_position: the query whose edges are blocked: a negative int counts back from each
            example's last real token (``-1``, the default: the last one), a non-negative int is an
            absolute column, or one column per example (list / int tensor ``[N]``).
        window: layers per window; windows start at ``0 .. L - window``.
        per_head: block the edges in one head at a time (else in every head of the window).
        batch_size: rows (variant x example) per forward, or ``"auto"`` (from ``memory_budget``).

    Returns a :class:`~headint.results.knockout.KnockoutResult`: ``per_example`` ``[W, S, N]``
    (``per_head``: ``[W, H, S, N]``), ``to_frame()``, ``heatmap()``.

    What the default shows: with ``target_position=-1`` only the last token's reads are
    blocked, so a scan shows the layers that move information *into the last position* and
    hides every earlier hop of the route (on induction-2l: layer 1 -18.68 logit difference,
    layer 0 -0.011, although the layer-0 edge from the token to copy to its previous token costs
    -17.47). For the edges along a route, scan (source, target) pairs with
    :func:`headint.scans.route.route_knockout_scan`.
    """
    setup = prepare_scan(model, inputs, None, metric, kind="knockout", backend=backend)
    shape, N, T, device = setup.shape, setup.N, setup.T, setup.device
    L, H = shape.n_layers, shape.n_heads
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or not 1 <= int(window) <= L:
        raise ValueError(f"knockout_scan: window must be an int in 1..{L} (the model has {L} layers), got {window!r}")
    window = int(window)
    if not isinstance(per_head, bool):
        raise TypeError(f"knockout_scan: per_head must be True or False, got {per_head!r}")
    if not (isinstance(batch_size, str) and batch_size == "auto") and positive_int(batch_size) is None:
        raise ValueError(f"knockout_scan: batch_size must be a positive int or 'auto', got {batch_size!r}")
    sets, labels = _source_sets(sources, N, T)
    targets = _targets(target_position, setup.clean["attention_mask"])
    W, S = L - window + 1, len(labels)
    Hh = H if per_head else 1
    grid = (W, Hh, S)

    with setup.base_runs() as runs:
        base = runs.clean
        if batch_size == "auto":
            rows_per_batch = auto_rows(setup.row_geometry(base, patched_layers=window), setup.memory_budget(memory_budget))
        else:
            rows_per_batch = positive_int(batch_size)
        start_pos = int(targets.min())  # nothing before the earliest target changes
        values = torch.full((W, Hh * S * N), float("nan"))
        n_var = Hh * S
        chunks = [(w, s) for w in range(W) for s in range(0, n_var * N, rows_per_batch)]
        cols = torch.arange(T)
        for w, s in tqdm(chunks, desc="headint.knockout_scan", disable=not progress, unit="batch"):
            def run(rows: torch.Tensor, w=w) -> torch.Tensor:
                var, ex = rows // N, rows % N
                head, src = var // S, var % S
                qsel = (cols[None, :] == targets[ex][:, None])  # [R, T]
                if per_head:
                    q = (torch.arange(H)[None, :, None] == head[:, None, None]) & qsel[:, None, :]  # [R, H, T]
                else:
                    q = qsel[:, None, :]
                k = sets[src, ex][:, None, :]  # [R, 1, T]
                ko = EdgeKnockout(q.to(device), k.to(device))
                plan = TensorPlan({l: CallPlan(knockouts=[ko]) for l in range(w, w + window)})
                return base.run(ex.to(device), plan, start_layer=w, start_pos=start_pos).float().cpu()

            rows = torch.arange(s, min(n_var * N, s + rows_per_batch))
            values[w, rows] = run_in_halves(run, rows, device, "headint.knockout_scan")

    per_example = values.view(*grid, N)
    if not per_head:
        per_example = per_example[:, 0]
    settings = dict(setup.settings, sources=sources if isinstance(sources, str) else labels, window=window, per_head=per_head,
                    target_position=target_position if isinstance(target_position, int) else targets.tolist(),
                    batch_rows=rows_per_batch, start_pos=start_pos, cost=runs.cost())
    return KnockoutResult(per_example, labels, window, per_head, base.base_values().float().cpu(), setup.metric.name, settings)
