"""The interactive, self-contained HTML report of a :class:`~headint.results.ScanResult`.

One file, no network: the viewer (``viewer/viewer.js``, ``viewer/viewer.css``, vanilla
JavaScript and SVG, no library) and the data (one ``<script type="application/json">`` block,
:mod:`headint.results.report_data`) are inlined. What it shows:

* the settings (metric, method, direction, N, baselines, normalisation) and warnings;
* the scan as a heatmap (layer x head; (layer, head) x position with token labels) or, for
  head sets, a bar chart (the pair chart, beside the summed single effects, when the
  single-head scan is given): hover a cell for ``effect +- stderr``, ``value +- stderr`` and
  ``n``; click it to select the head;
* the attention patterns of the selected head on several examples, as a token strip (hover a
  token: the tokens it attends to are shaded by weight) and a query x key matrix;
* a sortable, filterable table of every cell, ranked by ``|effect|``, with the effects of
  related scans and further per-head columns (pattern scores, roles);
* related scans (:class:`~headint.results.report_data.RelatedScan`), each interactive;
* a circuit graph when one is given (:mod:`headint.results.circuit_graph`, the hook for
  edge-level circuit methods; a :class:`~headint.circuits.CircuitResult` is drawn through it);
  :func:`circuit_report_html` is the report of a circuit alone;
* static figures (``figures=``, inline PNGs) if any.

Numbers are shown with :func:`decimals_for` decimals per column (``0.000``, never
``1.788e-07``). Without JavaScript (e.g. an untrusted notebook) a static table of the top cells
shows instead.

Size budget: a report stays under :data:`REPORT_BUDGET_BYTES` (2 MB) unless its scans alone
are larger. The viewer is under :data:`VIEWER_BUDGET_BYTES` (60 kB); the scans take about 100
bytes per cell (the heatmap's numbers and the table's row); the attention patterns get what is
left, at most :data:`~headint.results.report_data.PATTERN_VALUES` weights, the most important
heads first (the others are named on the page as left out). The scans' own numbers are never
cut: a scan of more than about 18,000 cells (per-position scans of large models) exceeds the
budget, and :func:`report_html` then warns (``ReportSizeWarning``).

Safety: every string from the data (tokens, names, settings) is escaped: in the HTML by
:func:`html.escape`, in the JSON block with ``<``, ``>``, ``&`` written as ``\\u003c``,
``\\u003e``, ``\\u0026`` (so ``</script>`` and ``<!--`` cannot occur there), and the viewer
puts it into the page only as text. The standalone file also carries a Content Security
Policy that allows only its own script (by hash), inline styles and ``data:`` images, so no
network request and no other script can run.

Notebook: :func:`notebook_html` (``ScanResult._repr_html_``) is the same view as an HTML
fragment; every element id is prefixed with an id unique to that rendering, so several
results in one notebook do not collide.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io as _io
import json
import math
import os
import secrets
import warnings as _warnings
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

from . import plots
from .report_data import PATTERN_VALUES, RelatedScan, circuit_of, payload

__all__ = ["report_html", "write_report", "circuit_report_html", "notebook_html", "table_html", "RelatedScan", "ReportSizeWarning",
           "REPORT_BUDGET_BYTES", "VIEWER_BUDGET_BYTES", "decimals_for", "format_number", "script_json"]

REPORT_BUDGET_BYTES = 2_000_000
"""A report (``report.html``) stays under this many bytes unless its scan alone is larger."""
VIEWER_BUDGET_BYTES = 60_000
"""The inlined viewer (script + style sheet) stays under this many bytes."""

_VIEWER_DIR = Path(__file__).with_name("viewer")
_PAGE_BYTES = 20_000  # the page around the data and the viewer: head, settings, static table, a margin


class ReportSizeWarning(UserWarning):
    """A report came out larger than :data:`REPORT_BUDGET_BYTES` (its scan has that many cells)."""


@lru_cache(maxsize=1)
def viewer_assets() -> tuple[str, str]:
    """``(script, style sheet)`` of the viewer, read from ``viewer/`` beside this module."""
    js = (_VIEWER_DIR / "viewer.js").read_text(encoding="utf-8")
    css = (_VIEWER_DIR / "viewer.css").read_text(encoding="utf-8")
    for name, text in (("viewer.js", js), ("viewer.css", css)):
        low = text.lower()
        if "</script" in low or "</style" in low or "<!--" in low:
            raise RuntimeError(f"{name} contains a closing tag or '<!--' and cannot be inlined")
    return js, css


def decimals_for(values) -> int:
    """Decimals to show a column of ``values`` with: 3; more (up to 6) when its largest
    ``|value|`` is below 0.01, so that value keeps 2 significant digits; 0 from 10,000 up.
    (The viewer uses the same rule.)"""
    m = max((abs(float(v)) for v in values if v is not None and math.isfinite(float(v))), default=0.0)
    if m == 0:
        return 3
    if m >= 10_000:
        return 0
    return max(3, min(6, 1 - math.floor(math.log10(m))))


def format_number(x, decimals: int = 3) -> str:
    """``x`` with ``decimals`` decimals (``"n/a"`` for None or NaN; no ``-0.000``)."""
    if x is None or not math.isfinite(float(x)):
        return "n/a"
    text = f"{float(x):.{decimals}f}"
    if text.startswith("-") and float(text) == 0:
        text = text[1:]
    return text


def script_json(obj) -> str:
    """``obj`` as JSON safe inside ``<script type="application/json">``: no ``<``, ``>`` or
    ``&`` (written as ``\\u003c`` ... inside strings, the only place JSON has them), so neither
    ``</script>`` nor ``<!--`` can occur; ASCII only; NaN refused (the data uses null)."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _png_data_uri(fig) -> str:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _summary_pairs(result) -> list[tuple[str, str]]:
    s = result.settings
    pairs = [("metric", result.metric_name), ("what the plots show", plots.describe(result)),
             ("examples (N)", str(result.n_examples)), ("clean baseline", format_number(result.clean_baseline)),
             ("corrupt baseline", format_number(result.corrupt_baseline))]
    if result.has_baseline:
        pairs.append(("effect", result.effect_definition))
    for key, value in (("kind", s.kind), ("method", s.method), ("direction", s.direction)):
        if value is not None:
            pairs.append((key, value))
    for key in ("model", "model_dir", "prompts", "corrupt", "backend"):
        if s.get(key) is not None:
            pairs.append((key, str(s[key])))
    if result.normalized and s.normalization is not None:
        pairs.append(("normalized from", f"clean {format_number(s.normalization.clean_baseline)}, "
                                         f"corrupt {format_number(s.normalization.corrupt_baseline)}"))
    return pairs


