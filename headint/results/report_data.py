"""The data behind the interactive report: JSON-able views of scans, the head table and the
attention patterns, which ``viewer/viewer.js`` draws.

Everything here is plain data (dicts, lists, strings, numbers, ``None`` for NaN); no HTML.
The report (:mod:`headint.results.report`) serialises :func:`payload` into one
``<script type="application/json">`` block. Numbers are rounded to 6 significant digits
(:func:`num`); attention weights are stored as integers in ten-thousandths (0..10000).

Schema (``payload``):

* ``title``, ``describe`` (method, direction, N: :func:`headint.results.plots.describe`),
  ``metric``;
* ``scans``: ``[scan view]``, the main scan first, then the related scans. A scan view
  (:func:`scan_view`) has ``key``, ``caption``, ``kind`` (``"grid"`` for ``[L, H]``,
  ``"positions"`` for ``[L, H, P]``, ``"sets"`` for head sets), ``layers``, ``heads``,
  ``tokens`` (``P`` strings or None), for head sets ``names`` (one per set) and ``heads_of``
  (per set, its ``"LlHh"`` heads; grid cells are named by the viewer from their index), ``quantity`` (``"effect"`` or
  ``"value"``: what colours the cells), ``label``, ``cells`` (flat row-major arrays
  ``value, stderr, n`` and, with a clean baseline, ``effect, effect_stderr``) and ``pairs``
  (for a head-set scan given its single-head scan: :func:`headint.results.pairs.pair_frame`
  as arrays, else None);
* ``table``: :func:`head_table`;
* ``patterns``: :func:`pattern_view` or None;
* ``circuit``: :meth:`headint.results.circuit_graph.CircuitGraph.to_json` (of :func:`circuit_of`) or None.
  A circuit's own report (:func:`headint.results.report.circuit_report_html`) has no scan:
  ``scans`` is empty and ``table`` None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from . import plots
from .grid import head_set_name

__all__ = ["RelatedScan", "PATTERN_VALUES", "num", "scan_view", "head_table", "pattern_view", "payload", "circuit_of"]

PATTERN_VALUES = 250_000
"""At most this many attention weights go into one report (at most 1.75 MB), fewer where the rest
of the report leaves less of its size budget; the heads beyond it (least important last) are
named on the page as left out."""


@dataclass(frozen=True)
class RelatedScan:
    """A further scan shown in the report below the main one, as its own interactive view.

    caption: the section's heading. result: a ScanResult. singles: for a head-set scan, the
    single-head scan of the same examples; the view then is the pair chart (joint effect
    beside the summed single effects, :func:`headint.results.pairs.pair_frame`). column: for
    a ``(layer, head)`` scan of the main scan's grid, the heading of a head-table column
    holding this scan's effect (None: no column).
    """

    caption: str
    result: Any
    singles: Any = None
    column: str | None = None


def num(x) -> float | None:
    """``x`` as a JSON number rounded to 6 significant digits; None for NaN or infinity."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


