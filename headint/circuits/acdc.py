"""ACDC (Conmy et al. 2023): greedy pruning of edges in reverse topological order.

Start with every edge in scope in the circuit. Visit the receivers from the logits backwards
(the reverse of :class:`~headint.circuits.graph.EdgeGraph`'s receiver order) and, for each, its
incoming edges from the latest sender to the earliest. Removing an edge means patching it with
its source value (see :mod:`headint.circuits.patching`: removed edges carry the source, every
other edge its value in the same forward). An edge is removed for good when

- ``criterion="kl"`` (ACDC's default): ``KL(clean || circuit without it) - KL(clean || circuit)
  < threshold`` (KL of the next-token distributions at the last real token, mean over examples);
- a metric: the metric's loss of performance ``m(circuit) - m(without it)`` (for metrics that
  are better high; ``maximize=False`` flips it) ``< threshold``; or, with ``abs_value=True``,
  ``|m(without it) - m(circuit)| < threshold``.

Candidates are evaluated in batches: a batch holds the next candidates of one receiver, row
``i`` the current circuit without candidates ``1..i`` (speculating that they are all removed)
or without candidate ``i`` alone (speculating that none is), whichever the last decision
suggests; the decisions are then made in order, each against the circuit it really faces, and
the batch is abandoned at the first decision that contradicts its speculation. The result is
the one the one-at-a-time algorithm gives (tested).
"""

from __future__ import annotations

import torch

from ..metrics import KLFromClean
from .graph import EdgeGraph
from .inputs import paired, resolve_metric
from .patching import SourceValues, patch_edges
from .structure import circuit_structure


def acdc(model, clean, corrupt=None, *, threshold: float, criterion="kl", source: str = "corrupt", maximize: bool | None = None,
         abs_value: bool = False, graph: EdgeGraph | None = None, batch_size: int = 256, seed: int = 0, progress: bool = False) -> dict:
    """Run ACDC; returns a dict with ``graph``, ``in_circuit`` bool ``[E]``, ``effect`` ``[E]`` (the
    criterion's change when the edge was tried: positive = removing it hurt), the circuit's and
    the full model's criterion values, and the cost. See the module docstring."""
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold != threshold:
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    metric = KLFromClean() if criterion == "kl" else resolve_metric(criterion)
    if abs_value:
        sign = 1.0
    else:
        if maximize is None:
            maximize = metric.maximize
            if maximize is None:
                raise ValueError(f"criterion {metric.name!r}: say whether it is better high (maximize=True) or low "
                                 "(maximize=False), or use abs_value=True")
        sign = 1.0 if maximize else -1.0
    st = circuit_structure(model)
    full = EdgeGraph(st.n_layers, st.n_heads, st.n_kv_heads, st.has_mlp, st.parallel)
    graph = full if graph is None else graph
    clean_b, corrupt_b = paired(clean, corrupt)
    device = next(model.parameters()).device
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        src = SourceValues(model, st, graph, clean_b, corrupt_b, source, batch_size, device, seed)
    finally:
        for m, t in training:
            m.training = t
    N = clean_b["input_ids"].shape[0]
    cost = {"forwards": 0, "rows": 0, "batches": 0}

    def evaluate(sets: list[torch.Tensor]) -> list[float]:
        res = patch_edges(model, clean_b, sets, metric, corrupt=corrupt_b, graph=graph, batch_size=batch_size, _sources=src)
        cost["forwards"] += res["cost"]["forwards"]
        cost["rows"] += res["cost"]["rows"]
        cost["batches"] += 1
        return res["values"].double().mean(1).tolist()

    E = graph.n_edges
    removed = torch.zeros(E, dtype=torch.bool)
    effect = torch.full((E,), float("nan"))
    full_value = evaluate([removed.clone()])[0]
    current = full_value
    by_receiver: dict[int, list[int]] = {}
    for e, (s, r) in enumerate(graph.edges):
        by_receiver.setdefault(r, []).append(e)
    window = max(1, batch_size // N)
    speculate_removed = True
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=E, desc="headint.acdc")
    for r in sorted(by_receiver, reverse=True):
        todo = sorted(by_receiver[r], key=lambda e: graph.edges[e][0], reverse=True)
        while todo:
            cand = todo[:window]
            sets = []
            acc = removed.clone()
            for e in cand:
                if speculate_removed:
                    acc = acc.clone()
                    acc[e] = True
                    sets.append(acc)
                else:
                    one = removed.clone()
                    one[e] = True
                    sets.append(one)
            values = evaluate(sets)
            done = 0
            for i, e in enumerate(cand):
                # row i is valid if the circuit it assumed is the current one plus e removed
                assumed = sets[i].clone()
                assumed[e] = False
                if not torch.equal(assumed, removed):
                    break
                change = sign * (current - values[i]) if not abs_value else abs(values[i] - current)
                effect[e] = change
                done += 1
                if change < threshold:
                    removed[e] = True
                    current = values[i]
                    speculate_removed = True
                else:
                    speculate_removed = False
            todo = todo[done:]
            if bar is not None:
                bar.update(done)
    if bar is not None:
        bar.close()
    return dict(graph=graph, in_circuit=~removed, effect=effect, circuit_value=current, full_value=full_value,
                n_examples=int(N), cost=cost, metric_name=metric.name, threshold=float(threshold))
