"""Circuits from edge scores: the top-n edges, edges over a threshold, and keeping only edges
that connect (to the logits, and from the input).

Pruning follows Hanna et al.'s ``Graph.prune``: a node stays while it has a kept edge to a live
receiver (the logits always live) and, with ``connected="both"``, a kept edge from a node that
the input reaches; a head's receiver nodes (its q input; its key/value head's k and v inputs)
live while the head does. Repeated until nothing changes.
"""

from __future__ import annotations

import torch

from .graph import EdgeGraph

CONNECTED = ("logits", "both", None)


def select(scores: torch.Tensor, *, top_n: int | None = None, threshold: float | None = None, absolute: bool = True) -> torch.Tensor:
    """Bool ``[E]``: the ``top_n`` edges by score (``absolute``: by ``|score|``; ties broken by
    edge order), or those with score ``>= threshold``. NaN scores are never selected."""
    if (top_n is None) == (threshold is None):
        raise ValueError("give exactly one of top_n= and threshold=")
    s = scores.abs() if absolute else scores.clone()
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    if top_n is not None:
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= len(s):
            raise ValueError(f"top_n must be an integer in [0, {len(s)}], got {top_n!r}")
        keep = torch.zeros(len(s), dtype=torch.bool)
        order = torch.sort(-s.double(), stable=True).indices[:top_n]
        keep[order] = True
        return keep & (s > float("-inf"))
    return s >= float(threshold)


def connect(graph: EdgeGraph, keep: torch.Tensor, connected: str | None = "logits") -> torch.Tensor:
    """``keep`` (bool ``[E]``) without the edges that do not connect (see the module docstring)."""
    if connected not in CONNECTED:
        raise ValueError(f"connected must be one of {CONNECTED}, got {connected!r}")
    keep = keep.clone()
    if connected is None:
        return keep
    S, R = len(graph.senders), len(graph.receivers)
    edges = torch.tensor(graph.edges, dtype=torch.long).reshape(-1, 2)
    feeds = _feeds(graph)  # receiver -> senders whose inputs it is
    recv_of = [[] for _ in range(S)]
    for r, ss in enumerate(feeds):
        for s in ss:
            recv_of[s].append(r)
    while True:
        before = keep.clone()
        alive_s = torch.zeros(S, dtype=torch.bool)
        alive_r = torch.zeros(R, dtype=torch.bool)
        alive_r[R - 1] = True
        changed = True
        while changed:  # liveness towards the logits
            changed = False
            on = keep & alive_r[edges[:, 1]]
            new_s = torch.zeros(S, dtype=torch.bool)
            new_s[edges[on, 0]] = True
            for r, ss in enumerate(feeds):
                if not alive_r[r] and any(bool(new_s[s]) for s in ss):
                    alive_r[r] = True
                    changed = True
            if not torch.equal(new_s, alive_s):
                alive_s = new_s
                changed = True
        keep &= alive_r[edges[:, 1]]
        if connected == "both":
            reach = torch.zeros(S, dtype=torch.bool)
            reach[0] = True
            changed = True
            while changed:
                changed = False
                on = keep & reach[edges[:, 0]]
                hit_r = torch.zeros(R, dtype=torch.bool)
                hit_r[edges[on, 1]] = True
                for s in range(1, S):
                    if not reach[s] and any(bool(hit_r[r]) for r in recv_of[s]):
                        reach[s] = True
                        changed = True
            keep &= reach[edges[:, 0]]
        if torch.equal(keep, before):
            return keep


def _feeds(graph: EdgeGraph) -> list[list[int]]:
    """For each receiver, the senders whose input it is (a k/v receiver: every query head of its group)."""
    idx = {(s.kind, s.layer, s.head): i for i, s in enumerate(graph.senders)}
    group = graph.n_heads // graph.n_kv_heads
    out = []
    for r in graph.receivers:
        if r.kind == "logits":
            out.append([])
        elif r.kind == "mlp":
            out.append([idx[("mlp", r.layer, -1)]])
        elif r.kind == "q":
            out.append([idx[("head", r.layer, r.head)]])
        else:
            out.append([idx[("head", r.layer, h)] for h in range(r.head * group, (r.head + 1) * group)])
    return out
