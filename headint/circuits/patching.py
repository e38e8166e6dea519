"""Exact edge patching: the metric when chosen edges carry a source value into their receivers.

For a set ``P`` of edges, receiver ``v``'s input in the patched forward is

    x_v = (residual stream of this forward) + sum over (u -> v) in P of (source_u - a_u),

with ``a_u`` the sender's output *in this forward* (so patches compose: a receiver downstream
of a patched edge sees the changed senders) and ``source_u`` its value in the source run. A
single edge ``u -> v`` thus changes only ``v``'s input by ``source_u - clean_u``; a set removed
from a circuit is ACDC's / Hanna et al.'s ``evaluate_graph`` semantics. Every batch row carries
its own edge set; all rows of a batch run in one forward (q/k/v inputs are edited per head
before the head's norm and projection, MLP inputs before the MLP's norm, the logits' input at
the end of the last block).

Sources (``source=``): ``"corrupt"`` (the corrupt inputs' run, example by example), ``"mean"``
(each sender's output averaged over the clean examples, per position, padding left out) or
``"resample"`` (another clean example's run, a seeded permutation without fixed points).
"""

from __future__ import annotations

import torch

from .graph import EdgeGraph
from .inputs import forward_kwargs, logits_of, metric_values, paired, resolve_metric, rows
from .structure import circuit_structure
from .taps import EdgePatch, Taps

SOURCES = ("corrupt", "mean", "resample")


class SourceValues:
    """Sender outputs of the source run for every example (``values[key]`` ``[N, ...]``) and the
    clean run's logits (for metrics that compare with them)."""

    def __init__(self, model, st, graph, clean_b, corrupt_b, source: str, batch_size: int, device, seed: int = 0):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if source == "corrupt" and corrupt_b is None:
            raise ValueError("source='corrupt' needs corrupt= inputs")
        N = clean_b["input_ids"].shape[0]
        if source == "resample" and N < 2:
            raise ValueError("source='resample' needs at least 2 examples")
        self.clean_logits, clean_vals = _collect(model, st, graph, clean_b, batch_size, device)
        if source == "corrupt":
            _, self.values = _collect(model, st, graph, corrupt_b, batch_size, device, logits=False)
        elif source == "mean":
            mask = clean_b["attention_mask"].to(device).bool()
            self.values = {}
            for k, v in clean_vals.items():
                m = mask.to(v.dtype).reshape(*mask.shape, *([1] * (v.dim() - 2)))
                mean = (v * m).sum(0) / m.sum(0).clamp_min(1)
                self.values[k] = mean[None].expand_as(v)
        else:
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(N, generator=g)
            while N > 1 and bool((perm == torch.arange(N)).any()):
                perm = torch.randperm(N, generator=g)
            self.perm = perm
            self.values = {k: v[perm.to(v.device)] for k, v in clean_vals.items()}
        self.source = source

    def rows(self, ex: torch.Tensor) -> dict:
        return {k: v[ex.to(v.device)] for k, v in self.values.items()}


def _collect(model, st, graph, batch, batch_size, device, logits: bool = True):
    N = batch["input_ids"].shape[0]
    vals: dict = {}
    out = []
    with torch.no_grad():
        for s in range(0, N, batch_size):
            b = rows(batch, torch.arange(s, min(N, s + batch_size)))
            with Taps(model, st, graph, capture=True, stop=not logits) as taps:
                res = model(**forward_kwargs(model, b, device))
                out.append(logits_of(res).detach())
            for k, v in taps.values.items():
                vals.setdefault(k, []).append(v)
    return (torch.cat(out) if logits else None), {k: torch.cat(v) for k, v in vals.items()}


def patch_edges(model, clean, edge_sets, metric="logit_diff", *, corrupt=None, source: str = "corrupt",
                graph: EdgeGraph | None = None, batch_size: int = 32, seed: int = 0, _sources: SourceValues | None = None) -> dict:
    """Metric values with each edge set patched (see the module docstring).

    ``edge_sets``: a list of K edge sets (each edge names, edge indices of ``graph``, or a bool
    ``[E]`` mask; ``[]`` is the unpatched model). Rows are (edge set, example) pairs, ``batch_size``
    per forward. Returns a dict with ``values`` ``[K, N]``, ``clean`` ``[N]`` (the unpatched
    metric), ``graph`` and ``cost``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    metric = resolve_metric(metric)
    st = circuit_structure(model)
    full = EdgeGraph(st.n_layers, st.n_heads, st.n_kv_heads, st.has_mlp, st.parallel)
    graph = full if graph is None else graph
    clean_b, corrupt_b = paired(clean, corrupt)
    N = clean_b["input_ids"].shape[0]
    device = next(model.parameters()).device
    masks = torch.stack([graph.edge_mask(e) for e in edge_sets]) if len(edge_sets) else torch.zeros(0, graph.n_edges, dtype=torch.bool)
    K = masks.shape[0]
    training = [(m, m.training) for m in model.modules()]
    cost = {"forwards": 0, "rows": 0}
    try:
        model.eval()
        src = _sources or SourceValues(model, st, graph, clean_b, corrupt_b, source, batch_size, device, seed)
        cost["forwards"] += 2 * ((N + batch_size - 1) // batch_size)
        clean_vals = metric_values(metric, src.clean_logits, clean_b, src.clean_logits)
        out = torch.empty(K, N)
        set_of = torch.arange(K).repeat_interleave(N)
        ex_of = torch.arange(N).repeat(K)
        with torch.no_grad():
            for s in range(0, K * N, batch_size):
                r = torch.arange(s, min(K * N, s + batch_size))
                ks, ex = set_of[r], ex_of[r]
                b = rows(clean_b, ex)
                patch = EdgePatch(graph.matrix(masks[ks]).to(device), src.rows(ex))
                with Taps(model, st, graph, patch=patch):
                    logits = logits_of(model(**forward_kwargs(model, b, device)))
                cost["forwards"] += 1
                cost["rows"] += len(r)
                out[ks, ex] = metric_values(metric, logits, b, src.clean_logits[ex.to(src.clean_logits.device)]).float().cpu()
    finally:
        for m, t in training:
            m.training = t
    return dict(values=out, clean=clean_vals.float().cpu(), graph=graph, cost=cost, source=src.source)
