"""Token labels, plot titles, the pair chart's data and the interactive HTML report (Python API,
CLI, notebook view), and the report used in a real headless Chromium: hover, click, sort,
filter, hostile strings, two notebook outputs side by side."""

from __future__ import annotations

import json
import re
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import headint
from headint.cli import main
from headint.results import ScanResult
from headint.results.circuit_graph import circuit_graph
from headint.results.pairs import pair_frame
from headint.results.report import (REPORT_BUDGET_BYTES, VIEWER_BUDGET_BYTES, RelatedScan, ReportSizeWarning, decimals_for,
                                    format_number, report_html, script_json, table_html, viewer_assets)
from headint.results.report_data import PATTERN_VALUES, head_table, pattern_view
from report_checks import assert_self_contained, report_data
from scan_oracles import oracle_scan
from test_scan_prompts import make_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHOTS = Path(__file__).resolve().parents[1] / ".test-screenshots"  # ignored by git; kept for a human to look at


# ---------------------------------------------------------------------- token strings


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_to_str_tokens(tokenizer):
    ids = tokenizer("When Mary met John", add_special_tokens=False)["input_ids"]
    strs = headint.to_str_tokens(tokenizer, ids)
    assert "".join(strs) == "When Mary met John" and len(strs) == len(ids)
    assert " Mary" in strs and " John" in strs  # the leading space is kept
    assert headint.to_str_tokens(tokenizer, torch.tensor([ids, ids])) == [strs, strs]
    assert headint.to_str_tokens(None, torch.tensor([5, 0])) == ["<5>", "<0>"]
    with pytest.raises(ValueError, match=r"ids\[1\] = 99999 is not a token id"):
        headint.to_str_tokens(tokenizer, [1, 99999])
    with pytest.raises(ValueError, match=r"ids\[0\] = -1"):
        headint.to_str_tokens(None, [-1])
    with pytest.raises(ValueError, match="integer token ids"):
        headint.to_str_tokens(tokenizer, torch.zeros(3))
    with pytest.raises(TypeError, match="token ids"):
        headint.to_str_tokens(tokenizer, "When Mary")
    with pytest.raises(TypeError, match=r"ids\[1\] must be an int"):
        headint.to_str_tokens(tokenizer, [1, 2.5])


# ---------------------------------------------------------------------- plots


