"""Circuit faithfulness of head sets and edge sets, with bootstrap intervals over prompts, under
any ablation choice (definitions: :mod:`headint.results.faithfulness`).

Circuit scores depend on how the rest of the model is ablated (Miller et al., COLM 2024:
the same IOI circuit scores 87% as published and below 0% or above 100% under other reasonable
choices), so every function here takes the choice explicitly and :func:`faithfulness_across`
puts several side by side:

- ``ablation``: what a removed head's output ``z`` becomes: ``"zero"``, ``"mean"`` (its mean
  over the inputs, per position, padding left out), ``"resample"`` (another prompt's ``z``, the
  seeded derangement of :func:`headint.scan`) or ``"patch"`` (the ``corrupt`` prompt's ``z``):
  the same replacements as the exact scans.
- ``positions``: None (every position) or the positions at which removed heads are ablated
  (elsewhere they run intact), e.g. only the last token.
- node vs edge: :func:`circuit_faithfulness` removes *heads* (a node circuit; every head not in
  the circuit is replaced in every path); :func:`edge_faithfulness` removes *edges* of the edge
  graph (:mod:`headint.circuits`; an edge outside the circuit carries its sender's source value
  into its receiver only: the semantics of :func:`headint.circuits.patch_edges`);
  :func:`node_edges` turns a head set into the edge set among its heads, the input, the MLPs
  and the logits, so the two levels can be compared on one circuit.

Every (circuit, prompt) pair is one batch row (node level: a per-row head mask
``[R, H, T]`` per layer in the fused kernels; edge level: one edge patch per row), so a whole
family of circuits - a curve over circuit size, each row its own circuit - costs forwards over
``(K + 2) * N`` rows in chunks of ``batch_size``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..interventions import CallPlan
from ..plan import TensorPlan
from ..results.faithfulness import FaithfulnessResult
from ..results.gates import GateResult
from ..results.grid import head_set_name
from .batching import auto_rows, check_batch_size, run_in_halves
from .exact import _patch_source
from .masking import check_head
from .setup import prepare_scan
from ..vocabulary import METHODS

__all__ = ["NODE_ABLATIONS", "circuit_faithfulness", "faithfulness_curve", "edge_faithfulness", "node_edges",
           "faithfulness_across", "ranking_of"]

# The replacements of a removed head's output: those of the exact scans (:func:`headint.scan`).
NODE_ABLATIONS = METHODS


def _circuits(circuits: Any, shape) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """``(names, head lists)`` from a dict ``name -> heads``, a list of head lists, or a GateResult."""
    if isinstance(circuits, GateResult):
        circuits = {"gates": circuits.open_heads}
    if isinstance(circuits, dict):
        items = list(circuits.items())
    elif isinstance(circuits, (list, tuple)):
        items = [(None, c) for c in circuits]
    else:
        raise TypeError(f"circuit_faithfulness: circuits must be a dict name -> [(layer, head), ...], a list of such "
                        f"head lists or a GateResult; got {type(circuits).__name__}")
    if not items:
        raise ValueError("circuit_faithfulness: circuits is empty")
    names, sets = [], []
    for i, (name, heads) in enumerate(items):
        if isinstance(heads, GateResult):
            heads = heads.open_heads
        if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
            raise TypeError(f"circuit_faithfulness: circuit {name if name is not None else i!r} must be a list of (layer, head) "
                            f"pairs, got {heads!r}")
        hs = [check_head(h, shape, f"circuit_faithfulness: circuit {name if name is not None else i!r}") for h in heads]
        if len(set(hs)) != len(hs):
            raise ValueError(f"circuit_faithfulness: circuit {name if name is not None else i!r} names a head twice: {hs}")
        names.append(str(name) if name is not None else (head_set_name(sorted(hs)) if hs else "{}"))
        sets.append(sorted(hs))
    return names, sets


def circuit_faithfulness(
    model,
    inputs,
    circuits,
    metric="logit_diff",
    *,
    ablation: str = "mean",
    corrupt=None,
    positions: Sequence[int] | None = None,
    mean_inputs=None,
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
) -> FaithfulnessResult:
    """Each head set alone and as a complement (see :mod:`headint.results.faithfulness`).

    Args:
        inputs: ``[N, T]`` token ids or a dict (``input_ids``, ``attention_mask`` and what the
            metric reads), as :func:`headint.scan`.
        circuits: a dict ``name -> [(layer, head), ...]``, a list of head lists, or a
            :class:`~headint.results.gates.GateResult` (its open heads).
        ablation: ``"zero"``, ``"mean"``, ``"resample"`` or ``"patch"`` (needs ``corrupt``).
        positions: ablate removed heads only at these (absolute) positions; None: everywhere.
        mean_inputs: the reference set of ``"mean"`` (default the inputs). seed: ``"resample"``.
        batch_size: rows (circuit x prompt) per forward; None sizes them from ``memory_budget``.

    Returns a :class:`~headint.results.faithfulness.FaithfulnessResult` (``to_frame()``:
    faithfulness with bootstrap intervals, complement, per-prompt spread; ``areas()``).
    Each value equals a forward with hooks that replace the removed heads' outputs at the output
    projection's input (tests/test_faithfulness.py checks it).
    """
    if ablation not in NODE_ABLATIONS:
        raise ValueError(f"circuit_faithfulness: ablation must be one of {NODE_ABLATIONS}, got {ablation!r}")
    if ablation == "patch" and corrupt is None:
        raise ValueError("circuit_faithfulness: ablation='patch' needs corrupt= inputs (what removed heads are patched from)")
    if ablation != "patch" and corrupt is not None:
        raise ValueError(f"circuit_faithfulness: corrupt= is the source of ablation='patch'; ablation={ablation!r} does not read it")
    batch_size = check_batch_size(batch_size)
    setup = prepare_scan(model, inputs, corrupt, metric, kind="faithfulness", backend=backend)
    shape, N, T, device = setup.shape, setup.N, setup.T, setup.device
    L, H = shape.n_layers, shape.n_heads
    names, sets = _circuits(circuits, shape)
    pos = torch.ones(T, dtype=torch.bool)
    if positions is not None:
        ps = [int(p) for p in positions]
        bad = [p for p in ps if not -T <= p < T]
        if not ps or bad:
            raise ValueError(f"circuit_faithfulness: positions must be a non-empty list of positions in 0..{T - 1}, got {list(positions)}")
        pos = torch.zeros(T, dtype=torch.bool)
        pos[ps] = True
    everything = [(l, h) for l in range(L) for h in range(H)]
    # rows of kept-head sets: intact, none, each circuit alone, each complement
    kept_sets = [everything, []] + sets + [[x for x in everything if x not in set(s)] for s in sets]
    K = len(sets)
    keep = torch.zeros(len(kept_sets), L, H, dtype=torch.bool)
    for r, s in enumerate(kept_sets):
        for l, h in s:
            keep[r, l, h] = True
    # mask [S, L, H, T]: 0 where a removed head is ablated
    masks = (keep[..., None] | ~pos[None, None, None, :]).float()

    with setup.base_runs() as runs:  # the replica holds the weights without requires_grad
        base = runs.clean
        source = _patch_source(ablation, model, runs.clean, runs.corrupt, base, mean_inputs, backend, seed, "noising", "z")
        if batch_size is None:
            batch_size = auto_rows(setup.row_geometry(base, patched_layers=L), setup.memory_budget(memory_budget))
        var = torch.arange(len(kept_sets)).repeat_interleave(N)
        exs = torch.arange(N).repeat(len(kept_sets))
        att = shape.attention_layers

        def run(rows: torch.Tensor) -> torch.Tensor:
            ex = exs[rows].to(device)
            m = masks[var[rows]].to(device)
            plan = TensorPlan({l: CallPlan(head_mask=m[:, l], head_patch=source(l, ex)) for l in att})
            with torch.no_grad():
                return base.run(ex, plan).float().cpu()

        values = torch.cat([run_in_halves(run, torch.arange(s, min(len(var), s + batch_size)), device,
                                          "headint.circuit_faithfulness") for s in range(0, len(var), batch_size)])
        values = values.view(len(kept_sets), N)
    settings = dict(setup.settings, ablation=ablation, positions=None if positions is None else [int(p) for p in positions],
                    level="node", seed=seed if ablation == "resample" else None, batch_rows=batch_size,
                    circuits={n: [list(h) for h in s] for n, s in zip(names, sets)})
    return FaithfulnessResult(names, [len(s) for s in sets], L * H, values[2:2 + K], values[2 + K:], values[0], values[1],
                              setup.metric.name, settings)


def ranking_of(order: Any, shape=None) -> list[tuple[int, int]]:
    """Heads, most important first, from a :class:`~headint.results.gates.GateResult` (reverse
    of :meth:`~headint.results.gates.GateResult.order`), a head ScanResult (largest ``|effect|``
    first) or a list of ``(layer, head)`` pairs (as given)."""
    if isinstance(order, GateResult):
        return list(reversed(order.order()))
    if hasattr(order, "effect") and hasattr(order, "axes"):
        if tuple(order.axes) != ("layer", "head"):
            raise ValueError(f"ranking_of: a ScanResult ranking must have axes ('layer', 'head'), got {order.axes}")
        eff = order.effect.abs()
        L, H = eff.shape
        heads = [(l, h) for l in range(L) for h in range(H)]
        return sorted(heads, key=lambda x: (-float(torch.nan_to_num(eff[x], nan=-1.0)), x))
    return [tuple(int(v) for v in x) for x in order]


def faithfulness_curve(model, inputs, ranking, metric="logit_diff", *, sizes: Sequence[int] | None = None,
                       **kwargs) -> FaithfulnessResult:
    """The top-``k`` heads of ``ranking`` (see :func:`ranking_of`) as circuits for each ``k`` in
    ``sizes`` (default ``0 .. L*H``), evaluated in one batched call of
    :func:`circuit_faithfulness` (``kwargs``: its ablation choices); ``areas()`` gives CPR and
    CMD over the curve with bootstrap intervals."""
    heads = ranking_of(ranking)
    n = len(heads)
    sizes = list(range(n + 1)) if sizes is None else [int(k) for k in sizes]
    if any(not 0 <= k <= n for k in sizes):
        raise ValueError(f"faithfulness_curve: sizes must lie in 0..{n} (the ranking's length), got {sizes}")
    return circuit_faithfulness(model, inputs, {f"top{k}": heads[:k] for k in sizes}, metric, **kwargs)


def node_edges(graph, heads: Sequence[tuple[int, int]]) -> list[str]:
    """The edges of ``graph`` (:class:`headint.circuits.EdgeGraph`) among the heads of a node
    circuit, the input, every MLP and the logits: the edge-level reading of a head set (an
    edge whose sender or receiving head lies outside the set is left out)."""
    import re

    keep = {f"a{l}.h{h}" for l, h in heads}
    out = []
    for name in graph.names:
        sender, receiver = name.split("->")
        rnode = re.sub(r"<.*>$", "", receiver)
        ok_s = not sender.startswith("a") or sender in keep
        if re.match(r"a\d+\.kv\d+$", rnode):  # a key/value head under GQA: kept if any of its query heads is
            ok_r = any(k.startswith(rnode.split(".")[0] + ".") for k in keep)
        else:
            ok_r = not rnode.startswith("a") or rnode in keep
        if ok_s and ok_r:
            out.append(name)
    return out


def edge_faithfulness(model, inputs, edge_sets, metric="logit_diff", *, source: str = "mean", corrupt=None, graph=None,
                      empty=(), batch_size: int = 32, seed: int = 0) -> FaithfulnessResult:
    """Edge circuits alone and as complements: an edge outside the circuit (alone) or inside it
    (complement) carries its sender's ``source`` value (``"corrupt"``, ``"mean"``,
    ``"resample"``; :mod:`headint.circuits.patching`) into its receiver. ``edge_sets``: a dict
    ``name -> edge names`` or a list of edge-name lists. Rows: (edge set, prompt) pairs, all
    edge sets in one batched :func:`headint.circuits.patch_edges` call.

    ``empty``: the edges of the empty circuit, never patched (default none: ``none`` is every
    edge patched, the input's included); :func:`faithfulness_across` passes
    ``node_edges(graph, [])`` (the input, MLP and logit edges) so that a head set scores the same
    at both levels: with ``source="mean"`` a head set's edge circuit :func:`node_edges` gives
    exactly the node-level ``ablation="mean"`` values (the mean of ``z @ W_O`` is the mean of
    ``z`` times ``W_O``)."""
    from ..circuits import graph_of
    from ..circuits.patching import patch_edges

    g = graph or graph_of(model)
    items = list(edge_sets.items()) if isinstance(edge_sets, dict) else [(f"edges{i}", e) for i, e in enumerate(edge_sets)]
    if not items:
        raise ValueError("edge_faithfulness: edge_sets is empty")
    all_edges = torch.ones(g.n_edges, dtype=torch.bool)
    floor = g.edge_mask(list(empty))
    alone, comp = [], []
    for name, edges in items:
        m = g.edge_mask(list(edges))
        alone.append(all_edges & ~m & ~floor)
        comp.append(m & ~floor)
    sets = [torch.zeros_like(all_edges), all_edges & ~floor] + alone + comp
    out = patch_edges(model, inputs, sets, metric, corrupt=corrupt, source=source, graph=g, batch_size=batch_size, seed=seed)
    v = out["values"]
    K = len(items)
    settings = dict(ablation=source, positions=None, level="edge", seed=seed if source == "resample" else None,
                    n_edges=int(g.n_edges), empty_edges=int(floor.sum()), cost=out["cost"])
    return FaithfulnessResult([n for n, _ in items], [int(g.edge_mask(list(e)).sum()) for _, e in items], int(g.n_edges),
                              v[2:2 + K], v[2 + K:], v[0], v[1], str(getattr(metric, "name", metric)), settings)


def faithfulness_across(model, inputs, circuits, metric="logit_diff", *, choices: Sequence[dict], n_boot: int = 1000,
                        level: float = 0.95, seed: int = 0):
    """One table of the same circuits under several ablation choices, side by side.

    ``choices``: dicts of :func:`circuit_faithfulness` keyword arguments (``ablation``,
    ``positions``, ``corrupt``, ...), or with ``level="edge"`` of :func:`edge_faithfulness`
    (``source``, ``corrupt``; head circuits are read as :func:`node_edges`), each optionally
    with a ``name``. Returns ``(frame, results)``: the concatenated :meth:`to_frame` tables with
    a ``choice`` column, and the :class:`FaithfulnessResult` of each choice."""
    import pandas as pd

    frames, results = [], {}
    for i, choice in enumerate(choices):
        c = dict(choice)
        name = str(c.pop("name", None) or ", ".join(f"{k}={v}" for k, v in c.items() if k != "corrupt") or f"choice{i}")
        if c.pop("level", "node") == "edge":
            from ..circuits import graph_of

            g = c.pop("graph", None) or graph_of(model)
            names, sets = _circuits(circuits, _Shape(g.n_layers, g.n_heads))
            c.setdefault("empty", node_edges(g, []))
            res = edge_faithfulness(model, inputs, {n: node_edges(g, s) for n, s in zip(names, sets)}, metric, graph=g, **c)
        else:
            res = circuit_faithfulness(model, inputs, circuits, metric, **c)
        res.settings["choice"] = name
        results[name] = res
        frames.append(res.to_frame(n_boot, level, seed))
    return pd.concat(frames, ignore_index=True), results


class _Shape:
    def __init__(self, n_layers: int, n_heads: int):
        self.n_layers, self.n_heads = n_layers, n_heads