def _nums(values) -> list:
    return [num(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def head_name(layer: int, head: int) -> str:
    return f"L{int(layer)}H{int(head)}"


def _quantity(result) -> str:
    return "effect" if result.has_baseline else "value"


def _cells(result) -> dict[str, list]:
    """Flat row-major cell arrays from the result's public table (:meth:`to_frame`) and its
    ``effect`` / ``effect_stderr`` (whatever definition the result uses)."""
    frame = result.to_frame()
    cells = {"value": _nums(frame["value"]), "stderr": _nums(frame["stderr"]), "n": [int(v) for v in frame["n"]]}
    if result.has_baseline:
        cells["effect"] = _nums(result.effect.double().reshape(-1).numpy())
        cells["effect_stderr"] = _nums(result.effect_stderr.double().reshape(-1).numpy())
    return cells


def scan_view(result, *, key: str, caption: str, tokens: Sequence[str] | None = None, singles=None) -> dict:
    """The JSON view of one scan (see the module docstring). tokens: ``P`` strings for a
    per-position scan; singles: for a head-set scan, its single-head scan (pair chart)."""
    axes = tuple(result.axes)
    view: dict[str, Any] = {"key": key, "caption": str(caption), "tokens": None, "pairs": None,
                            "quantity": _quantity(result), "describe": plots.describe(result),
                            "metric": result.metric_name, "normalized": bool(result.normalized)}
    view["label"] = f"{result.metric_name} ({view['quantity']}{', normalized' if result.normalized else ''})"
    if axes == ("head_set",):
        view.update(kind="sets", layers=None, heads=None)
        view["names"] = [head_set_name(s) for s in result.labels]
        view["heads_of"] = [[head_name(l, h) for l, h in s] for s in result.labels]
        if singles is not None:
            from .pairs import pair_frame

            frame = pair_frame(result, singles)
            view["pairs"] = {c: (_nums(frame[c]) if c != "n" else [int(v) for v in frame[c]])
                             for c in frame.columns if c != "head_set"}
    else:
        L, H = result.grid_shape[:2]
        view.update(layers=int(L), heads=int(H))
        if axes == ("layer", "head"):
            view["kind"] = "grid"
        else:
            P = result.grid_shape[2]
            view["kind"] = "positions"
            view["positions"] = int(P)
            if tokens is not None:
                tokens = [str(t) for t in tokens]
                if len(tokens) != P:
                    raise ValueError(f"tokens has {len(tokens)} entries; expected {P}, one per position of the scan")
                view["tokens"] = tokens
    view["cells"] = _cells(result)
    return view


def _column_values(name: str, values, L: int, H: int) -> list:
    """A head column given as an ``[L, H]`` array or a ``{(layer, head): value}`` mapping."""
    if isinstance(values, Mapping):
        out: list = [None] * (L * H)
        for k, v in values.items():
            if not (isinstance(k, tuple) and len(k) == 2 and 0 <= int(k[0]) < L and 0 <= int(k[1]) < H):
                raise ValueError(f"head_columns[{name!r}] has key {k!r}; expected (layer, head) within [{L} layers, {H} heads]")
            out[int(k[0]) * H + int(k[1])] = v
    else:
        arr = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=object)
        if arr.shape != (L, H):
            raise ValueError(f"head_columns[{name!r}] has shape {list(arr.shape)}; expected [{L}, {H}] (layer, head)")
        out = list(arr.reshape(-1))
    kinds = {isinstance(v, str) for v in out if v is not None}
    if kinds == {True}:
        return ["text", [None if v is None else str(v) for v in out]]
    if True in kinds:
        raise ValueError(f"head_columns[{name!r}] mixes strings and numbers")
    try:
        return ["num", [None if v is None else num(v) for v in out]]
    except (TypeError, ValueError):
        raise ValueError(f"head_columns[{name!r}] must hold numbers or strings") from None


def head_table(result, *, related: Sequence[RelatedScan] = (), head_columns: Mapping | None = None, top: int = 10,
               tokens: Sequence[str] | None = None) -> dict:
    """The sortable head table: one row per grid cell of ``result`` (per head; per head and
    position; per head set), ranked by ``|effect|`` as :meth:`ScanResult.top` ranks them.

    Returns ``{"columns": [{"key", "label", "kind", "title"}], "rows": [[...]], "heads":
    [row's head name or None], "top": k}``; ``kind`` is ``"rank"``, ``"name"``, ``"int"``,
    ``"num"`` or ``"text"``. ``related`` scans with a ``column`` and the main scan's
    ``(layer, head)`` grid add their effect; ``head_columns`` (``{heading: [L, H] array or
    {(layer, head): value}}``, numbers or strings, e.g. pattern scores and roles) add one
    column each. ``top``: the rows shown before "show all".
    """
    axes = tuple(result.axes)
    frame = result.top(max(1, len(result.to_frame())))
    has_effect = "effect" in frame.columns
    cols: list[dict] = [{"key": "rank", "label": "rank", "kind": "rank", "title": "importance rank: largest |effect| first"}]
    rows: list[list] = [[i + 1] for i in range(len(frame))]
    heads: list = [None] * len(frame)

    def add(key, label, kind, title, values):
        cols.append({"key": key, "label": label, "kind": kind, "title": title})
        for row, v in zip(rows, values):
            row.append(v)

    if axes == ("head_set",):
        add("head_set", "head set", "name", "the heads intervened on together", [str(v) for v in frame["head_set"]])
    else:
        layers, hs = frame["layer"].to_numpy(), frame["head"].to_numpy()
        heads = [head_name(l, h) for l, h in zip(layers, hs)]
        add("head", "head", "name", "layer and head (LlHh)", heads)
        add("layer", "layer", "int", "layer index", [int(v) for v in layers])
        add("head_index", "head #", "int", "head index within its layer", [int(v) for v in hs])
        if axes == ("layer", "head", "position"):
            pos = [int(v) for v in frame["position"]]
            add("position", "pos", "int", "token position", pos)
            if tokens is not None:
                add("token", "token", "text", "the token at this position", [str(tokens[p]) for p in pos])
    if has_effect:
        eff_se = frame["effect_stderr"] if "effect_stderr" in frame.columns else frame["stderr"]
        what = result.effect_definition if getattr(result, "has_baseline", False) else "mean change of the metric caused by the intervention"
        add("effect", "effect", "num", what, _nums(frame["effect"]))
        add("effect_stderr", "\u00b1 stderr", "num", "standard error of the effect", _nums(eff_se))
    add("value", "value", "num", "mean metric with the intervention", _nums(frame["value"]))
    if not has_effect:
        add("stderr", "\u00b1 stderr", "num", "standard error of the value", _nums(frame["stderr"]))
    add("n", "n", "int", "finite examples behind the cell", [int(v) for v in frame["n"]])

    if axes != ("head_set",):
        L, H = result.grid_shape[:2]
        flat = [int(l) * H + int(h) for l, h in zip(frame["layer"], frame["head"])]
        for i, rel in enumerate(related):
            if rel.column is None:
                continue
            r = rel.result
            if tuple(r.axes) != ("layer", "head") or tuple(r.grid_shape) != (L, H):
                raise ValueError(f"related scan {rel.caption!r} has a column but axes {tuple(r.axes)} and grid "
                                 f"{list(r.grid_shape)}; a head-table column needs a (layer, head) scan of [{L}, {H}]")
            q = _quantity(r)
            vals = _nums((r.effect if q == "effect" else r.values).double().reshape(-1).numpy())
            add(f"related_{i}", rel.column, "num", f"{rel.caption}: {q}", [vals[j] for j in flat])
        for j, (name, values) in enumerate((head_columns or {}).items()):
            kind, vals = _column_values(str(name), values, L, H)
            add(f"extra_{j}", str(name), kind, str(name), [vals[k] for k in flat])
    elif head_columns:
        raise ValueError("head_columns label heads, but this result's rows are head sets; pass them with a (layer, head) scan")
    return {"columns": cols, "rows": rows, "heads": heads, "top": max(1, min(int(top), len(rows)))}


def _as_matrix(value, where: str) -> np.ndarray:
    arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{where} must be [Tq, Tk] (one example, one head), got shape {list(arr.shape)}")
    return arr


def _check_key(key, where: str) -> tuple[int, int]:
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(i, (int, np.integer)) for i in key)):
        raise ValueError(f"{where} keys must be (layer, head) int pairs, got {key!r}")
    return int(key[0]), int(key[1])