def _result(axes=("layer", "head", "position"), grid=(2, 3, 4), N=5, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    per = torch.randn(*grid, N, generator=g, dtype=torch.float64)
    kw.setdefault("settings", {"method": "patch", "direction": "noising", "kind": "exact"})
    return ScanResult(per, axes, metric_name="logit_diff", clean_baseline=0.5, corrupt_baseline=-1.0,
                      base_per_example=torch.randn(N, generator=g, dtype=torch.float64), **kw)


def test_heatmap_token_labels_and_title():
    r = _result()
    tokens = ["When", " Mary", " met", " John"]
    fig = r.heatmap(tokens=tokens, title="my scan")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0: When", "1: \u2423Mary", "2: \u2423met", "3: \u2423John"]
    title = ax.get_title()
    assert title.startswith("my scan\n") and "method patch" in title and "direction noising" in title and "N=5" in title
    with pytest.raises(ValueError, match="tokens has 3 entries; expected 4"):
        r.heatmap(tokens=tokens[:3])
    with pytest.raises(ValueError, match="tokens label the position axis"):
        _result(("layer", "head"), (2, 3)).heatmap(tokens=tokens)
    default = _result(("layer", "head"), (2, 3), settings={"method": "zero"}).heatmap().axes[0].get_title()
    assert "method zero" in default and "N=5" in default and "direction" not in default


def test_heatmap_title_fits_the_figure():
    """A long title (an attribution scan's, as in the demo) wraps inside the figure, never clipped."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    r = _result(("layer", "head"), (2, 4), settings={"kind": "attribution", "method": "patch", "direction": "noising"})
    fig = r.heatmap(title="induction-2l: attribution (logit difference)")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig.axes[0].title.get_window_extent(canvas.get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.x1, (box, fig.bbox)


def _pairs_and_singles(N=6, nan_at=None):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(N, generator=g, dtype=torch.float64)
    single = torch.randn(2, 2, N, generator=g, dtype=torch.float64)
    sets = [((0, 0), (0, 1)), ((0, 0), (1, 1)), ((0, 1), (1, 0))]
    pair = torch.randn(len(sets), N, generator=g, dtype=torch.float64)
    if nan_at is not None:
        pair[0, nan_at] = float("nan")
    kw = dict(metric_name="m", clean_baseline=float(base.mean()), base_per_example=base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", headint.NaNMetricWarning)
        return (ScanResult(pair, ("head_set",), labels=sets, **kw), ScanResult(single, ("layer", "head"), **kw),
                base, single, pair, sets)


def test_pair_frame_matches_per_example_arithmetic():
    pairs, singles, base, single, pair, sets = _pairs_and_singles(nan_at=2)
    frame = pair_frame(pairs, singles)
    assert list(frame["head_set"]) == ["L0H0+L0H1", "L0H0+L1H1", "L0H1+L1H0"]
    for i, (a, b) in enumerate(sets):
        joint = pair[i] - base
        summed = (single[a] - base) + (single[b] - base)
        keep = torch.isfinite(joint)
        j, s = joint[keep], summed[keep]
        n = int(keep.sum())
        assert frame["n"][i] == n == (5 if i == 0 else 6)
        np.testing.assert_allclose(frame["effect"][i], float(j.mean()), rtol=1e-12)
        np.testing.assert_allclose(frame["singles_sum"][i], float(s.mean()), rtol=1e-12)
        np.testing.assert_allclose(frame["singles_sum_stderr"][i], float(s.std() / n ** 0.5), rtol=1e-12)
        np.testing.assert_allclose(frame["interaction"][i], float((j - s).mean()), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(frame["interaction_stderr"][i], float((j - s).std() / n ** 0.5), rtol=1e-12)
    fig = pairs.heatmap(singles=singles)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["together (joint effect)", "single effects summed"]


def test_pair_frame_refuses_mismatches():
    pairs, singles, *_ = _pairs_and_singles()
    other_n = ScanResult(torch.zeros(2, 2, 3), ("layer", "head"), metric_name="m", clean_baseline=0.0)
    with pytest.raises(ValueError, match="singles has 3 examples but sets has 6"):
        pair_frame(pairs, other_n)
    small = ScanResult(torch.zeros(1, 1, 6), ("layer", "head"), metric_name="m", clean_baseline=0.0)
    with pytest.raises(ValueError, match="has head L0H1, outside singles' \\[1 layers, 1 heads\\]"):
        pair_frame(pairs, small)
    with pytest.raises(ValueError, match="sets must be a head-set scan"):
        pair_frame(singles, singles)
    with pytest.raises(ValueError, match="singles= is for head-set scans"):
        singles.heatmap(singles=singles)


# ---------------------------------------------------------------------- HTML (no browser)


def test_decimals_and_number_format():
    """Numbers for reading: 0.000, never 1.788e-07; more decimals only for a column of tiny values."""
    assert decimals_for([7.314, 1.788e-07, -0.431]) == 3
    assert format_number(1.788e-07, 3) == "0.000" and format_number(-1e-9, 3) == "0.000"
    assert format_number(-7.3141, 3) == "-7.314" and format_number(float("nan")) == "n/a" and format_number(None) == "n/a"
    assert decimals_for([0.0012, -0.0003]) == 4 and format_number(0.0012, 4) == "0.0012"
    assert decimals_for([3e-9]) == 6 and decimals_for([12345.6]) == 0 and decimals_for([]) == 3
    assert decimals_for([float("nan"), None, 0.5]) == 3


def test_script_json_cannot_close_its_block():
    hostile = ["</script><script>alert(1)</script>", "<!-- x", "a & b", "\u2028\u2029", "</SCRIPT >", "]]>"]
    text = script_json({"tokens": hostile, "x": 1.5, "nan": None})
    low = text.lower()
    assert "</script" not in low and "<!--" not in low and "<" not in text and ">" not in text and "&" not in text
    assert text.isascii() and json.loads(text) == {"tokens": hostile, "x": 1.5, "nan": None}
    with pytest.raises(ValueError):
        script_json({"x": float("nan")})


def test_viewer_fits_its_budget():
    js, css = viewer_assets()
    assert len(js.encode()) + len(css.encode()) < VIEWER_BUDGET_BYTES
    assert "innerHTML" not in js and "eval(" not in js and "document.write" not in js  # data enters as text only


def test_to_html_data_and_static_view(tmp_path):
    r = _result(settings={"method": "patch", "direction": "noising", "kind": "exact", "model": "M<script>"})
    tokens = ["When", " Mary", " met", " <John>"]
    patterns = {(1, 2): torch.softmax(torch.randn(4, 4), -1), (0, 0): np.eye(4)}
    path = r.to_html(tmp_path / "r.html", tokens=tokens, patterns=patterns, pattern_tokens=tokens, top=3,
                     warnings=["gap within noise"])
    html = path.read_text()
    assert_self_contained(html)
    assert "M&lt;script&gt;" in html and "warning: gap within noise" in html
    data = report_data(html)
    main_view = data["scans"][0]
    assert main_view["kind"] == "positions" and main_view["tokens"] == tokens and main_view["quantity"] == "effect"
    np.testing.assert_allclose(main_view["cells"]["effect"], r.effect.reshape(-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(main_view["cells"]["effect_stderr"], r.effect_stderr.reshape(-1).numpy(), rtol=1e-5)
    assert main_view["cells"]["n"] == [5] * 24
    # the table holds every cell, ranked as top() ranks them; 3 rows are shown first
    table = data["table"]
    assert table["top"] == 3 and len(table["rows"]) == 24
    cols = [c["key"] for c in table["columns"]]
    top = r.top(24)
    assert [row[cols.index("position")] for row in table["rows"]] == list(top["position"])
    assert [row[cols.index("token")] for row in table["rows"]][:2] == [tokens[p] for p in top["position"][:2]]
    np.testing.assert_allclose([row[cols.index("effect")] for row in table["rows"]], top["effect"], rtol=1e-5)
    assert data["patterns"]["heads"] == ["L1H2", "L0H0"] or data["patterns"]["heads"][0] in ("L1H2", "L0H0")
    assert data["patterns"]["examples"][0]["att"]["L0H0"] == (np.eye(4) * 10000).astype(int).tolist()
    # the static view (no JavaScript): 3 rows, numbers with 3 decimals
    static = html.split('class="hi-static"')[1].split("</section>")[0]
    assert "The 3 most important of 24 cells" in static and static.count("<tr>") == 4
    first = top.iloc[0]
    assert f"<td>{first['effect']:.3f}</td><td>{first['effect_stderr']:.3f}</td>" in static
    assert not re.search(r"\de-\d", static)
    with pytest.raises(ValueError, match=r"patterns\[\(0, 0\)\] must be \[Tq, Tk\]"):
        r.to_html(tmp_path / "x.html", patterns={(0, 0): np.zeros((1, 4, 4))})
    with pytest.raises(ValueError, match="pattern_tokens has 2 entries"):
        r.to_html(tmp_path / "x.html", patterns={(0, 0): np.eye(4)}, pattern_tokens=["a", "b"])
    assert not (tmp_path / "x.html").exists()


def test_patterns_of_several_examples_and_their_checks():
    a = {(0, 0): np.eye(3), (1, 1): np.full((3, 3), 1 / 3)}
    b = {(0, 0): np.eye(5), (1, 1): np.eye(5)}
    view = pattern_view([a, b], [["x", "y", "z"], list("abcde")], order=["L1H1"])
    assert view["heads"] == ["L1H1", "L0H0"] and view["left_out"] == []
    assert [len(e["tokens"]) for e in view["examples"]] == [3, 5] and view["examples"][0]["att"]["L1H1"][0] == [3333] * 3
    # the budget keeps the most important heads first and names the others
    small = pattern_view([a, b], None, order=["L0H0", "L1H1"], budget=40)
    assert small["heads"] == ["L0H0"] and small["left_out"] == ["L1H1"] and small["examples"][1]["tokens"][0] == "<0>"
    with pytest.raises(ValueError, match=r"pattern_tokens\[1\] has 3 entries but patterns\[1\]\[\(0, 0\)\] has 5 keys"):
        pattern_view([a, b], [["x", "y", "z"], ["x", "y", "z"]])
    with pytest.raises(ValueError, match="one token list per example"):
        pattern_view([a, b], ["x", "y", "z"])
    with pytest.raises(ValueError, match="keys must be \\(layer, head\\) int pairs"):
        pattern_view({"L0H0": np.eye(2)})
    with pytest.raises(ValueError, match="4 queries but 3 keys"):
        pattern_view({(0, 0): np.ones((4, 3))})
    with pytest.raises(ValueError, match="empty list"):
        pattern_view([])


def test_head_table_columns_and_their_checks():
    r = _result(("layer", "head"), (2, 3))
    other = _result(("layer", "head"), (2, 3), seed=1)
    table = head_table(r, related=[RelatedScan("patching", other, column="patch effect")],
                       head_columns={"prev-tok": np.arange(6).reshape(2, 3) / 10, "role": {(1, 2): "induction"}})
    cols = [c["label"] for c in table["columns"]]
    assert cols == ["rank", "head", "layer", "head #", "effect", "\u00b1 stderr", "value", "n", "patch effect", "prev-tok", "role"]
    top = r.top(6)
    for row, (l, h) in zip(table["rows"], zip(top["layer"], top["head"])):
        assert row[1] == f"L{l}H{h}"
        assert row[8] == pytest.approx(float(other.effect[l, h]), rel=1e-5) and row[9] == pytest.approx((3 * l + h) / 10)
        assert row[10] == ("induction" if (l, h) == (1, 2) else None)
    with pytest.raises(ValueError, match=r"head_columns\['s'\] has shape \[3, 2\]; expected \[2, 3\]"):
        head_table(r, head_columns={"s": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="mixes strings and numbers"):
        head_table(r, head_columns={"s": {(0, 0): "a", (0, 1): 1.0}})
    with pytest.raises(ValueError, match=r"has key \(2, 0\)"):
        head_table(r, head_columns={"s": {(2, 0): 1.0}})
    with pytest.raises(ValueError, match="a head-table column needs a \\(layer, head\\) scan of \\[2, 3\\]"):
        head_table(r, related=[RelatedScan("pos", _result(), column="x")])
    with pytest.raises(TypeError, match=r"related\[0\] must be a RelatedScan"):
        r.to_html("never.html", related=[("patching", other)])


def test_circuit_graph_checks():
    g = circuit_graph(["input", "a0.h1", "MLP0", {"name": "resid", "layer": 1}, "L1H0", "logits"],
                      [("input", "a0.h1", 0.5), ("a0.h1", "L1H0", -1.0, "k"), {"source": "L1H0", "target": "logits", "weight": float("nan")}],
                      title="c", weight_label="EAP score")
    data = g.to_json()
    assert [(n["name"], n["kind"], n["layer"]) for n in data["nodes"]] == [
        ("input", "input", None), ("a0.h1", "head", 0), ("MLP0", "mlp", 0), ("resid", "other", 1), ("L1H0", "head", 1),
        ("logits", "output", None)]
    assert data["edges"][2]["weight"] is None and data["edges"][1]["kind"] == "k"
    with pytest.raises(ValueError, match="names node 'L9H9', which is not among the nodes"):
        circuit_graph(["L0H0"], [("L0H0", "L9H9", 1.0)])
    with pytest.raises(ValueError, match="node 'L0H0' is given twice"):
        circuit_graph(["L0H0", "L0H0"], [])
    with pytest.raises(ValueError, match=r"its layer is not known from its name; give it as \{'name': 'resid'"):
        circuit_graph(["resid"], [])
    with pytest.raises(ValueError, match="has kind 'attn'"):
        circuit_graph([{"name": "x", "layer": 0, "kind": "attn"}], [])
    with pytest.raises(TypeError, match=r"edges\[0\] must be \(source, target, weight\[, kind\]\)"):
        circuit_graph(["L0H0"], [("L0H0",)])


def test_report_size_budget(tmp_path):
    """A 32 x 32 head scan with patterns of every head on 3 examples of 24 tokens stays under the
    budget: the patterns of the most important heads are kept, the others named as left out. A
    per-position scan too large for the budget is written whole, with a warning."""
    g = torch.Generator().manual_seed(0)
    r = ScanResult(torch.randn(32, 32, 8, generator=g), ("layer", "head"), metric_name="m", clean_baseline=0.0,
                   base_per_example=torch.zeros(8))
    pat = torch.softmax(torch.randn(24, 24, generator=g), -1)
    patterns = [{(l, h): pat for l in range(32) for h in range(32)} for _ in range(3)]
    html = report_html(r, patterns=patterns, pattern_tokens=[[f"t{i}" for i in range(24)]] * 3)
    size = len(html.encode())
    assert size < REPORT_BUDGET_BYTES, size
    data = report_data(html)
    kept, left = data["patterns"]["heads"], data["patterns"]["left_out"]
    assert len(kept) == PATTERN_VALUES // (3 * 24 * 24) and len(kept) + len(left) == 1024
    order = [f"L{l}H{h}" for l, h in zip(r.top(1024)["layer"], r.top(1024)["head"])]
    assert kept == order[: len(kept)]  # the most important heads first
    # a per-position scan of 32 x 32 heads x 12 positions leaves less room: fewer heads' patterns, still under budget
    pos = ScanResult(torch.randn(32, 32, 12, 4, generator=g), ("layer", "head", "position"), metric_name="m",
                     clean_baseline=0.0, base_per_example=torch.zeros(4))
    html = report_html(pos, patterns=patterns, pattern_tokens=[[f"t{i}" for i in range(24)]] * 3)
    assert len(html.encode()) < REPORT_BUDGET_BYTES, len(html.encode())
    kept_pos = report_data(html)["patterns"]["heads"]
    assert 1 <= len(kept_pos) < len(kept)
    big = ScanResult(torch.randn(32, 32, 64, 2, generator=g), ("layer", "head", "position"), metric_name="m",
                     clean_baseline=0.0, base_per_example=torch.zeros(2))
    with pytest.warns(ReportSizeWarning, match=r"over its 2 MB budget: the scan has 65536 cells, all kept"):
        html = report_html(big)
    assert len(report_data(html)["scans"][0]["cells"]["value"]) == 65536


def test_notebook_view_is_the_interactive_view():
    r = _result(("layer", "head"), (2, 3))
    one, two = r._repr_html_(), r._repr_html_()
    assert_self_contained(one, standalone=False)
    assert "<html" not in one and "<body" not in one
    ids_one, ids_two = set(re.findall(r'id="([^"]+)"', one)), set(re.findall(r'id="([^"]+)"', two))
    assert ids_one and not ids_one & ids_two  # two renderings share no id
    assert report_data(one)["scans"][0]["kind"] == "grid"
    assert "method patch, direction noising, N=5" in one and 'class="hi-static"' in one  # the view without scripts
    assert table_html(r).count("<tr>") == 7


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=len(tok), n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0,
                     embd_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    root = tmp_path_factory.mktemp("textmodel-report")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"text": "When Mary and John went out, John gave it to", "target": " Mary", "contrast": " John"},
            {"text": "When John and Mary went out, Mary gave it to", "target": " John", "contrast": " Mary"}]
    corrupt = [{"text": "When Mary and John went out, Mary gave it to"}, {"text": "When John and Mary went out, John gave it to"}]
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corrupt))
    return root, model, tok


@pytest.fixture(scope="module")
def cli_report(text_model_dir):
    """``headint scan --per-position --method patch`` on text prompts: its output folder."""
    root, _, _ = text_model_dir
    out = root / "out"
    rc = main(["scan", str(root / "model"), "--prompts", str(root / "p.jsonl"), "--corrupt", str(root / "c.jsonl"),
               "--method", "patch", "--per-position", "--out", str(out), "--no-progress", "--backend", "reference"])
    assert rc == 0
    return out


def test_cli_report_has_token_labels_and_patterns(cli_report, text_model_dir):
    root, model, tok = text_model_dir
    html = (cli_report / "report.html").read_text()
    assert_self_contained(html)
    assert 'class="hi-settings"' in html and 'class="hi-static"' in html
    data = report_data(html)
    # the patterns: every head (all fit the budget), most important first, on the prompts' tokens
    import pandas as pd

    frame = pd.read_csv(cli_report / "scan.csv")
    lines = [json.loads(line)["text"] for line in (root / "p.jsonl").read_text().splitlines()]
    assert len(frame) == 2 * 2 * len(tok(lines[0])["input_ids"])
    shown = data["patterns"]["heads"]
    assert sorted(shown) == ["L0H0", "L0H1", "L1H0", "L1H1"] and data["patterns"]["left_out"] == []
    assert [e["tokens"] for e in data["patterns"]["examples"]] == [headint.to_str_tokens(tok, tok(t)["input_ids"]) for t in lines]
    frame["abs"] = (frame["value"] - json.loads((cli_report / "settings.json").read_text())["clean_baseline"]).abs()
    best = frame.sort_values("abs", ascending=False, kind="stable").iloc[0]
    assert shown[0] == f"L{int(best['layer'])}H{int(best['head'])}"
    assert data["scans"][0]["tokens"] == headint.to_str_tokens(tok, tok(lines[0])["input_ids"])
    # the exact values behind the report equal the hook oracle
    from headint.prompts import load_prompts

    clean, corrupt = load_prompts(root / "p.jsonl", tok), load_prompts(root / "c.jsonl", tok)
    corrupt["target"], corrupt["contrast"] = clean["target"], clean["contrast"]
    expected = oracle_scan(model, clean, "logit_diff", method="patch", corrupt=corrupt, per_position=True).double().mean(-1)
    got = torch.tensor(frame.sort_values(["layer", "head", "position"])["value"].to_numpy()).view(expected.shape)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_head_patterns_are_the_models_attention(text_model_dir):
    """The pattern view equals eager attention's probabilities (output_attentions) of one prompt."""
    from headint.pattern_views import head_patterns

    _, model, tok = text_model_dir
    ids = torch.tensor(tok("When Mary and John went out")["input_ids"])
    got = head_patterns(model, ids, [(0, 1), (1, 0)], backend="reference")
    import copy

    from transformers import GPT2LMHeadModel

    cfg = copy.deepcopy(model.config)
    cfg._attn_implementation = "eager"
    eager = GPT2LMHeadModel(cfg).eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        att = eager(ids[None], output_attentions=True).attentions
    for (l, h), p in got.items():
        assert p.shape == (len(ids), len(ids))
        torch.testing.assert_close(p, att[l][0, h].float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[T\] token ids of one example"):
        head_patterns(model, ids[None], [(0, 0)])




# ---------------------------------------------------------------------- a real browser
#
# Playwright for Python drives Debian's Chromium (never a browser of Playwright's own): one
# browser for the module, a fresh page per report. Every page records its console messages,
# page errors, requests and dialogs; a test passes only if the report made none of them.

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (.ci/run installs Debian's 'chromium'; it could not be installed here)")


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (it is in the test extra: pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A page of ``browser`` with what it logged: ``console``, ``errors``, ``requests``, ``dialogs``."""

    def __init__(self, browser, width: int = 1280, height: int = 900):
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.console, self.errors, self.requests, self.dialogs = [], [], [], []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def open(self, path: Path, rendered: int = 1) -> "Page":
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)
        self.page.wait_for_function(f"document.querySelectorAll('.hi-report[data-hi-rendered]').length === {rendered}",
                                    timeout=10_000)
        return self

    def tip(self) -> str:
        return self.page.inner_text(".hi-tip")

    def clean(self) -> None:
        """The report logged nothing, raised nothing, fetched nothing but itself, opened no dialog."""
        assert self.console == [] and self.errors == [] and self.dialogs == [], (self.console, self.errors, self.dialogs)
        assert all(u == self.url or u.startswith("data:") for u in self.requests), self.requests
        self.page.close()


def test_browser_check_catches_errors(browser, tmp_path):
    """The page check can fail: a console error, a script error, a dialog and a request for a
    resource outside the file are all seen."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img alt="x" src="http://127.0.0.1:9/x.png">'
                   '<script>console.error("boom"); alert("hi"); missingFunction();</script></body></html>')
    page = Page(browser)
    page.page.goto(bad.resolve().as_uri())
    page.page.wait_for_timeout(200)
    assert any("boom" in line for line in page.console)
    assert any("missingFunction is not defined" in e for e in page.errors)
    assert page.dialogs == ["hi"] and any(u.startswith("http://127.0.0.1:9/") for u in page.requests)
    page.page.close()


LAB_PROMPTS = [("When Mary and John went out, John gave it to", " Mary", " John"),
               ("When John and Mary went out, Mary gave it to", " John", " Mary"),
               ("When Mary and John met, John said hi to", " Mary", " John"),
               ("When John and Mary met, Mary said hi to", " John", " Mary")]


@pytest.fixture(scope="module")
def lab(text_model_dir, tmp_path_factory):
    """A report as a researcher writes it from the API: a mean-ablation scan of a real (tiny) model
    with a patching scan as a column, the pair chart, pattern scores and roles, the attention
    patterns of every head on two prompts and a circuit graph."""
    from headint.integration.structure import model_shape
    from headint.pattern_views import example_patterns, report_heads
    from headint.patterns import previous_token_scores
    from headint.scans import all_pairs

    root, model, tok = text_model_dir
    out = tmp_path_factory.mktemp("lab")
    clean_ids = [tok(t)["input_ids"] for t, _, _ in LAB_PROMPTS]
    corrupt_ids = [clean_ids[i ^ 1] for i in range(len(clean_ids))]
    T = min(len(i) for i in clean_ids + corrupt_ids)
    target = torch.tensor([tok(t)["input_ids"][0] for _, t, _ in LAB_PROMPTS])
    contrast = torch.tensor([tok(c)["input_ids"][0] for _, _, c in LAB_PROMPTS])
    clean = {"input_ids": torch.tensor([i[:T] for i in clean_ids]), "target": target, "contrast": contrast}
    corrupt = {"input_ids": torch.tensor([i[:T] for i in corrupt_ids]), "target": target, "contrast": contrast}
    common = dict(corrupt=corrupt, backend="reference", progress=False)
    mean = headint.scan(model, clean, "logit_diff", method="mean", **common)
    patch = headint.scan(model, clean, "logit_diff", method="patch", direction="noising", **common)
    pairs = headint.scan(model, clean, "logit_diff", method="mean", head_sets=all_pairs(model_shape(model)), **common)
    examples = [clean["input_ids"][0], clean["input_ids"][1]]
    patterns = example_patterns(model, examples, report_heads(mean, [T, T]), backend="reference")
    tokens = [headint.to_str_tokens(tok, ids) for ids in examples]
    prev = previous_token_scores(model, clean["input_ids"])
    roles = {(l, h): "previous-token" if prev[l, h] > 0.3 else "-" for l in range(2) for h in range(2)}
    circuit = circuit_graph(["input", "L0H0", "L0H1", "L1H0", "L1H1", "logits"],
                            [("input", "L0H0", 0.4), ("L0H0", "L1H0", -0.8, "k"), ("L1H0", "logits", 1.5),
                             ("L0H1", "logits", 0.25)], title="Circuit (hand-made for the test)", weight_label="edge score")
    path = mean.to_html(out / "lab.html", patterns=patterns, pattern_tokens=tokens, title="lab notebook: mean ablation",
                        related=[RelatedScan("Activation patching (noising)", patch, column="patch effect"),
                                 RelatedScan("Pairs of heads", pairs, singles=mean)],
                        head_columns={"prev-tok": prev, "role": roles}, circuit=circuit,
                        figures=[("the same scan as a PNG (ScanResult.heatmap)", mean.heatmap())])
    return dict(path=path, mean=mean, patch=patch, pairs=pairs, patterns=patterns, tokens=tokens, circuit=circuit)


def _head_order(page, scope="") -> list[str]:
    return page.page.eval_on_selector_all(f"{scope} .hi-table tbody tr", "rows => rows.map(r => r.getAttribute('data-head'))")


def test_report_hover_click_sort(browser, lab):
    """Hover a heatmap cell: the tooltip shows its effect +- stderr and n as the result has them;
    click a head: its patterns appear; hover a token: where it attends; sort and filter the table."""
    mean = lab["mean"]
    html = lab["path"].read_text()
    assert_self_contained(html)
    page = Page(browser).open(lab["path"])
    p = page.page
    d = decimals_for(mean.effect.reshape(-1).tolist())
    for l, h in [(0, 0), (1, 1)]:
        p.hover(f'[data-scan="main"] rect[data-cell="L{l}H{h}"]')
        tip = page.tip()
        eff, se = float(mean.effect[l, h]), float(mean.effect_stderr[l, h])
        assert tip.startswith(f"L{l}H{h}\n"), tip
        assert f"effect {format_number(eff, d)} \u00b1 {format_number(se, d)}" in tip and "n = 4 examples" in tip, tip
    # click a head: the pattern view shows it, on example 1 of 2, with the prompt's tokens
    p.click('[data-scan="main"] rect[data-cell="L1H0"]')
    assert p.get_attribute(".hi-report", "data-selected") == "L1H0"
    assert p.inner_text(".hi-pattern-title").startswith("L1H0, example 1 of 2")
    strip = p.eval_on_selector_all(".hi-tokens .hi-tok", "s => s.map(x => x.textContent)")
    assert strip == [t.replace(" ", "\u2423") for t in lab["tokens"][0]]
    T = len(strip)
    assert p.eval_on_selector_all(".hi-pattern-matrix rect[data-i]", "r => r.length") == T * T
    assert p.get_attribute('.hi-table tbody tr.hi-selected', "data-head") == "L1H0"
    # hover a token: the tokens it attends to are shaded; the caption names the largest weights
    att = lab["patterns"][0][(1, 0)]
    q = T - 1
    p.hover(f'.hi-tokens .hi-tok[data-pos="{q}"]')
    info = p.inner_text(".hi-attends")
    m = re.match(rf"\u201c{re.escape(strip[q])}\u201d \(position {q}\) attends to: \u201c(.*?)\u201d \((\d+)\) (\d\.\d\d\d), ", info)
    assert m, info
    k = int(m.group(2))  # the largest weight (up to the report's 1e-4 resolution; ties may go either way)
    assert m.group(1) == strip[k] and abs(float(att[q, k] - att[q].max())) <= 1e-4 and m.group(3) == f"{round(float(att[q, k]) * 10000) / 10000:.3f}"
    q = 2  # causal: nothing after the query is attended to
    p.hover(f'.hi-tokens .hi-tok[data-pos="{q}"]')
    shades = p.eval_on_selector_all(".hi-tokens .hi-tok", "s => s.map(x => getComputedStyle(x).backgroundColor)")
    assert all(c == "rgb(247, 251, 255)" for c in shades[q + 1:]) and len(set(shades[: q + 1])) > 1, shades
    p.hover('.hi-pattern-matrix rect[data-i="0"]')
    assert page.tip() == f"L1H0: query 0 \u201c{strip[0]}\u201d \u2192 key 0 \u201c{strip[0]}\u201d\nattention 1.000"
    # the second example
    p.click('.hi-patterns button[data-example="1"]')
    assert p.inner_text(".hi-pattern-title").startswith("L1H0, example 2 of 2")
    assert p.eval_on_selector_all(".hi-tokens .hi-tok", "s => s.map(x => x.textContent)") == [
        t.replace(" ", "\u2423") for t in lab["tokens"][1]]
    # the table: ranked by |effect|; click "effect" sorts descending, again ascending; filter
    top = [f"L{l}H{h}" for l, h in zip(mean.top(4)["layer"], mean.top(4)["head"])]
    assert _head_order(page) == top
    assert "showing 4 of 4 rows" in p.inner_text(".hi-count")
    eff = {f"L{l}H{h}": float(mean.effect[l, h]) for l in range(2) for h in range(2)}
    p.click('.hi-table th[data-col="effect"]')
    assert _head_order(page) == sorted(eff, key=lambda n: -eff[n])
    assert p.get_attribute('.hi-table th[data-col="effect"]', "aria-sort") == "descending"
    p.click('.hi-table th[data-col="effect"]')
    assert _head_order(page) == sorted(eff, key=lambda n: eff[n])
    cols = p.eval_on_selector_all(".hi-table thead th", "t => t.map(x => x.getAttribute('data-col'))")
    labels = p.eval_on_selector_all(".hi-table thead th", "t => t.map(x => x.firstChild.textContent)")
    assert labels[-3:] == ["patch effect", "prev-tok", "role"], labels
    p.fill(".hi-heads input[type=search]", "L1")
    assert sorted(_head_order(page)) == ["L1H0", "L1H1"]
    assert "showing 2 of 2 rows matching the filter (4 in all)" in p.inner_text(".hi-count")
    p.fill(".hi-heads input[type=search]", "")
    # the patch-effect column holds the related scan's effect
    patch_col = cols.index("related_0")
    cells = p.eval_on_selector_all(".hi-table tbody tr", f"rows => rows.map(r => [r.getAttribute('data-head'), r.children[{patch_col}].textContent])")
    dp = decimals_for(lab["patch"].effect.reshape(-1).tolist())
    for head, text in cells:
        l, h = int(head[1]), int(head[3])
        assert text == format_number(float(lab["patch"].effect[l, h]), dp)
    # clicking a table row selects the head everywhere
    p.click('.hi-table tbody tr[data-head="L0H1"]')
    assert p.inner_text(".hi-pattern-title").startswith("L0H1, example 2 of 2")
    box = p.get_attribute('[data-scan="main"] .hi-selbox', "visibility")
    assert box == "visible"
    # a static figure decodes (the file's policy allows data: images)
    assert p.eval_on_selector_all(".hi-figures img", "i => i.map(x => x.complete && x.naturalWidth > 0)") == [True]
    SHOTS.mkdir(exist_ok=True)
    p.click('[data-scan="main"] rect[data-cell="L1H0"]')
    p.click('.hi-patterns button[data-example="0"]')
    p.hover(f'.hi-tokens .hi-tok[data-pos="{T - 1}"]')
    png = p.screenshot(path=str(SHOTS / "report.png"), full_page=True)
    assert png[:8] == PNG_MAGIC and struct.unpack(">I", png[16:20])[0] == 1280
    page.clean()


def test_pair_chart_and_circuit(browser, lab):
    """The pair chart lists the pairs sorted by |joint effect| (or by interaction, chosen); the
    circuit graph draws every node and edge, hovering an edge shows its weight, clicking a head
    node selects the head."""
    frame = pair_frame(lab["pairs"], lab["mean"])
    page = Page(browser).open(lab["path"])
    p = page.page
    sec = '[data-scan="related-1"]'
    shown = p.eval_on_selector_all(f"{sec} .hi-bar", "b => b.map(x => x.getAttribute('data-set'))")
    by_effect = frame.assign(a=frame["effect"].abs()).sort_values("a", ascending=False, kind="stable")
    assert shown == list(by_effect["head_set"])
    assert p.inner_text(f"{sec} .hi-caption >> nth=1").startswith(f"All {len(frame)} pairs, sorted by |joint effect|")
    first = by_effect.iloc[0]
    p.hover(f'{sec} .hi-bar[data-set="{first["head_set"]}"]')
    d = decimals_for(list(frame["effect"]) + list(frame["singles_sum"]))
    assert f"together {format_number(first['effect'], d)} \u00b1 {format_number(first['effect_stderr'], d)}" in page.tip()
    p.select_option(f"{sec} select", "inter")
    shown = p.eval_on_selector_all(f"{sec} .hi-bar", "b => b.map(x => x.getAttribute('data-set'))")
    assert shown == list(frame.sort_values("interaction", kind="stable")["head_set"])
    # the related heatmap: its own values
    patch = lab["patch"]
    p.hover('[data-scan="related-0"] rect[data-cell="L0H1"]')
    dp = decimals_for(patch.effect.reshape(-1).tolist())
    assert f"effect {format_number(float(patch.effect[0, 1]), dp)}" in page.tip()
    # the circuit
    c = lab["circuit"]
    assert p.eval_on_selector_all(".hi-circuit .hi-node", "n => n.length") == len(c.nodes)
    assert p.eval_on_selector_all(".hi-circuit .hi-edge", "e => e.length") == len(c.edges)
    e = c.edges[1]
    edge = f'.hi-circuit .hi-edge[data-edge="{e.source}->{e.target}"]'
    p.locator(edge).scroll_into_view_if_needed()
    x, y = p.eval_on_selector(edge + " path", """el => { const pt = el.getPointAtLength(el.getTotalLength() / 2), m = el.getScreenCTM();
                                                      return [pt.x * m.a + pt.y * m.c + m.e, pt.x * m.b + pt.y * m.d + m.f]; }""")
    p.mouse.move(x, y)  # onto the middle of the line, as a reader would
    assert page.tip() == f"{e.source} \u2192 {e.target} (k)\nedge score -0.800"
    p.click(f'.hi-circuit .hi-node[data-node="{e.target}"]')
    assert p.get_attribute(".hi-report", "data-selected") == e.target
    assert p.inner_text(".hi-circuit .hi-caption").startswith("All 4 edges with the largest |edge score|")
    page.clean()


def test_cli_report_in_browser(browser, cli_report):
    """The CLI's per-position report: token-labelled heatmap, hover values as in scan.csv, patterns
    on the prompts, a table of every cell of which the top --top rows show first ("show all")."""
    import pandas as pd

    frame = pd.read_csv(cli_report / "scan.csv")
    settings = json.loads((cli_report / "settings.json").read_text())
    base = settings[f"{settings['effect_reference']}_baseline"]  # denoising (the default): the corrupt run
    page = Page(browser).open(cli_report / "report.html")
    p = page.page
    data = report_data((cli_report / "report.html").read_text())
    tokens = data["scans"][0]["tokens"]
    labels = p.eval_on_selector_all('[data-scan="main"] svg text', "t => t.map(x => x.textContent)")
    assert f"1 {tokens[1].replace(' ', chr(0x2423))}" in labels and "L1H1" in labels
    row = frame.iloc[7]
    l, h, pos = int(row["layer"]), int(row["head"]), int(row["position"])
    p.hover(f'[data-scan="main"] rect[data-cell="L{l}H{h}:{pos}"]')
    assert settings["effect_reference"] == "corrupt"
    d = decimals_for((frame["value"] - base).tolist())
    tip = page.tip()
    assert tip.startswith(f"L{l}H{h} position {pos} \u201c{tokens[pos].replace(' ', chr(0x2423))}\u201d")
    assert f"effect {format_number(row['value'] - base, d)}" in tip, tip
    n_rows = len(frame)
    shown = len(_head_order(page))
    top = data["table"]["top"]
    assert shown == top < n_rows and f"showing {top} of {n_rows} rows" in p.inner_text(".hi-count")
    p.click(".hi-heads button")
    assert len(_head_order(page)) == n_rows and f"showing {n_rows} of {n_rows} rows" in p.inner_text(".hi-count")
    p.click('[data-scan="main"] rect[data-cell="L0H1:3"]')
    assert p.inner_text(".hi-pattern-title").startswith("L0H1, example 1 of 2")
    p.screenshot(path=str(SHOTS / "cli-report.png"), full_page=True)
    page.clean()


HOSTILE = ["</script><script>window.__pwned = 1</script>", '<img src=x onerror="window.__pwned = 2">', "<!--", "-->",
           '"; window.__pwned = 3; "', "\u2028x\u2029", "]]>", "&lt;b&gt;"]


def test_hostile_strings_run_no_script(browser, tmp_path):
    """Tokens, title, metric name, settings, warnings, head-table strings, captions and circuit
    labels full of markup are shown as text; no injected script runs; the data block cannot be
    closed early."""
    tokens = HOSTILE
    P = len(tokens)
    g = torch.Generator().manual_seed(0)
    r = ScanResult(torch.randn(2, 2, P, 3, generator=g), ("layer", "head", "position"), metric_name=HOSTILE[1],
                   clean_baseline=0.0, base_per_example=torch.zeros(3), settings={"model": HOSTILE[0], "prompts": HOSTILE[2]})
    pat = torch.softmax(torch.randn(P, P, generator=g), -1)
    flat = ScanResult(torch.randn(2, 2, 3, generator=g), ("layer", "head"), metric_name=HOSTILE[4], clean_baseline=0.0)
    circuit = circuit_graph([{"name": HOSTILE[0], "layer": 0, "label": HOSTILE[1]}, "logits"], [(HOSTILE[0], "logits", 1.0, HOSTILE[2])],
                            title=HOSTILE[3], weight_label=HOSTILE[5])
    path = r.to_html(tmp_path / "hostile.html", tokens=tokens, patterns={(0, 0): pat}, pattern_tokens=tokens, title=HOSTILE[0],
                     warnings=[HOSTILE[1]], related=[RelatedScan(HOSTILE[1], flat)],
                     head_columns={HOSTILE[0]: {(0, 0): HOSTILE[1], (1, 1): HOSTILE[0]}}, circuit=circuit)
    html = path.read_text()
    assert_self_contained(html)  # two scripts, the data block cannot be closed, CSP allows only the viewer
    assert "window.__pwned = 1</script>" not in html and "<img src=x" not in html
    assert report_data(html)["scans"][0]["tokens"] == tokens
    page = Page(browser).open(path)
    p = page.page
    assert p.evaluate("typeof window.__pwned") == "undefined"
    assert p.title() == HOSTILE[0] and p.inner_text(".hi-title") == HOSTILE[0]
    assert p.eval_on_selector_all(".hi-tokens .hi-tok", "s => s.map(x => x.textContent)") == [
        t.replace(" ", "\u2423") for t in tokens]
    assert p.eval_on_selector_all(".hi-report img", "i => i.length") == 0
    p.hover('[data-scan="main"] rect[data-cell="L0H0:0"]')
    assert page.tip().startswith("L0H0 position 0 \u201c</script><script>window.__pwned\u2423=\u24231</script>\u201d")
    for t in range(P):
        p.hover(f'.hi-tokens .hi-tok[data-pos="{t}"]')
    assert HOSTILE[1] in p.inner_text(".hi-table") and HOSTILE[1][:13] + "\u2026" in p.inner_text(".hi-circuit")
    p.locator(".hi-circuit .hi-node").first.hover()
    assert page.tip().startswith(f"{HOSTILE[1]} ({HOSTILE[0]})\nother, layer 0")
    assert p.evaluate("typeof window.__pwned") == "undefined"
    page.clean()


def test_two_notebook_outputs_work_side_by_side(browser, tmp_path):
    """Two ``_repr_html_`` outputs in one page, inserted as JupyterLab inserts output HTML
    (innerHTML, then each script re-created so it runs): both render, no id is shared, and a click
    in one selects nothing in the other."""
    a = _result(("layer", "head"), (2, 3), seed=1)
    b = _pairs_and_singles()[0]  # a head-set scan: bars
    host = tmp_path / "notebook.html"
    host.write_text("""<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>
<div class="jp-OutputArea-output" id="out-1"></div><div class="jp-OutputArea-output" id="out-2"></div>
<script type="application/json" id="outputs">""" + script_json([a._repr_html_(), b._repr_html_()]) + """</script>
<script>
JSON.parse(document.getElementById("outputs").textContent).forEach(function (html, i) {
  var host = document.getElementById("out-" + (i + 1));
  host.innerHTML = html;  /* scripts inserted this way do not run; JupyterLab re-creates them */
  Array.prototype.forEach.call(host.querySelectorAll("script"), function (old) {
    var s = document.createElement("script");
    Array.prototype.forEach.call(old.attributes, function (at) { s.setAttribute(at.name, at.value); });
    s.textContent = old.textContent;
    old.parentNode.replaceChild(s, old);
  });
});
</script></body></html>""")
    page = Page(browser).open(host, rendered=2)
    p = page.page
    ids = p.eval_on_selector_all("[id]", "e => e.map(x => x.id)")
    assert len(ids) == len(set(ids))
    assert p.eval_on_selector_all(".hi-static", "e => e.map(x => getComputedStyle(x).display)") == ["none", "none"]
    first, second = "#out-1 .hi-report", "#out-2 .hi-report"
    start = [p.get_attribute(first, "data-selected"), p.get_attribute(second, "data-selected")]
    assert start[0] != "L0H1"
    p.click('#out-2 .hi-bar[data-set="L0H1+L1H0"]')
    assert p.get_attribute(second, "data-selected") == "L0H1" and p.get_attribute(first, "data-selected") == start[0]
    p.hover('#out-2 .hi-bar[data-set="L0H0+L1H1"]')
    d = decimals_for(b.effect.tolist())
    assert p.inner_text("#out-2 .hi-tip").startswith(f"L0H0+L1H1\neffect {format_number(float(b.effect[1]), d)}")
    p.hover(f'#out-1 [data-scan="main"] rect[data-cell="L1H2"]')
    d = decimals_for(a.effect.reshape(-1).tolist())
    assert f"effect {format_number(float(a.effect[1, 2]), d)}" in p.inner_text("#out-1 .hi-tip")
    assert p.eval_on_selector_all("#out-1 .hi-table tbody tr", "r => r.length") == 6
    assert p.eval_on_selector_all("#out-2 .hi-table tbody tr", "r => r.length") == 3
    SHOTS.mkdir(exist_ok=True)
    p.screenshot(path=str(SHOTS / "notebook.png"), full_page=True)
    page.clean()


# ---------------------------------------------------------------------- edge-level circuits (headint.circuits)


@pytest.fixture(scope="module")
def gqa_circuit(tmp_path_factory):
    """EAP on a tiny grouped-query Llama (4 query heads, 2 key/value heads): its circuit's own
    report, and a scan's report of the same model with the circuit in it."""
    import tiny_models as tm

    from headint import circuits

    torch.manual_seed(0)
    model = tm.FACTORIES["llama"]().model
    g = torch.Generator().manual_seed(1)
    ids, cor = torch.randint(3, tm.VOCAB, (3, 7), generator=g), torch.randint(3, tm.VOCAB, (3, 7), generator=g)
    clean = {"input_ids": ids, "target": ids[:, 0], "contrast": ids[:, 1]}
    corrupt = {"input_ids": cor, "target": ids[:, 0], "contrast": ids[:, 1]}
    result = circuits.attribute(model, clean, corrupt, method="eap")
    circuit = result.circuit(top_n=25)  # 25 edges connected to the logits, grouped key/value receivers among them
    out = tmp_path_factory.mktemp("circuit-report")
    scan = headint.scan(model, clean, "logit_diff", method="patch", corrupt=corrupt, backend="reference", progress=False)
    return dict(result=result, circuit=circuit, own=Path(circuit.to_html(out / "circuit.html") and out / "circuit.html"),
                scan=scan.to_html(out / "scan.html", circuit=circuit))


def test_circuit_result_report_in_browser(browser, gqa_circuit):
    """A CircuitResult's own report: every edge of the circuit drawn once, hovering one shows its
    edge name and score as the result has it, the grouped key/value nodes show the heads they
    serve, the edge list is ranked by |score|; no scan, no error, nothing fetched."""
    c = gqa_circuit["circuit"]
    html = gqa_circuit["own"].read_text()
    assert_self_contained(html)
    graph = c.to_circuit_graph()
    page = Page(browser).open(gqa_circuit["own"])
    p = page.page
    assert p.eval_on_selector_all(".hi-heatmap, .hi-table", "e => e.length") == 0  # the circuit alone
    assert p.eval_on_selector(".hi-static", "e => getComputedStyle(e).display") == "none"
    drawn = p.eval_on_selector_all(".hi-circuit .hi-edge", "e => e.map(x => x.getAttribute('data-edge'))")
    assert len(drawn) == len(c.circuit_edges) == len(graph.edges)
    assert sorted(f"{e.source}->{e.target}" + (f"<{e.kind}>" if e.kind else "") for e in graph.edges) == sorted(c.circuit_edges)
    assert p.eval_on_selector_all(".hi-circuit .hi-node", "n => n.length") == len(graph.nodes)
    frame = c.to_frame().set_index("edge")
    dec = decimals_for([e.weight for e in graph.edges])
    p.locator(".hi-circuit svg").scroll_into_view_if_needed()
    hovered = 0
    for i, e in enumerate(graph.edges):  # onto a point of each line where no other line lies above it, as a reader would
        xy = p.eval_on_selector(f'.hi-circuit .hi-edge[data-i="{i}"] path', """el => {
            const m = el.getScreenCTM(), L = el.getTotalLength(), g = el.closest(".hi-edge");
            for (let f = 0.5; f < 0.95; f += 0.05) for (const a of [f, 1 - f]) {
                const pt = el.getPointAtLength(a * L), x = pt.x * m.a + pt.y * m.c + m.e, y = pt.x * m.b + pt.y * m.d + m.f;
                const hit = document.elementFromPoint(x, y);
                if (hit && hit.closest(".hi-edge") === g) return [x, y];
            }
            return null; }""")
        if xy is None:  # wholly covered by other lines and nodes
            continue
        p.mouse.move(*xy)
        name = f"{e.source}->{e.target}" + (f"<{e.kind}>" if e.kind else "")
        kind = f" ({e.kind})" if e.kind else ""
        assert page.tip() == f"{e.source} \u2192 {e.target}{kind}\neap score {format_number(frame.loc[name, 'score'], dec)}"
        hovered += 1
    assert hovered >= len(graph.edges) // 2
    kv = [n for n in graph.nodes if ".kv" in n.name]
    assert kv, "the circuit has no grouped key/value receiver; pick another seed"
    p.hover(f'.hi-circuit .hi-node[data-node="{kv[0].name}"]')
    g = int(kv[0].name.split(".kv")[1])
    assert page.tip().startswith(f"{kv[0].name} (h{2 * g}-{2 * g + 1}) ({kv[0].name})\nother, layer {kv[0].layer}")
    listed = p.eval_on_selector_all(".hi-circuit .hi-edges tbody tr td:last-child", "t => t.map(x => x.textContent)")
    ranked = sorted((e.weight for e in graph.edges), key=abs, reverse=True)[:20]
    assert listed == [format_number(w, dec) for w in ranked]
    assert f"the circuit: {len(c.circuit_edges)} of {c.graph.n_edges} edges" in p.inner_text(".hi-circuit")
    SHOTS.mkdir(exist_ok=True)
    p.screenshot(path=str(SHOTS / "circuit-report.png"), full_page=True)
    page.clean()


def test_circuit_in_a_scan_report_selects_heads(browser, gqa_circuit):
    """A CircuitResult in a scan's report: clicking head node a{l}.h{h} selects L{l}H{h} in the
    scan (heatmap, head table); selecting a head in the heatmap marks its node in the circuit."""
    graph = gqa_circuit["circuit"].to_circuit_graph()
    assert report_data(gqa_circuit["scan"].read_text())["circuit"] == graph.to_json()
    page = Page(browser).open(gqa_circuit["scan"])
    p = page.page
    head = next(n for n in graph.nodes if n.kind == "head")
    l, h = head.name[1:].split(".h")
    p.click(f'.hi-circuit .hi-node[data-node="{head.name}"]')
    assert p.get_attribute(".hi-report", "data-selected") == f"L{l}H{h}"
    assert p.get_attribute(f'.hi-circuit .hi-node[data-node="{head.name}"]', "class") == "hi-node hi-selected"
    assert p.eval_on_selector_all(".hi-circuit .hi-node.hi-selected", "n => n.length") == 1
    other = next((f"L{x}H{y}", f"a{x}.h{y}") for x in range(2) for y in range(4) if f"a{x}.h{y}" != head.name)
    p.click(f'[data-scan="main"] rect[data-cell="{other[0]}"]')
    assert p.get_attribute(".hi-report", "data-selected") == other[0]
    marked = p.eval_on_selector_all(".hi-circuit .hi-node.hi-selected", "n => n.map(x => x.getAttribute('data-node'))")
    assert marked == ([other[1]] if any(n.name == other[1] for n in graph.nodes) else [])
    page.clean()


def test_circuit_report_hostile_strings(browser, tmp_path):
    """A CircuitResult's settings, metric name and title full of markup are text; no script runs."""
    from headint import circuits
    from headint.circuits.graph import EdgeGraph

    graph = EdgeGraph(1, 2, 2, [True], [False])
    r = circuits.CircuitResult(graph, torch.linspace(-1, 1, graph.n_edges), method="eap", metric_name=HOSTILE[1],
                               settings={"model": HOSTILE[0], "prompts": HOSTILE[4]}).circuit(top_n=3)
    page_text = r.to_html(tmp_path / "h.html", title=HOSTILE[0])
    assert_self_contained(page_text)
    assert "window.__pwned = 1</script>" not in page_text and "<img src=x" not in page_text
    page = Page(browser).open(tmp_path / "h.html")
    p = page.page
    assert p.evaluate("typeof window.__pwned") == "undefined"
    assert p.title() == HOSTILE[0] and p.inner_text(".hi-title") == HOSTILE[0]
    assert HOSTILE[0] in p.inner_text(".hi-settings") and HOSTILE[1] in p.inner_text(".hi-circuit")
    page.clean()
