"""The result of an edge-level method: :class:`CircuitResult` (scores per edge, a circuit, files).

Files: ``<stem>.safetensors`` (``scores`` ``[E]``, optionally ``stderr`` ``[E]``,
``positions`` ``[E, T]``, ``in_circuit`` ``[E]``) and ``<stem>.json`` beside it (the graph, the
edge names, method, metric, settings, and ``tensor_sha256``, the hash of the tensor file). As
for :class:`~headint.results.ScanResult`: the tensor file is always the one beside the sidecar
(no path is read from the JSON), its hash is checked on load, non-finite floats are written as
``null`` and listed, and the edge names must be those of the recorded graph; both files must be
regular files (:mod:`headint.files`), the sidecar at most 256 MiB and the tensor file no larger
than the sidecar's edges (and ``positions_T``) allow; both are written together
(:func:`headint.files.write_files_atomically`).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
from pathlib import Path

import torch

from ..files import read_bytes, write_files_atomically
from ..results.io import _restore_non_finite, _standard, read_sidecar, result_files
from .extract import connect, select
from .graph import EdgeGraph

FORMAT = "headint.CircuitResult"
VERSION = 1
DIR_STEM = "circuit"


class CircuitResult:
    """Edge scores (``scores`` ``[E]`` over ``graph.names``, ``stderr`` ``[E]``, ``positions``
    ``[E, T]``) of one method, and optionally a circuit (``in_circuit`` bool ``[E]``).

    ``to_frame()`` is the tidy table (one row per edge); ``top(n)`` the n largest by ``|score|``;
    ``circuit(top_n=... | threshold=...)`` a copy with ``in_circuit`` set; ``save`` / ``load``;
    ``to_svg`` / ``plot`` draw the circuit as a static SVG, ``to_html`` as the interactive report
    (:meth:`to_circuit_graph` is what the report draws, also inside a scan's report).
    """

    def __init__(self, graph: EdgeGraph, scores: torch.Tensor, *, method: str, metric_name: str, stderr=None,
                 positions=None, in_circuit=None, settings: dict | None = None):
        E = graph.n_edges
        scores = torch.as_tensor(scores, dtype=torch.float32)
        if scores.shape != (E,):
            raise ValueError(f"scores must be [E] = [{E}] (one per edge of the graph), got {list(scores.shape)}")
        for name, x in (("stderr", stderr), ("in_circuit", in_circuit)):
            if x is not None and tuple(x.shape) != (E,):
                raise ValueError(f"{name} must be [{E}], got {list(x.shape)}")
        if positions is not None and (positions.dim() != 2 or positions.shape[0] != E):
            raise ValueError(f"positions must be [E, T] with E = {E}, got {list(positions.shape)}")
        self.graph, self.scores, self.method, self.metric_name = graph, scores, str(method), str(metric_name)
        self.stderr = None if stderr is None else torch.as_tensor(stderr, dtype=torch.float32)
        self.positions = None if positions is None else torch.as_tensor(positions, dtype=torch.float32)
        self.in_circuit = None if in_circuit is None else torch.as_tensor(in_circuit).bool()
        self.settings = dict(settings or {})

    # ------------------------------------------------------------------ tables
    @property
    def edges(self) -> list[str]:
        return list(self.graph.names)

    def score(self, edge: str) -> float:
        return float(self.scores[self.graph.index(edge)])

    def to_frame(self):
        """One row per edge: ``edge, sender, receiver, receiver_node, input (q/k/v or ''),
        sender_layer, receiver_layer, score, stderr, abs_score, rank`` (by ``|score|``, 1 = largest),
        ``in_circuit``."""
        import pandas as pd

        g = self.graph
        snd = [g.senders[s] for s, _ in g.edges]
        rcv = [g.receivers[r] for _, r in g.edges]
        abs_s = self.scores.abs()
        order = torch.sort(-torch.nan_to_num(abs_s, nan=-1.0).double(), stable=True).indices
        rank = torch.empty(len(order), dtype=torch.long)
        rank[order] = torch.arange(1, len(order) + 1)
        return pd.DataFrame({
            "edge": g.names,
            "sender": [s.name for s in snd],
            "receiver": [r.name for r in rcv],
            "receiver_node": [r.node for r in rcv],
            "input": [r.kind if r.kind in ("q", "k", "v") else "" for r in rcv],
            "sender_layer": [s.layer for s in snd],
            "receiver_layer": [r.layer for r in rcv],
            "score": self.scores.tolist(),
            "stderr": self.stderr.tolist() if self.stderr is not None else [float("nan")] * len(snd),
            "abs_score": abs_s.tolist(),
            "rank": rank.tolist(),
            "in_circuit": self.in_circuit.tolist() if self.in_circuit is not None else [False] * len(snd),
        })

    def top(self, n: int = 10):
        """The ``n`` edges with the largest ``|score|`` (a slice of :meth:`to_frame`)."""
        return self.to_frame().sort_values("rank").head(n).reset_index(drop=True)

    def to_csv(self, path) -> Path:
        path = Path(path)
        self.to_frame().to_csv(path, index=False)
        return path

    # ------------------------------------------------------------------ circuits
    def circuit(self, *, top_n: int | None = None, threshold: float | None = None, absolute: bool = True,
                connected: str | None = "logits") -> "CircuitResult":
        """A copy whose ``in_circuit`` holds the ``top_n`` edges (or those with score, ``|score|``
        when ``absolute``, at least ``threshold``), pruned to the edges that connect (see
        :func:`headint.circuits.extract.connect`: ``"logits"``, ``"both"`` or None)."""
        keep = connect(self.graph, select(self.scores, top_n=top_n, threshold=threshold, absolute=absolute), connected)
        settings = dict(self.settings, extraction=dict(top_n=top_n, threshold=threshold, absolute=absolute, connected=connected))
        return CircuitResult(self.graph, self.scores, method=self.method, metric_name=self.metric_name, stderr=self.stderr,
                             positions=self.positions, in_circuit=keep, settings=settings)

    @property
    def circuit_edges(self) -> list[str]:
        if self.in_circuit is None:
            raise ValueError("this result holds no circuit; call .circuit(top_n=...) or .circuit(threshold=...)")
        return [n for n, k in zip(self.graph.names, self.in_circuit.tolist()) if k]

    def __repr__(self) -> str:
        extra = "" if self.in_circuit is None else f", circuit of {int(self.in_circuit.sum())} edges"
        return f"CircuitResult({self.method}, metric {self.metric_name}, {self.graph.n_edges} edges{extra})"

    # ------------------------------------------------------------------ files
    def save(self, path) -> Path:
        """Write ``<stem>.safetensors`` and ``<stem>.json`` (``path``: a stem, either file, or a
        folder, then ``circuit.*``); returns the stem."""
        from safetensors.torch import save as to_bytes

        stem, tfile, jfile = result_files(path, True, dir_stem=DIR_STEM)
        tfile.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"scores": self.scores.contiguous()}
        if self.stderr is not None:
            tensors["stderr"] = self.stderr.contiguous()
        if self.positions is not None:
            tensors["positions"] = self.positions.contiguous()
        if self.in_circuit is not None:
            tensors["in_circuit"] = self.in_circuit.to(torch.uint8).contiguous()
        data = to_bytes(tensors)
        meta = {"format": FORMAT, "version": VERSION, "graph": self.graph.to_dict(), "scope": self.graph.mask.flatten().int().tolist(),
                "edges": self.graph.names, "method": self.method, "metric_name": self.metric_name, "settings": self.settings,
                "tensor_sha256": hashlib.sha256(data).hexdigest(),
                "positions_T": None if self.positions is None else int(self.positions.shape[1])}
        found: list = []
        meta = _standard(meta, [], found)
        meta["non_finite"] = found
        text = json.dumps(meta, indent=1, allow_nan=False)
        write_files_atomically([(tfile, data), (jfile, text.encode())])
        return stem

    @classmethod
    def load(cls, path) -> "CircuitResult":
        """Read a result written by :meth:`save`; ValueError (naming the file) for anything that does
        not check out (format, version, fields, the tensor file's hash, shapes, edge names)."""
        from safetensors import SafetensorError
        from safetensors.torch import load as from_bytes

        _, tfile, jfile = result_files(path, False, dir_stem=DIR_STEM)
        if not jfile.exists():
            raise FileNotFoundError(f"no CircuitResult at {os.fspath(path)!r}: {jfile} does not exist")
        meta = read_sidecar(jfile, "CircuitResult", FORMAT)
        if meta.get("version") != VERSION:
            raise ValueError(f"{jfile}: unknown CircuitResult version {meta.get('version')!r}; this headint reads {VERSION}")
        need = ("graph", "scope", "edges", "method", "metric_name", "settings", "tensor_sha256")
        missing = [k for k in need if k not in meta]
        if missing:
            raise ValueError(f"{jfile}: missing fields {missing}")
        if not tfile.exists():
            raise FileNotFoundError(f"{jfile}: its tensor file {tfile} does not exist (the two files share one stem)")
        data = read_bytes(tfile, "CircuitResult tensor file", _tensor_file_cap(meta, jfile))
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta["tensor_sha256"]:
            raise ValueError(f"{tfile} does not hold the tensors {jfile} was saved with (sha256 {digest[:12]}..., recorded "
                             f"{str(meta['tensor_sha256'])[:12]}...): it was overwritten or belongs to another result")
        _restore_non_finite(meta, meta.get("non_finite", []), jfile)
        try:
            g = meta["graph"]
            graph = EdgeGraph(g["n_layers"], g["n_heads"], g["n_kv_heads"], g["has_mlp"], g["parallel"])
            scope = torch.tensor(meta["scope"], dtype=torch.bool)
            if scope.numel() != graph.mask.numel():
                raise ValueError("scope size")
            graph = EdgeGraph(g["n_layers"], g["n_heads"], g["n_kv_heads"], g["has_mlp"], g["parallel"], scope.reshape(graph.mask.shape))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{jfile}: malformed graph description ({e})") from None
        if graph.names != meta["edges"]:
            raise ValueError(f"{jfile}: its edge names are not those of the graph it records")
        try:
            t = from_bytes(data)
        except SafetensorError as e:
            raise ValueError(f"{tfile} is not a safetensors file ({e})") from None
        if "scores" not in t:
            raise ValueError(f"{tfile} has no 'scores' tensor")
        ic = t.get("in_circuit")
        return cls(graph, t["scores"], method=meta["method"], metric_name=meta["metric_name"], stderr=t.get("stderr"),
                   positions=t.get("positions"), in_circuit=None if ic is None else ic.bool(), settings=meta["settings"])

    # ------------------------------------------------------------------ drawing
    def to_svg(self, *, edges: str = "circuit", max_edges: int = 200) -> str:
        """An SVG drawing: nodes by layer (input at the bottom, logits at the top; heads side by
        side, MLPs at the right), ``edges="circuit"`` (the circuit, else the top 20 by ``|score|``)
        or ``"top"``, each a line from sender to receiver with its input letter, width by
        ``|score|``, blue positive, red negative."""
        g = self.graph
        chosen = self._chosen(edges, 20)[:max_edges]
        col_w, row_h, pad = 70, 90, 40
        n_cols = g.n_heads + 1
        width = pad * 2 + n_cols * col_w
        height = pad * 2 + (g.n_layers + 1) * row_h

        def node_xy(kind: str, layer: int, head: int):
            if kind == "input":
                return width / 2, height - pad
            if kind == "logits":
                return width / 2, pad
            y = height - pad - (layer + 0.5) * row_h
            x = pad + (g.n_heads if kind == "mlp" else head) * col_w + col_w / 2
            return x, y

        def recv_xy(r):
            if r.kind == "logits":
                return node_xy("logits", 0, 0)
            if r.kind == "mlp":
                x, y = node_xy("mlp", r.layer, 0)
                return x, y + 12
            heads = [r.head] if r.kind == "q" or g.n_kv_heads == g.n_heads else \
                list(range(r.head * (g.n_heads // g.n_kv_heads), (r.head + 1) * (g.n_heads // g.n_kv_heads)))
            x, y = node_xy("head", r.layer, heads[0])
            return x + {"q": -14, "k": 0, "v": 14}[r.kind], y + 12

        vmax = float(self.scores[chosen].abs().max()) if chosen else 1.0
        vmax = vmax if vmax > 0 and math.isfinite(vmax) else 1.0
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
                 f'<title>{html.escape(self.method)} ({html.escape(self.metric_name)}): {len(chosen)} edges</title>']
        for i in chosen:
            s, r = g.edges[i]
            snd, rcv = g.senders[s], g.receivers[r]
            x1, y1 = node_xy(snd.kind, snd.layer, snd.head)
            x2, y2 = recv_xy(rcv)
            v = float(self.scores[i])
            w = 0.8 + 5 * min(1.0, abs(v) / vmax) if math.isfinite(v) else 0.8
            color = "#2b6cb0" if v >= 0 else "#c53030"
            parts.append(f'<line x1="{x1:.1f}" y1="{y1 - 10:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" '
                         f'stroke-width="{w:.2f}" stroke-opacity="0.7"><title>{html.escape(g.names[i])}: {v:.4g}</title></line>')
        on = {g.edges[i][0] for i in chosen}  # senders of drawn edges, and the nodes their receivers belong to
        on |= {s for i in chosen for s, snd in enumerate(g.senders) if snd.name == g.receivers[g.edges[i][1]].node}
        for s, snd in enumerate(g.senders):
            x, y = node_xy(snd.kind, snd.layer, snd.head)
            fill = "#fefcbf" if s in on else "#edf2f7"
            parts.append(f'<rect x="{x - 24:.1f}" y="{y - 10:.1f}" width="48" height="20" rx="4" fill="{fill}" stroke="#4a5568"/>'
                         f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{html.escape(snd.name)}</text>')
        x, y = node_xy("logits", 0, 0)
        parts.append(f'<rect x="{x - 24:.1f}" y="{y - 10:.1f}" width="48" height="20" rx="4" fill="#fefcbf" stroke="#4a5568"/>'
                     f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">logits</text>')
        parts.append("</svg>")
        return "\n".join(parts)

    def _chosen(self, edges: str, top: int) -> list[int]:
        """Edge indices drawn: the circuit (``edges="circuit"``, when there is one) or the ``top``
        largest by ``|score|``, in rank order."""
        if edges not in ("circuit", "top"):
            raise ValueError(f"edges must be 'circuit' or 'top', got {edges!r}")
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be a positive integer, got {top!r}")
        order = torch.sort(-torch.nan_to_num(self.scores.abs(), nan=-1.0).double(), stable=True).indices
        if edges == "circuit" and self.in_circuit is not None:
            return [i for i in order.tolist() if bool(self.in_circuit[i])]
        return order[:top].tolist()

    def to_circuit_graph(self, *, edges: str = "circuit", top: int = 20, max_edges: int = 300, title: str | None = None):
        """The edges as the interactive report draws them (a
        :class:`~headint.results.circuit_graph.CircuitGraph`): ``edges="circuit"`` (the circuit, or
        the ``top`` edges by ``|score|`` when this result holds none) or ``"top"``, at most
        ``max_edges`` (the largest ``|score|`` first; the note says how many were left out).

        Nodes are named as the senders (``input``, ``a{l}.h{h}``, ``m{l}``) and ``logits``; an
        edge into a head's q, k or v input goes to the head with that ``kind``; under grouped-query
        attention an edge into a key/value head's input goes to a node ``a{l}.kv{g}`` (drawn in
        layer ``l``'s row, labelled with the query heads it serves). Weights are the scores."""
        from ..results.circuit_graph import circuit_graph

        if isinstance(max_edges, bool) or not isinstance(max_edges, int) or max_edges < 1:
            raise ValueError(f"max_edges must be a positive integer, got {max_edges!r}")
        g = self.graph
        chosen = self._chosen(edges, top)
        left_out = max(0, len(chosen) - max_edges)
        chosen = chosen[:max_edges]
        group = g.n_heads // g.n_kv_heads
        nodes: dict[str, dict] = {}

        def node(kind: str, layer: int, name: str, head: int = -1) -> str:
            if name not in nodes:
                if kind == "input":
                    nodes[name] = {"name": name, "kind": "input"}
                elif kind == "logits":
                    nodes[name] = {"name": name, "kind": "output"}
                elif kind == "kv":
                    nodes[name] = {"name": name, "kind": "other", "layer": layer,
                                   "label": f"{name} (h{head * group}-{(head + 1) * group - 1})"}
                else:
                    nodes[name] = {"name": name, "kind": "mlp" if kind == "mlp" else "head", "layer": layer}
            return name

        out = []
        for i in chosen:
            s, r = g.edges[i]
            snd, rcv = g.senders[s], g.receivers[r]
            src = node(snd.kind, snd.layer, snd.name)
            kv = rcv.kind in ("k", "v") and rcv.grouped
            dst = node("kv" if kv else rcv.kind if rcv.kind in ("mlp", "logits") else "head", rcv.layer, rcv.node, rcv.head)
            out.append((src, dst, float(self.scores[i]), rcv.kind if rcv.kind in ("q", "k", "v") else None))
        node("logits", g.n_layers, "logits")
        what = (f"the circuit: {int(self.in_circuit.sum())} of {g.n_edges} edges" if edges == "circuit" and self.in_circuit is not None
                else f"the {len(chosen) + left_out} edges with the largest |score| of {g.n_edges}")
        note = f"{self.method} ({self.metric_name}): {what}"
        if left_out:
            note += f"; {left_out} edges with the smallest |score| are not drawn (max_edges={max_edges})"
        return circuit_graph(list(nodes.values()), out, title=title or f"Circuit ({self.method})",
                             weight_label=f"{self.method} score", note=note + ".")

    def plot(self, path, **kwargs) -> Path:
        """Write the drawing of :meth:`to_svg` to ``path`` (``.svg``)."""
        path = Path(path)
        if path.suffix.lower() != ".svg":
            raise ValueError(f"plot writes SVG; give a path ending in .svg, got {path.name!r}")
        path.write_text(self.to_svg(**kwargs))
        return path

    def to_html(self, path=None, *, edges: str = "circuit", top: int = 20, max_edges: int = 300, title: str | None = None) -> str:
        """The interactive, self-contained report of this result
        (:func:`headint.results.report.circuit_report_html`): the settings, the circuit graph of
        :meth:`to_circuit_graph` (hover an edge for its score, a node for its edges) and the edges
        by ``|score|``; written to ``path`` if given. The same graph goes into a scan's report
        with ``ScanResult.to_html(path, circuit=this_result)``."""
        from ..results.report import circuit_report_html

        graph = self.to_circuit_graph(edges=edges, top=top, max_edges=max_edges, title=title)
        pairs = [("method", self.method), ("metric", self.metric_name), ("edges scored", str(self.graph.n_edges)),
                 ("graph", repr(self.graph))]
        if self.in_circuit is not None:
            pairs.append(("edges in the circuit", str(int(self.in_circuit.sum()))))
        pairs += [(k, json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else str(v))
                  for k, v in self.settings.items() if k not in ("cost", "method") and v is not None]
        page = circuit_report_html(graph, title=title or f"headint circuit: {self.method} ({self.metric_name})", settings=pairs)
        if path is not None:
            write_files_atomically([(path, page.encode("utf-8"))])
        return page


def _tensor_file_cap(meta: dict, jfile: Path) -> int | None:
    """The most bytes the tensor file of the result ``meta`` describes can hold (``scores``,
    ``stderr`` float32 and ``in_circuit`` uint8 per edge, ``positions`` float32 ``[E, T]`` with
    ``T`` the sidecar's ``positions_T``, a header); None when the sidecar does not record
    ``positions_T`` (written before it did)."""
    edges, T = meta.get("edges"), meta.get("positions_T", -1)
    if not isinstance(edges, list) or T == -1:
        return None
    if T is not None and (isinstance(T, bool) or not isinstance(T, int) or T < 0):
        raise ValueError(f"{jfile}: field 'positions_T' must be null or an int >= 0, got {T!r}")
    return 9 * len(edges) + 4 * len(edges) * (T or 0) + 2**20