def pattern_view(patterns, pattern_tokens=None, *, order: Sequence[str] = (), budget: int = PATTERN_VALUES) -> dict:
    """Attention patterns of several examples, for the pattern panel.

    patterns: ``{(layer, head): [Tq, Tk]}`` of one example, or a sequence of such mappings
    (one per example). pattern_tokens: ``Tk`` strings (one example) or one such list per
    example; None labels keys by position. order: head names, most important first; heads are
    kept in this order (the others after, by layer and head) while their weights fit ``budget``.

    Returns ``{"heads": [names kept], "left_out": [names dropped], "examples": [{"tokens",
    "att": {name: [[weight in ten-thousandths, 0..10000]] (Tq rows of Tk)}}]}``.
    """
    if isinstance(patterns, Mapping):
        examples = [patterns]
        token_lists = [pattern_tokens]
    elif isinstance(patterns, Sequence) and not isinstance(patterns, (str, bytes)):
        examples = list(patterns)
        if pattern_tokens is None:
            token_lists = [None] * len(examples)
        elif isinstance(pattern_tokens, Sequence) and len(pattern_tokens) == len(examples) and all(
                t is None or (isinstance(t, Sequence) and not isinstance(t, str)) for t in pattern_tokens):
            token_lists = list(pattern_tokens)
        else:
            raise ValueError(f"with patterns of {len(examples)} examples, pattern_tokens must be one token list per example")
    else:
        raise TypeError(f"patterns must be a mapping {{(layer, head): [Tq, Tk] attention probabilities}} or a list of them "
                        f"(one per example), got {type(patterns).__name__}")
    if not examples:
        raise ValueError("patterns is an empty list; give at least one example")
    checked = []
    for e, (ex, toks) in enumerate(zip(examples, token_lists)):
        where = "patterns" if len(examples) == 1 else f"patterns[{e}]"
        if not isinstance(ex, Mapping):
            raise TypeError(f"{where} must be a mapping {{(layer, head): [Tq, Tk]}}, got {type(ex).__name__}")
        mats = {}
        for key, value in ex.items():
            l, h = _check_key(key, where)
            arr = _as_matrix(value, f"{where}[{(l, h)}]")
            if toks is not None and len(toks) != arr.shape[1]:
                name = "pattern_tokens" if len(examples) == 1 else f"pattern_tokens[{e}]"
                raise ValueError(f"{name} has {len(toks)} entries but {where}[{(l, h)}] has {arr.shape[1]} keys")
            if arr.shape[0] > arr.shape[1]:
                raise ValueError(f"{where}[{(l, h)}] has {arr.shape[0]} queries but {arr.shape[1]} keys; expected Tq <= Tk")
            mats[head_name(l, h)] = arr
        tokens = [str(t) for t in toks] if toks is not None else None
        checked.append((tokens, mats))
    names = sorted({n for _, m in checked for n in m}, key=lambda n: tuple(int(x) for x in n[1:].split("H")))
    ranked = [n for n in order if n in names] + [n for n in names if n not in order]
    kept, left_out, used = [], [], 0
    for n in ranked:
        cost = sum(m[n].size for _, m in checked if n in m)
        if used + cost <= budget or not kept:
            kept.append(n)
            used += cost
        else:
            left_out.append(n)
    out = []
    for tokens, mats in checked:
        Tk = next(iter(mats.values())).shape[1] if mats else (len(tokens) if tokens else 0)
        att = {}
        for n in kept:
            if n in mats:
                m = np.where(np.isfinite(mats[n]), np.clip(mats[n], 0.0, 1.0), np.nan)
                att[n] = [[None if math.isnan(v) else int(round(v * 10000)) for v in row] for row in m]
        out.append({"tokens": tokens if tokens is not None else [f"<{i}>" for i in range(Tk)], "att": att})
    return {"heads": kept, "left_out": left_out, "examples": out}


