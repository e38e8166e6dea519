"""A circuit as the report draws it: nodes (heads, MLPs, the input, the output) and weighted
edges between them. This is the hook through which edge-level circuit methods (edge
attribution patching, EAP-IG, ACDC, path patching) put their result into the report:

>>> from headint.results.circuit_graph import circuit_graph
>>> graph = circuit_graph(["input", "L0H0", "L1H3", "logits"],
...                       [("input", "L0H0", 0.8), ("L0H0", "L1H3", -1.2, "k"), ("L1H3", "logits", 2.0)],
...                       title="induction circuit (EAP-IG, top 3 edges)")
>>> # result.to_html("report.html", circuit=graph)   # a "Circuit" section with the graph

Nodes are drawn in rows by layer (the input at the bottom, the output at the top), edges as
lines whose width grows with ``|weight|`` (blue positive, red negative); hovering a node or
an edge shows its name, weight and kind, and clicking a head node selects that head in the
rest of the report (heatmaps, table, attention patterns). Below the graph the edges are
listed by ``|weight|``.

Node names understood without a layer: ``"LlHh"`` and ``"a{l}.h{h}"`` (attention head ``h``
of layer ``l``), ``"MLP{l}"``, ``"M{l}"`` and ``"m{l}"`` (the MLP of layer ``l``, drawn above
that layer's heads), ``"input"``, ``"embed"``, ``"embeddings"``, ``"tokens"`` (the bottom row)
and ``"logits"``, ``"output"``, ``"unembed"``, ``"resid_post"`` (the top row). Any other name
needs its layer given: pass the node as ``{"name": ..., "layer": int, "kind": ..., "score":
float, "label": ...}`` (``kind`` one of :data:`NODE_KINDS`; ``score`` and ``label`` optional).
Edges are ``(source, target, weight)`` or ``(source, target, weight, kind)`` tuples, or dicts
with those keys; ``kind`` says which input of the target the edge feeds (e.g. ``"q"``, ``"k"``,
``"v"``), or is None.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

__all__ = ["CircuitNode", "CircuitEdge", "CircuitGraph", "circuit_graph", "NODE_KINDS"]

NODE_KINDS = ("input", "head", "mlp", "output", "other")

_HEAD = re.compile(r"^(?:L(\d+)H(\d+)|a(\d+)\.h(\d+))$")
_MLP = re.compile(r"^(?:MLP|M|m)(\d+)$")
_INPUT = ("input", "embed", "embeddings", "tokens")
_OUTPUT = ("logits", "output", "unembed", "resid_post")


@dataclass(frozen=True)
class CircuitNode:
    """One node. layer: its row (the input is drawn below layer 0, the output above the last
    layer; None only for input and output nodes). score: an optional node weight."""

    name: str
    kind: str
    layer: int | None = None
    score: float | None = None
    label: str | None = None


@dataclass(frozen=True)
class CircuitEdge:
    """One edge ``source -> target`` with its ``weight`` (e.g. an attribution score; NaN
    allowed, drawn grey) and the ``kind`` of input of the target it feeds (or None)."""

    source: str
    target: str
    weight: float
    kind: str | None = None


@dataclass(frozen=True)
class CircuitGraph:
    """Nodes and edges of a circuit, with a ``title`` and the ``weight_label`` (what an edge's
    weight measures, e.g. ``"EAP-IG score"``) and an optional ``note`` shown under the graph."""

    nodes: tuple[CircuitNode, ...]
    edges: tuple[CircuitEdge, ...]
    title: str = "Circuit"
    weight_label: str = "edge weight"
    note: str | None = None

    def to_json(self) -> dict:
        """The report's ``circuit`` data: ``{"title", "weight_label", "note", "nodes": [{"name",
        "kind", "layer", "score", "label"}], "edges": [{"source", "target", "weight", "kind"}]}``
        (NaN weights as None)."""

        def fin(x):
            return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")

        return {
            "title": self.title, "weight_label": self.weight_label, "note": self.note,
            "nodes": [{"name": n.name, "kind": n.kind, "layer": n.layer, "score": fin(n.score), "label": n.label or n.name}
                      for n in self.nodes],
            "edges": [{"source": e.source, "target": e.target, "weight": fin(e.weight), "kind": e.kind} for e in self.edges],
        }


def _node(item: Any, i: int) -> CircuitNode:
    if isinstance(item, CircuitNode):
        return item
    if isinstance(item, str):
        spec: dict = {"name": item}
    elif isinstance(item, Mapping):
        spec = dict(item)
        unknown = set(spec) - {"name", "layer", "kind", "score", "label"}
        if unknown or "name" not in spec:
            raise ValueError(f"nodes[{i}] must have a 'name' and only the keys name, layer, kind, score, label; got {sorted(spec)}")
    else:
        raise TypeError(f"nodes[{i}] must be a name (str) or a dict with 'name', got {type(item).__name__}")
    name = spec["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"nodes[{i}] has name {name!r}; expected a non-empty str")
    layer, kind = spec.get("layer"), spec.get("kind")
    m_head, m_mlp = _HEAD.match(name), _MLP.match(name)
    if m_head:
        guess_layer, guess_kind = int(m_head.group(1) or m_head.group(3)), "head"
    elif m_mlp:
        guess_layer, guess_kind = int(m_mlp.group(1)), "mlp"
    elif name in _INPUT:
        guess_layer, guess_kind = None, "input"
    elif name in _OUTPUT:
        guess_layer, guess_kind = None, "output"
    else:
        guess_layer, guess_kind = None, "other"
    kind = kind or guess_kind
    layer = guess_layer if layer is None else layer
    if kind not in NODE_KINDS:
        raise ValueError(f"nodes[{i}] ({name!r}) has kind {kind!r}; expected one of {NODE_KINDS}")
    if layer is None and kind not in ("input", "output"):
        raise ValueError(f"nodes[{i}] ({name!r}): its layer is not known from its name; give it as "
                         f"{{'name': {name!r}, 'layer': <int>}}")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise ValueError(f"nodes[{i}] ({name!r}) has layer {layer!r}; expected an int >= 0")
    score = spec.get("score")
    if score is not None:
        score = float(score)
    label = spec.get("label")
    return CircuitNode(name=name, kind=kind, layer=layer, score=score, label=None if label is None else str(label))


def _edge(item: Any, i: int, names: set[str]) -> CircuitEdge:
    if isinstance(item, CircuitEdge):
        e = item
    elif isinstance(item, Mapping):
        unknown = set(item) - {"source", "target", "weight", "kind"}
        if unknown or not {"source", "target", "weight"} <= set(item):
            raise ValueError(f"edges[{i}] must have the keys source, target, weight (and optionally kind); got {sorted(item)}")
        e = CircuitEdge(item["source"], item["target"], float(item["weight"]), item.get("kind"))
    elif isinstance(item, (tuple, list)) and len(item) in (3, 4):
        e = CircuitEdge(item[0], item[1], float(item[2]), item[3] if len(item) == 4 else None)
    else:
        raise TypeError(f"edges[{i}] must be (source, target, weight[, kind]) or a dict, got {item!r}")
    for end in (e.source, e.target):
        if end not in names:
            raise ValueError(f"edges[{i}] ({e.source!r} -> {e.target!r}) names node {end!r}, which is not among the nodes")
    if e.kind is not None and not isinstance(e.kind, str):
        raise ValueError(f"edges[{i}] has kind {e.kind!r}; expected a str or None")
    return e


def circuit_graph(nodes: Iterable, edges: Iterable, *, title: str = "Circuit", weight_label: str = "edge weight",
                  note: str | None = None) -> CircuitGraph:
    """A :class:`CircuitGraph` from node names or dicts and ``(source, target, weight[, kind])``
    edges (see the module docstring). Raises ValueError naming the node or edge that is
    malformed, duplicated or unknown."""
    node_list = [_node(item, i) for i, item in enumerate(nodes)]
    names: set[str] = set()
    for n in node_list:
        if n.name in names:
            raise ValueError(f"node {n.name!r} is given twice")
        names.add(n.name)
    edge_list = [_edge(item, i, names) for i, item in enumerate(edges)]
    return CircuitGraph(tuple(node_list), tuple(edge_list), title=str(title), weight_label=str(weight_label),
                        note=None if note is None else str(note))
