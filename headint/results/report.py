"""A self-contained HTML report of a :class:`~headint.results.ScanResult`.

One file, no network: every image is an inline base64 PNG, the style sheet is inline, there
is no script. Sections (each an element with a stable ``id``, which the browser test checks):

* ``#settings``: metric, method, direction, N, baselines, normalisation, warnings;
* ``#heatmap``: the scan's plot (layer x head image; per-position image with token labels
  when ``tokens`` are given; for head sets the bar chart, beside the summed single effects
  when ``singles`` is given);
* ``#top-heads``: the ``top`` most important cells with value, stderr, effect,
  effect_stderr and n;
* ``#patterns`` (when ``patterns`` are given): one attention-pattern image per head, of one
  example, labelled with its tokens;
* ``#figures`` (when ``figures`` are given): further plots with captions.

:func:`table_html` is the notebook view (``ScanResult._repr_html_``): the summary line and
the top table, no images.
"""

from __future__ import annotations

import base64
import html
import io as _io
import math
import os
from pathlib import Path
from typing import Mapping

from . import plots

__all__ = ["report_html", "write_report", "table_html"]

_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td.name, th.name { text-align: left; }
img { max-width: 100%; height: auto; }
.patterns { display: flex; flex-wrap: wrap; gap: 12px; }
.patterns figure { margin: 0; width: 340px; } figcaption { font-size: 0.85em; text-align: center; }
.warning { color: #8a4b00; background: #fff4e0; padding: 4px 8px; }
"""


def _png_data_uri(fig) -> str:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    x = float(x)
    return "NaN" if math.isnan(x) else f"{x:.{digits}g}"


def _summary_pairs(result) -> list[tuple[str, str]]:
    s = result.settings
    pairs = [("metric", result.metric_name), ("what the plots show", plots.describe(result)),
             ("examples (N)", str(result.n_examples)), ("clean baseline", _num(result.clean_baseline)),
             ("corrupt baseline", _num(result.corrupt_baseline))]
    if result.has_baseline:
        pairs.append(("effect", result.effect_definition))
    for key, value in (("kind", s.kind), ("method", s.method), ("direction", s.direction)):
        if value is not None:
            pairs.append((key, value))
    for key in ("model", "model_dir", "prompts", "corrupt", "backend"):
        if s.get(key) is not None:
            pairs.append((key, str(s[key])))
    if result.normalized and s.normalization is not None:
        pairs.append(("normalized from", f"clean {_num(s.normalization.clean_baseline)}, "
                                         f"corrupt {_num(s.normalization.corrupt_baseline)}"))
    return pairs


def _top_rows(result, top: int) -> str:
    frame = result.top(top)
    name_cols = [c for c in ("layer", "head", "position", "head_set") if c in frame.columns]
    num_cols = [c for c in ("value", "stderr", "effect", "effect_stderr", "n") if c in frame.columns]
    head = "".join(f'<th class="name">{c}</th>' for c in ["rank", *name_cols]) + "".join(f"<th>{c}</th>" for c in num_cols)
    rows = []
    for rank, row in enumerate(frame.itertuples(index=False), start=1):
        d = row._asdict()
        cells = [f'<td class="name">{rank}</td>']
        cells += [f'<td class="name">{html.escape(str(d[c]))}</td>' for c in name_cols]
        cells += [f"<td>{int(d[c])}</td>" if c == "n" else f"<td>{_num(d[c])}</td>" for c in num_cols]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def table_html(result, top: int = 10) -> str:
    """HTML snippet: one summary line and the ``top`` most important cells (notebook view)."""
    line = html.escape(f"{result.metric_name}: {plots.describe(result)}; clean {_num(result.clean_baseline)}, "
                       f"corrupt {_num(result.corrupt_baseline)}; grid {list(result.grid_shape)}")
    k = max(1, min(int(top), result.per_example[..., 0].numel()))
    return f'<div class="headint-scan-result"><p>{line}</p>{_top_rows(result, k)}</div>'


def _check_patterns(patterns: Mapping, pattern_tokens) -> list[tuple[tuple[int, int], object]]:
    import numpy as np

    if not isinstance(patterns, Mapping):
        raise TypeError(f"patterns must be a mapping {{(layer, head): [Tq, Tk] attention probabilities}}, got {type(patterns).__name__}")
    items = []
    for key, value in patterns.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(i, int) for i in key)):
            raise ValueError(f"patterns keys must be (layer, head) int pairs, got {key!r}")
        arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"patterns[{key}] must be [Tq, Tk] (one example, one head), got shape {list(arr.shape)}")
        if pattern_tokens is not None and len(pattern_tokens) != arr.shape[1]:
            raise ValueError(f"pattern_tokens has {len(pattern_tokens)} entries but patterns[{key}] has {arr.shape[1]} keys")
        items.append((key, arr))
    return items


def report_html(result, *, tokens=None, patterns: Mapping | None = None, pattern_tokens=None, singles=None,
                title: str | None = None, top: int = 10, warnings: list[str] | tuple = (), figures=()) -> str:
    """The report of ``result`` as one self-contained HTML document (a string).

    tokens: ``P`` strings labelling the position axis of a per-position scan.
    patterns: ``{(layer, head): [Tq, Tk]}`` attention probabilities of one example (e.g. from
    :func:`headint.record` with ``what=("pattern",)``), labelled with ``pattern_tokens``
    (``Tk`` strings). singles: for a head-set scan, the single-head scan to compare with.
    warnings: lines shown at the top (e.g. a near-zero normalisation gap); the result's
    ``settings["warnings"]`` are shown too. figures: ``[(caption, matplotlib Figure)]`` added
    in a ``#figures`` section (e.g. related scans).
    """
    title = title or f"headint scan: {result.metric_name}"
    items = _check_patterns(patterns, pattern_tokens) if patterns else []
    fig = plots.heatmap(result, title=title, tokens=tokens, singles=singles)
    heat_uri = _png_data_uri(fig)
    all_warnings = [*warnings, *[w for w in result.settings.warnings if w not in warnings]]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<section id="settings"><h2>Settings</h2><table>',
        *[f'<tr><th class="name">{html.escape(k)}</th><td class="name">{html.escape(v)}</td></tr>' for k, v in _summary_pairs(result)],
        "</table>",
        *[f'<p class="warning">warning: {html.escape(w)}</p>' for w in all_warnings],
        "</section>",
        '<section id="heatmap"><h2>Effect of each intervention</h2>',
        f'<img id="heatmap-image" alt="{html.escape(plots.describe(result))}" src="{heat_uri}">',
        "</section>",
        f'<section id="top-heads"><h2>Top {int(top)} (most important first, with standard errors)</h2>',
        _top_rows(result, max(1, min(int(top), result.per_example[..., 0].numel()))),
        "</section>",
    ]
    if items:
        parts.append('<section id="patterns"><h2>Attention patterns of the top heads (one example)</h2><div class="patterns">')
        for (layer, head), arr in items:
            name = f"L{layer}H{head}"
            uri = _png_data_uri(plots.pattern_image(arr, pattern_tokens, title=name))
            parts.append(f'<figure class="pattern" id="pattern-{name}"><img alt="attention pattern of {name}" src="{uri}">'
                         f"<figcaption>{name}: query rows, key columns</figcaption></figure>")
        parts.append("</div></section>")
    if figures:
        parts.append('<section id="figures"><h2>Related scans</h2>')
        for caption, fig in figures:
            parts.append(f'<figure class="extra"><img alt="{html.escape(caption)}" src="{_png_data_uri(fig)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(result, path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`report_html` of ``result`` to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = report_html(result, **kwargs)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