def circuit_of(circuit):
    """The :class:`~headint.results.circuit_graph.CircuitGraph` the report draws for ``circuit``:
    itself, or ``circuit.to_circuit_graph()`` (a :class:`~headint.circuits.CircuitResult`); None
    stays None. TypeError for anything else."""
    from .circuit_graph import CircuitGraph

    if circuit is None or isinstance(circuit, CircuitGraph):
        return circuit
    to_graph = getattr(circuit, "to_circuit_graph", None)
    if to_graph is None:
        raise TypeError(f"circuit must be a CircuitGraph (headint.results.circuit_graph) or a CircuitResult, got {type(circuit).__name__}")
    graph = to_graph()
    if not isinstance(graph, CircuitGraph):
        raise TypeError(f"{type(circuit).__name__}.to_circuit_graph() returned {type(graph).__name__}, not a CircuitGraph")
    return graph


def payload(result, *, title: str, tokens=None, singles=None, related: Sequence[RelatedScan] = (), head_columns=None,
            patterns=None, pattern_tokens=None, circuit=None, top: int = 10, pattern_budget: int = PATTERN_VALUES) -> dict:
    """Everything the viewer draws (see the module docstring); at most ``pattern_budget``
    attention weights (:func:`pattern_view`)."""
    related = list(related)
    for i, rel in enumerate(related):
        if not isinstance(rel, RelatedScan):
            raise TypeError(f"related[{i}] must be a RelatedScan(caption, result, singles=None, column=None), got {type(rel).__name__}")
    scans = [scan_view(result, key="main", caption="main scan", tokens=tokens, singles=singles)]
    scans += [scan_view(rel.result, key=f"related-{i}", caption=rel.caption, singles=rel.singles) for i, rel in enumerate(related)]
    table = head_table(result, related=related, head_columns=head_columns, top=top, tokens=tokens)
    if result.axes == ("head_set",):  # the heads of the sets, most important set first
        heads_of = dict(zip(scans[0]["names"], scans[0]["heads_of"]))
        order = [h for row in table["rows"] for h in heads_of[row[1]]]
    else:
        order = [h for h in table["heads"] if h is not None]
    order = list(dict.fromkeys(order))
    return {
        "title": title,
        "describe": plots.describe(result),
        "metric": result.metric_name,
        "scans": scans,
        "table": table,
        "patterns": pattern_view(patterns, pattern_tokens, order=order, budget=pattern_budget) if patterns else None,
        "circuit": None if circuit is None else circuit_of(circuit).to_json(),
    }