def _top_rows(result, top: int) -> str:
    """A static table of the ``top`` most important cells (numbers with :func:`decimals_for`)."""
    frame = result.top(top)
    name_cols = [c for c in ("layer", "head", "position", "head_set") if c in frame.columns]
    num_cols = [c for c in ("effect", "effect_stderr", "value", "stderr") if c in frame.columns]
    dec = {c: decimals_for(frame[c]) for c in num_cols}
    for mean, err in (("effect", "effect_stderr"), ("value", "stderr")):
        if err in dec and mean in dec:
            dec[err] = dec[mean]
    head = "".join(f'<th class="hi-name">{c}</th>' for c in ["rank", *name_cols])
    head += "".join(f"<th>{c}</th>" for c in [*num_cols, "n"])
    rows = []
    for rank, row in enumerate(frame.itertuples(index=False), start=1):
        d = row._asdict()
        cells = [f'<td class="hi-name">{rank}</td>']
        cells += [f'<td class="hi-name">{html.escape(str(d[c]))}</td>' for c in name_cols]
        cells += [f"<td>{format_number(d[c], dec[c])}</td>" for c in num_cols]
        cells.append(f"<td>{int(d['n'])}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="hi-top"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _n_cells(result) -> int:
    return int(result.per_example[..., 0].numel())


def table_html(result, top: int = 10) -> str:
    """HTML snippet, no script: one summary line and the ``top`` most important cells (the
    view without JavaScript)."""
    line = html.escape(f"{result.metric_name}: {plots.describe(result)}; clean {format_number(result.clean_baseline)}, "
                       f"corrupt {format_number(result.corrupt_baseline)}; grid {list(result.grid_shape)}")
    k = max(1, min(int(top), _n_cells(result)))
    return (f'<div class="headint-scan-result"><p>{line}</p><p>The {k} most important of {_n_cells(result)} cells '
            f"(largest |effect| first):</p>{_top_rows(result, k)}</div>")


def _fragment(result, *, uid: str, title: str, heading: str, settings_open: bool = True, tokens=None, patterns=None,
              pattern_tokens=None, singles=None, related: Sequence[RelatedScan] = (), head_columns: Mapping | None = None,
              circuit=None, top: int = 10, warnings: Sequence[str] = (), figures=()) -> tuple[str, str]:
    """``(fragment, script)``: the report's ``<div class="hi-report">`` and the text of its one
    executable script (for the standalone file's Content Security Policy hash). settings_open:
    whether the settings table starts unfolded (the notebook view folds it)."""
    js, css = viewer_assets()
    common = dict(title=title, tokens=tokens, singles=singles, related=related, head_columns=head_columns, circuit=circuit,
                  top=top)
    data = payload(result, **common)
    if patterns:  # the patterns get what the rest leaves of the budget (a weight takes at most 7 bytes)
        rest = len(script_json(data)) + len(js) + len(css) + _PAGE_BYTES
        data = payload(result, patterns=patterns, pattern_tokens=pattern_tokens, **common,
                       pattern_budget=min(PATTERN_VALUES, max(0, REPORT_BUDGET_BYTES - rest) // 7))
    all_warnings = [*warnings, *[w for w in result.settings.get("warnings", []) if w not in warnings]]
    script = f"{js}\nwindow.headintViewer.render(document.currentScript, {json.dumps(uid)});\n"
    k = max(1, min(int(top), _n_cells(result)))
    parts = [
        f'<div class="hi-report" id="{uid}">',
        f"<style>{css}</style>",
        f'<{heading} class="hi-title">{html.escape(title)}</{heading}>',
        *[f'<p class="hi-warning">warning: {html.escape(w)}</p>' for w in all_warnings],
        f'<details class="hi-settings" id="{uid}-settings"{" open" if settings_open else ""}><summary>Settings</summary><table>',
        *[f'<tr><th class="hi-name">{html.escape(k_)}</th><td>{html.escape(v)}</td></tr>' for k_, v in _summary_pairs(result)],
        "</table></details>",
        f'<section class="hi-static" id="{uid}-static"><h2>The {k} most important of {_n_cells(result)} cells</h2>'
        f'<p class="hi-caption">The interactive view needs JavaScript; this is the table without it.</p>{_top_rows(result, k)}</section>',
        f'<div class="hi-app" id="{uid}-app"></div>',
    ]
    if figures:
        parts.append(f'<section class="hi-figures" id="{uid}-figures"><h2>Further figures</h2>')
        for caption, fig in figures:
            parts.append(f'<figure><img alt="{html.escape(caption)}" src="{_png_data_uri(fig)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</section>")
    parts += [f'<script type="application/json" class="hi-data" id="{uid}-data">{script_json(data)}</script>',
              f"<script>{script}</script>", "</div>"]
    return "\n".join(parts), script


def _document(title: str, fragment: str, script: str) -> str:
    """The standalone page around a report fragment, with a Content Security Policy that lets
    only ``script`` (by hash) run."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
           "base-uri 'none'; form-action 'none'")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        "<style>body { margin: 0; background: #fff; }</style></head><body>",
        fragment,
        "</body></html>",
    ])


def circuit_report_html(circuit, *, title: str | None = None, settings: Sequence[tuple[str, str]] = (),
                        warnings: Sequence[str] = ()) -> str:
    """A report of a circuit alone (no scan) as one self-contained HTML document: the settings
    (``(name, value)`` pairs), the interactive circuit graph (hover an edge or a node, the edges
    by ``|weight|`` below it) and, for a reader without JavaScript, a static table of the edges.
    ``circuit``: a :class:`~headint.results.circuit_graph.CircuitGraph` or an object with
    ``to_circuit_graph()`` (a :class:`~headint.circuits.CircuitResult`); ``CircuitResult.to_html``
    calls this. Same safety as :func:`report_html` (escaped strings, one hashed script)."""
    graph = circuit_of(circuit)
    if graph is None:
        raise TypeError("circuit must be a CircuitGraph or a CircuitResult, got None")
    title = title or graph.title
    data = {"title": title, "describe": "", "metric": "", "scans": [], "table": None, "patterns": None, "circuit": graph.to_json()}
    text = script_json(data)
    uid = "hi-" + hashlib.sha256(f"{title}|{text}".encode()).hexdigest()[:10]
    js, css = viewer_assets()
    script = f"{js}\nwindow.headintViewer.render(document.currentScript, {json.dumps(uid)});\n"
    edges = sorted(graph.edges, key=lambda e: -abs(e.weight) if math.isfinite(e.weight) else 1.0)
    dec = decimals_for([e.weight for e in edges])
    rows = "".join(f'<tr><td class="hi-name">{i}</td><td class="hi-name">{html.escape(e.source)} \u2192 {html.escape(e.target)}</td>'
                   f'<td class="hi-name">{html.escape(e.kind or "")}</td><td>{format_number(e.weight, dec)}</td></tr>'
                   for i, e in enumerate(edges, start=1))
    static = (f'<table class="hi-top"><thead><tr><th class="hi-name">rank</th><th class="hi-name">edge</th><th class="hi-name">kind</th>'
              f"<th>{html.escape(graph.weight_label)}</th></tr></thead><tbody>{rows}</tbody></table>")
    parts = [
        f'<div class="hi-report" id="{uid}">',
        f"<style>{css}</style>",
        f'<h1 class="hi-title">{html.escape(title)}</h1>',
        *[f'<p class="hi-warning">warning: {html.escape(w)}</p>' for w in warnings],
        f'<details class="hi-settings" id="{uid}-settings" open><summary>Settings</summary><table>',
        *[f'<tr><th class="hi-name">{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>' for k, v in settings],
        "</table></details>",
        f'<section class="hi-static" id="{uid}-static"><h2>The {len(edges)} edges drawn</h2>'
        f'<p class="hi-caption">The interactive view needs JavaScript; this is the table without it.'
        f'{" " + html.escape(graph.note) if graph.note else ""}</p>{static}</section>',
        f'<div class="hi-app" id="{uid}-app"></div>',
        f'<script type="application/json" class="hi-data" id="{uid}-data">{text}</script>',
        f"<script>{script}</script>", "</div>",
    ]
    return _document(title, "\n".join(parts), script)


def report_html(result, *, tokens=None, patterns=None, pattern_tokens=None, singles=None, related: Sequence[RelatedScan] = (),
                head_columns: Mapping | None = None, circuit=None, title: str | None = None, top: int = 10,
                warnings: Sequence[str] = (), figures=()) -> str:
    """The report of ``result`` as one self-contained HTML document (a string).

    tokens: ``P`` strings labelling the position axis of a per-position scan.
    patterns: ``{(layer, head): [Tq, Tk]}`` attention probabilities of one example (e.g. from
    :func:`headint.pattern_views.head_patterns`), or a list of such mappings, one per example;
    pattern_tokens: the ``Tk`` key tokens (one list, or one list per example).
    singles: for a head-set scan, the single-head scan (the pair chart).
    related: further scans (:class:`RelatedScan`), each drawn interactively; with a
    ``column``, its effect is a column of the head table. head_columns: ``{heading: [L, H]
    array or {(layer, head): value}}`` more head-table columns (e.g. pattern scores, roles).
    circuit: a :class:`~headint.results.circuit_graph.CircuitGraph` or a
    :class:`~headint.circuits.CircuitResult` (its circuit, or its top edges: ``to_circuit_graph()``):
    the circuit section, whose head nodes select that head in the rest of the report.
    top: rows of the head table shown before "show all". warnings: lines shown at the top
    (the result's ``settings["warnings"]`` too). figures: ``[(caption, matplotlib Figure)]``
    shown as static images at the end.
    """
    title = title or f"headint scan: {result.metric_name}"
    uid = "hi-" + hashlib.sha256(f"{title}|{result!r}|{result.per_example.sum().item()}".encode()).hexdigest()[:10]
    fragment, script = _fragment(result, uid=uid, title=title, heading="h1", tokens=tokens, patterns=patterns,
                                 pattern_tokens=pattern_tokens, singles=singles, related=related, head_columns=head_columns,
                                 circuit=circuit, top=top, warnings=warnings, figures=figures)
    doc = _document(title, fragment, script)
    size = len(doc.encode("utf-8"))
    if size > REPORT_BUDGET_BYTES:
        _warnings.warn(f"the report is {size / 1e6:.1f} MB, over its {REPORT_BUDGET_BYTES / 1e6:.0f} MB budget: the scan has "
                       f"{_n_cells(result)} cells, all kept", ReportSizeWarning, stacklevel=2)
    return doc


def notebook_html(result, top: int = 10) -> str:
    """The interactive view of ``result`` as an HTML fragment for a notebook output cell
    (heatmap with hover, head table; no patterns, no model at hand). Its element ids carry a
    random id of this rendering, so two results in one notebook never collide."""
    fragment, _ = _fragment(result, uid="hi-" + secrets.token_hex(6), title=f"{result.metric_name}: {plots.describe(result)}",
                            heading="h3", settings_open=False, top=top)
    return fragment


def write_report(result, path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`report_html` of ``result`` to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    text = report_html(result, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
