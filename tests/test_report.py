"""Token labels, plot titles, the pair chart's data and the HTML report (Python API and CLI),
and the report rendered by a real headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import headint
from headint.cli import main
from headint.results import ScanResult
from headint.results.pairs import pair_frame
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


def _data_images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _assert_self_contained(html: str):
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", html), "a resource outside the file"
    assert "http://" not in html and "https://" not in html and "<script" not in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(png[:8] == PNG_MAGIC for png in _data_images(html))


def test_to_html_sections_and_repr(tmp_path):
    r = _result(settings={"method": "patch", "direction": "noising", "kind": "exact", "model": "M<script>"})
    tokens = ["When", " Mary", " met", " <John>"]
    patterns = {(1, 2): torch.softmax(torch.randn(4, 4), -1), (0, 0): np.eye(4)}
    path = r.to_html(tmp_path / "r.html", tokens=tokens, patterns=patterns, pattern_tokens=tokens, top=3,
                     warnings=["gap within noise"])
    html = path.read_text()
    _assert_self_contained(html)
    for section in ("settings", "heatmap", "top-heads", "patterns", "pattern-L1H2", "pattern-L0H0"):
        assert f'id="{section}"' in html, section
    assert len(_data_images(html)) == 3  # heatmap + two patterns
    assert "M&lt;script&gt;" in html  # text is escaped
    assert "warning: gap within noise" in html
    top = r.top(3)
    body = html.split('id="top-heads"')[1]
    assert body.count("<tr>") == 4  # header + 3 rows
    first = top.iloc[0]
    assert f"<td>{float(first['effect']):.4g}</td><td>{float(first['effect_stderr']):.4g}</td>" in body
    view = r._repr_html_()
    assert view.count("<tr>") == 11 and "method patch, direction noising, N=5" in view and "<img" not in view
    with pytest.raises(ValueError, match=r"patterns\[\(0, 0\)\] must be \[Tq, Tk\]"):
        r.to_html(tmp_path / "x.html", patterns={(0, 0): np.zeros((1, 4, 4))})
    with pytest.raises(ValueError, match="pattern_tokens has 2 entries"):
        r.to_html(tmp_path / "x.html", patterns={(0, 0): np.eye(4)}, pattern_tokens=["a", "b"])
    assert not (tmp_path / "x.html").exists()


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
    _assert_self_contained(html)
    for section in ("settings", "heatmap", "top-heads", "patterns"):
        assert f'id="{section}"' in html
    # the pattern images are of the top heads of the scan, over the first prompt's tokens
    import pandas as pd

    frame = pd.read_csv(cli_report / "scan.csv")
    assert len(frame) == 2 * 2 * len(tok(json.loads((root / "p.jsonl").read_text().splitlines()[0])["text"])["input_ids"])
    shown = re.findall(r'id="pattern-(L\d+H\d+)"', html)
    assert 1 <= len(shown) <= 4 and len(set(shown)) == len(shown)
    frame["abs"] = (frame["value"] - json.loads((cli_report / "settings.json").read_text())["clean_baseline"]).abs()
    best = frame.sort_values("abs", ascending=False, kind="stable").iloc[0]
    assert shown[0] == f"L{int(best['layer'])}H{int(best['head'])}"
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

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; });
  var d = document.createElement("div");
  d.id = "headint-probe";
  d.setAttribute("data-images", String(imgs.length));
  d.setAttribute("data-broken", JSON.stringify(broken));
  document.body.appendChild(d);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (.ci/run installs Debian's 'chromium'; it could not be installed here)")


def _browse(html_file: Path, *extra: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, html_file.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)


def render(html_file: Path, tmp: Path) -> dict:
    """Load ``html_file`` (plus a probe script, in a copy) in headless Chromium; returns the
    rendered DOM, the console messages, the images that failed to decode and the image count."""
    probed = tmp / f"probed-{html_file.name}"
    probed.write_text(html_file.read_text().replace("</body>", PROBE + "</body>"))
    proc = _browse(probed, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    probe = re.search(r'<div id="headint-probe" data-images="(\d+)" data-broken="([^"]*)"', proc.stdout)
    assert probe, "the probe did not run: the page did not finish loading"
    broken = json.loads(probe.group(2).replace("&quot;", '"'))
    return {"dom": proc.stdout, "console": console, "broken": broken, "images": int(probe.group(1))}


def screenshot(html_file: Path, png: Path) -> bytes:
    proc = _browse(html_file, f"--screenshot={png}", "--window-size=1200,1600")
    assert proc.returncode == 0 and png.exists(), proc.stderr[-2000:]
    return png.read_bytes()


def test_browser_check_catches_errors_and_broken_images(tmp_path):
    """The browser check can fail: a script error, a console error and an image that does not
    decode are all seen."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img alt="broken" src="data:image/png;base64,AAAA">'
                   '<script>console.error("boom"); missingFunction();</script></body></html>')
    seen = render(bad, tmp_path)
    assert any('"boom"' in line for line in seen["console"])
    assert any("missingFunction is not defined" in line for line in seen["console"])
    assert seen["broken"] == ["broken"] and seen["images"] == 1


def test_report_renders_in_chromium(cli_report, tmp_path):
    """report.html of a CLI scan: renders without console messages, every image decodes, the
    sections are in the rendered DOM; a 1200x1600 screenshot is taken."""
    html_file = cli_report / "report.html"
    seen = render(html_file, tmp_path)
    assert seen["console"] == [], seen["console"]
    assert seen["broken"] == []
    n_patterns = len(re.findall(r'id="pattern-L\d+H\d+"', html_file.read_text()))
    assert seen["images"] == 1 + n_patterns and n_patterns >= 1
    dom = seen["dom"]
    for element in ('id="settings"', 'id="heatmap"', 'id="heatmap-image"', 'id="top-heads"', 'id="patterns"', "<table"):
        assert element in dom, element
    SHOTS.mkdir(exist_ok=True)
    png = screenshot(html_file, SHOTS / "report.png")
    assert png[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1200, 1600)
