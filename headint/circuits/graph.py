"""The edge graph of a transformer: senders, receivers, edges and their names.

Nodes (names as in Hanna et al.'s EAP-IG library, so edge lists can be compared):

- ``input``: the input embedding (token + position embeddings; the residual stream entering
  block 0). A sender only.
- ``a{l}.h{h}``: query head ``h`` of layer ``l``. As a *sender* it writes ``z_h @ W_O[h]`` (its
  output through its slice of the output projection; the projection's bias is a constant of
  the residual stream, not a node). As a *receiver* it reads the residual stream three times,
  separately: ``a{l}.h{h}<q>`` (its query input), and its key and value inputs.
- Key and value inputs belong to key/value heads. Without grouped-query attention they are
  ``a{l}.h{h}<k>`` and ``a{l}.h{h}<v>``; under grouped-query attention (``Hkv < H``) key/value
  head ``g`` (read by query heads ``g*H/Hkv .. (g+1)*H/Hkv - 1``) is ``a{l}.kv{g}<k>`` /
  ``a{l}.kv{g}<v>``.
- ``m{l}``: the MLP of layer ``l`` (sender through its output, receiver through its input).
- ``logits``: the final residual stream (before the final norm and the unembedding). A
  receiver only.

Every receiver reads the *pre-norm* residual stream (the norm in front of it is part of the
receiver). An edge ``u -> v`` exists for every sender ``u`` whose output is part of ``v``'s
input: ``input`` feeds everything; a head of layer ``l`` feeds every receiver of later layers,
the MLP of its own layer (not where attention and MLP run in parallel, GPT-J / NeoX) and the
logits; an MLP feeds later layers and the logits. Edge names are ``"{sender}->{receiver}"``,
e.g. ``"a0.h1->a1.h3<k>"``, ``"input->m0"``, ``"a1.h3->logits"``.

Senders are ordered ``input, a0.h0 .. a0.h{H-1}, m0, a1.h0, ...``; receivers ``a0.h0<q> ..
a0.h{H-1}<q>, a0.*<k>, a0.*<v>, m0, a1...``, ``logits`` last (reverse topological order is the
reverse of this). :class:`EdgeGraph` holds them and a boolean ``[S, R]`` matrix of the edges in
scope, which :meth:`EdgeGraph.restrict` narrows (layers, heads, q/k/v inputs, MLPs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

__all__ = ["Sender", "Receiver", "EdgeGraph", "graph_of", "QKV"]

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Sender:
    """``kind`` ``"input"``, ``"head"`` or ``"mlp"``; ``layer`` (-1 for the input); ``head``."""

    kind: str
    layer: int = -1
    head: int = -1

    @property
    def name(self) -> str:
        return "input" if self.kind == "input" else f"a{self.layer}.h{self.head}" if self.kind == "head" else f"m{self.layer}"


@dataclass(frozen=True)
class Receiver:
    """``kind`` ``"q"``, ``"k"``, ``"v"`` (``head``: a query head for q, a key/value head for k/v),
    ``"mlp"`` or ``"logits"``; ``grouped``: key/value heads are grouped (names use ``kv{g}``)."""

    kind: str
    layer: int
    head: int = -1
    grouped: bool = False

    @property
    def node(self) -> str:
        if self.kind == "logits":
            return "logits"
        if self.kind == "mlp":
            return f"m{self.layer}"
        if self.kind != "q" and self.grouped:
            return f"a{self.layer}.kv{self.head}"
        return f"a{self.layer}.h{self.head}"

    @property
    def name(self) -> str:
        return self.node if self.kind in ("mlp", "logits") else f"{self.node}<{self.kind}>"


def _read_stage(r: Receiver, parallel: Sequence[bool], n_layers: int) -> int:
    if r.kind == "logits":
        return 2 * n_layers
    if r.kind == "mlp":
        return 2 * r.layer + (0 if parallel[r.layer] else 1)
    return 2 * r.layer


def _write_stage(s: Sender) -> int:
    if s.kind == "input":
        return 0
    return 2 * s.layer + 1 if s.kind == "head" else 2 * s.layer + 2


class EdgeGraph:
    """Senders, receivers and the ``[S, R]`` boolean matrix ``mask`` of the edges in scope.

    ``edges`` lists the ``(sender index, receiver index)`` pairs of ``mask`` in sender-major
    order; ``names`` their names; ``index(name)`` the position of an edge in that list.
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int, has_mlp: Sequence[bool], parallel: Sequence[bool],
                 mask: torch.Tensor | None = None):
        self.n_layers, self.n_heads, self.n_kv_heads = int(n_layers), int(n_heads), int(n_kv_heads)
        self.has_mlp, self.parallel = list(has_mlp), list(parallel)
        grouped = self.n_kv_heads != self.n_heads
        senders = [Sender("input")]
        receivers = []
        for l in range(self.n_layers):
            senders += [Sender("head", l, h) for h in range(self.n_heads)]
            if self.has_mlp[l]:
                senders.append(Sender("mlp", l))
            receivers += [Receiver("q", l, h, grouped) for h in range(self.n_heads)]
            for w in ("k", "v"):
                receivers += [Receiver(w, l, g, grouped) for g in range(self.n_kv_heads)]
            if self.has_mlp[l]:
                receivers.append(Receiver("mlp", l))
        receivers.append(Receiver("logits", self.n_layers))
        self.senders, self.receivers = senders, receivers
        w = torch.tensor([_write_stage(s) for s in senders])
        r = torch.tensor([_read_stage(x, self.parallel, self.n_layers) for x in receivers])
        self.real = w[:, None] <= r[None, :]
        self.mask = self.real.clone() if mask is None else (mask.bool() & self.real)
        self._refresh()

    def _refresh(self) -> None:
        idx = self.mask.nonzero()
        self.edges = [(int(a), int(b)) for a, b in idx]
        self.names = [f"{self.senders[a].name}->{self.receivers[b].name}" for a, b in self.edges]
        self._index = {n: i for i, n in enumerate(self.names)}
        self._sender_index = {s.name: i for i, s in enumerate(self.senders)}
        self._receiver_index = {r.name: i for i, r in enumerate(self.receivers)}

    # ------------------------------------------------------------------ looking up
    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def index(self, name: str) -> int:
        """Position of edge ``name`` in :attr:`edges` / :attr:`names`."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(self._unknown(name)) from None

    def _unknown(self, name: str) -> str:
        if not isinstance(name, str) or "->" not in name:
            return f"{name!r} is not an edge name like 'a0.h1->a1.h3<k>'"
        s, r = name.split("->", 1)
        if s not in self._sender_index:
            return f"edge {name!r}: unknown sender {s!r} (senders: input, a<layer>.h<head>, m<layer>)"
        if r not in self._receiver_index:
            kv = " (key/value heads are a<layer>.kv<g> under grouped-query attention)" if self.n_kv_heads != self.n_heads else ""
            return f"edge {name!r}: unknown receiver {r!r}{kv}"
        if not bool(self.real[self._sender_index[s], self._receiver_index[r]]):
            return f"edge {name!r} does not exist: {s} does not write to the residual stream before {r} reads it"
        return f"edge {name!r} is outside this graph's scope (restricted)"

    def edge_mask(self, edges: Iterable) -> torch.Tensor:
        """A bool ``[E]`` over :attr:`edges` from edge names, indices, or a bool ``[E]`` tensor."""
        if isinstance(edges, torch.Tensor) and edges.dtype == torch.bool:
            if edges.shape != (self.n_edges,):
                raise ValueError(f"an edge mask must be bool [{self.n_edges}] (one per edge of the graph), got {list(edges.shape)}")
            return edges.clone()
        m = torch.zeros(self.n_edges, dtype=torch.bool)
        for e in edges:
            if isinstance(e, str):
                m[self.index(e)] = True
            elif isinstance(e, int) and not isinstance(e, bool) and 0 <= e < self.n_edges:
                m[e] = True
            else:
                raise ValueError(f"edges must be edge names or indices in [0, {self.n_edges}); got {e!r}")
        return m

    def matrix(self, edge_mask: torch.Tensor) -> torch.Tensor:
        """Bool ``[..., S, R]`` from a bool ``[..., E]`` over :attr:`edges`."""
        out = torch.zeros(*edge_mask.shape[:-1], len(self.senders), len(self.receivers), dtype=torch.bool)
        idx = self.mask.nonzero()
        out[..., idx[:, 0], idx[:, 1]] = edge_mask
        return out

    def receiver_node(self, r: int) -> str:
        return self.receivers[r].node

    # ------------------------------------------------------------------ restriction
    def restrict(self, *, layers: Iterable[int] | None = None, heads: Iterable[int] | None = None, qkv: str = "qkv",
                 mlp: bool = True, senders: Iterable[str] | None = None, receivers: Iterable[str] | None = None) -> "EdgeGraph":
        """A graph with fewer edges in scope (same nodes, same order).

        ``layers``: keep edges whose attention/MLP ends are in these layers (``input`` and
        ``logits`` always qualify); ``heads``: keep head ends with these head indices (key/value
        head indices for k/v receivers); ``qkv``: which head inputs receive (e.g. ``"k"``);
        ``mlp=False``: drop every edge touching an MLP; ``senders`` / ``receivers``: node or
        receiver names to keep (regular expressions matched in full, e.g. ``r"a1\\..*<k>"``).
        """
        if not qkv or set(qkv) - set(QKV):
            raise ValueError(f"qkv must be made of 'q', 'k', 'v'; got {qkv!r}")
        layers = None if layers is None else {self._check_int(x, self.n_layers, "layers") for x in layers}
        heads = None if heads is None else {self._check_int(x, self.n_heads, "heads") for x in heads}
        keep_s = torch.tensor([self._keep(s.kind, s.layer, s.head, layers, heads, mlp) for s in self.senders])
        keep_r = torch.tensor([(r.kind in QKV and r.kind in qkv or r.kind not in QKV) and
                               self._keep("head" if r.kind in QKV else r.kind, r.layer, r.head, layers, heads, mlp)
                               for r in self.receivers])
        if senders is not None:
            keep_s &= torch.tensor([_matches(s.name, senders) for s in self.senders])
        if receivers is not None:
            keep_r &= torch.tensor([_matches(r.name, receivers) or _matches(r.node, receivers) for r in self.receivers])
        new = EdgeGraph(self.n_layers, self.n_heads, self.n_kv_heads, self.has_mlp, self.parallel,
                        self.mask & keep_s[:, None] & keep_r[None, :])
        if new.n_edges == 0:
            raise ValueError("the restriction leaves no edge in the graph")
        return new

    @staticmethod
    def _check_int(x, n, what) -> int:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n:
            raise ValueError(f"{what}: {x!r} is out of range [0, {n})")
        return x

    @staticmethod
    def _keep(kind, layer, head, layers, heads, mlp) -> bool:
        if kind in ("input", "logits"):
            return True
        if kind == "mlp" and not mlp:
            return False
        if layers is not None and layer not in layers:
            return False
        if kind == "head" and heads is not None and head not in heads:
            return False
        return True

    def to_dict(self) -> dict:
        return dict(n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, has_mlp=self.has_mlp,
                    parallel=self.parallel)

    def __repr__(self) -> str:
        return (f"EdgeGraph({self.n_layers} layers, {self.n_heads} heads, {self.n_kv_heads} kv heads, "
                f"{len(self.senders)} senders, {len(self.receivers)} receivers, {self.n_edges} edges in scope)")


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(re.fullmatch(p, name) for p in patterns)


def graph_of(model) -> EdgeGraph:
    """The full edge graph of ``model`` (probed by :func:`headint.circuits.structure.circuit_structure`)."""
    from .structure import circuit_structure

    st = circuit_structure(model)
    return EdgeGraph(st.n_layers, st.n_heads, st.n_kv_heads, st.has_mlp, st.parallel)
