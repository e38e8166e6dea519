"""What ``effect`` means, per method and direction, and that every view of a result says the same.

Denoising runs the corrupted inputs with clean activations patched in: its effect is measured
from the corrupt baseline (what patching the head restores). Noising, ablations and path
patching run the clean inputs: their effect is measured from the clean baseline. The effect's
paired standard error pairs each example with the same base run. Checked by hand arithmetic on
small results and, on the embedded induction model, by the ranking of the known circuit.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import headint
from headint.results import ScanResult
from headint.results.settings import ScanSettings, effect_definition
from report_checks import report_data

CIRCUIT = {(0, 0), (1, 3), (1, 2), (1, 0), (0, 1)}  # previous-token L0H0, L0H1; induction L1H3, L1H2, L1H0


def _result(direction, method="patch", normalized=False, **kw):
    g = torch.Generator().manual_seed(0)
    clean_v = 10 + torch.randn(6, generator=g, dtype=torch.float64)
    corrupt_v = torch.randn(6, generator=g, dtype=torch.float64)
    base = corrupt_v if direction == "denoising" else clean_v
    per_example = base[None, None, :] + torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    settings = {"kind": "exact", "method": method, "direction": direction}
    r = ScanResult(per_example, metric_name="logit_diff", clean_baseline=float(clean_v.mean()),
                   corrupt_baseline=float(corrupt_v.mean()), settings=settings, base_per_example=base, **kw)
    return r, clean_v, corrupt_v


def test_denoising_effect_is_measured_from_the_corrupt_run():
    r, clean_v, corrupt_v = _result("denoising")
    assert r.reference == "corrupt" and r.settings.reference == "corrupt"
    assert r.reference_baseline == pytest.approx(float(corrupt_v.mean()))
    torch.testing.assert_close(r.effect, r.values - corrupt_v.mean())
    diff = r.per_example - corrupt_v  # paired with the corrupt run, the run the patches were applied to
    torch.testing.assert_close(r.effect_stderr, diff.std(-1) / 6 ** 0.5)
    frame = r.to_frame()
    torch.testing.assert_close(torch.tensor(frame["effect"].to_numpy()).view(2, 3), r.effect)


@pytest.mark.parametrize("method,direction", [("patch", "noising"), ("zero", None), ("mean", None), ("resample", None)])
def test_noising_and_ablation_effects_are_measured_from_the_clean_run(method, direction):
    r, clean_v, _ = _result(direction, method=method)
    assert r.reference == "clean"
    torch.testing.assert_close(r.effect, r.values - clean_v.mean())
    torch.testing.assert_close(r.effect_stderr, (r.per_example - clean_v).std(-1) / 6 ** 0.5)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_normalized_effects_keep_their_base_run(direction):
    r, clean_v, corrupt_v = _result(direction)
    n = r.normalized_result()
    c, x = float(clean_v.mean()), float(corrupt_v.mean())
    fraction = (r.values - x) / (c - x)  # 0 = corrupt, 1 = clean
    torch.testing.assert_close(n.values, fraction)
    if direction == "denoising":  # the fraction of the gap the head restores
        torch.testing.assert_close(n.effect, fraction)
    else:  # minus the fraction it destroys
        torch.testing.assert_close(n.effect, fraction - 1)
    torch.testing.assert_close(n.effect_stderr, r.effect_stderr / abs(c - x))
    assert n.effect_definition == effect_definition(n.settings, True)
    assert ("restores" if direction == "denoising" else "destroys") in n.effect_definition


def test_effect_needs_the_reference_baseline():
    r = ScanResult(torch.zeros(2, 3, 4), clean_baseline=1.0, settings={"method": "patch", "direction": "denoising"})
    assert not r.has_baseline
    with pytest.raises(ValueError, match="corrupt baseline"):
        r.effect
    assert "effect" not in r.to_frame().columns and "effect" not in r.top(2).columns


def test_settings_vocabulary_is_checked():
    with pytest.raises(ValueError, match="settings\\['direction'\\]"):
        ScanResult(torch.zeros(2, 3, 4), settings={"method": "patch", "direction": "denoisng"})
    with pytest.raises(ValueError, match="applies to method 'patch' only"):
        ScanResult(torch.zeros(2, 3, 4), settings={"method": "zero", "direction": "denoising"})
    with pytest.raises(ValueError, match="settings\\['target'\\]"):
        ScanResult(torch.zeros(2, 3, 4), settings={"target": 3})
    s = ScanSettings({"kind": "attribution", "method": "mask", "cost": {"a": 1}})
    assert (s.kind, s.method, s.direction, s.reference, s["cost"]) == ("attribution", "mask", None, "clean", {"a": 1})
    with pytest.raises(TypeError, match="read-only"):
        s["method"] = "zero"
    assert json.loads(json.dumps(s)) == dict(s) and s.replace(method="patch").method == "patch"


def test_saved_denoising_result_loads_with_the_same_effect(tmp_path):
    r, _, corrupt_v = _result("denoising")
    r.save(tmp_path / "r")
    back = ScanResult.load(tmp_path / "r")
    assert back.reference == "corrupt" and back.settings == r.settings
    torch.testing.assert_close(back.effect, r.effect)
    torch.testing.assert_close(back.effect_stderr, r.effect_stderr)


def test_heatmap_title_and_report_state_the_definition(tmp_path):
    r, _, _ = _result("denoising")
    title = r.heatmap().axes[0].get_title()
    assert "direction denoising" in title and "effect from the corrupt run" in title
    html = r.to_html(tmp_path / "r.html").read_text()
    assert "effect = value - corrupt baseline" in html


# ------------------------------------------------------------------------ the embedded model


@pytest.fixture(scope="module")
def induction():
    from headint.tasks.induction import induction_prompts

    model = headint.models.load("induction-2l")
    p = induction_prompts(64, seq_len=32, vocab=model.config.vocab_size)
    clean = {"input_ids": p.clean, "target": p.target, "contrast": p.contrast}
    corrupt = {"input_ids": p.corrupted, "target": p.target, "contrast": p.contrast}
    return model, clean, corrupt


def _heads(frame) -> list[tuple[int, int]]:
    return [(int(r.layer), int(r.head)) for r in frame.itertuples()]


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_both_directions_rank_the_induction_circuit_first(induction, direction, tmp_path):
    """The issue's case: denoising put the bystanders first (its effect was value - clean)."""
    from headint.metrics import LogitDiff

    model, clean, corrupt = induction
    r = headint.scan(model, clean, LogitDiff(), corrupt=corrupt, method="patch", direction=direction, progress=False)
    top = r.top(5)
    assert set(_heads(top)) == CIRCUIT, top
    # in the direction expected: denoising restores (positive), noising destroys (negative) the
    # logit difference; the four heads the behaviour needs most by far, every bystander ~0
    sign = 1 if direction == "denoising" else -1
    assert (sign * top["effect"][:4] > 1.0).all() and (sign * top["effect"] > 0).all(), r.top(8)
    assert (r.top(8)[5:]["effect"].abs() < 0.2).all(), r.top(8)
    base = r.corrupt_baseline if direction == "denoising" else r.clean_baseline
    torch.testing.assert_close(r.effect, (r.values.double() - base).float())
    # a bystander that patching does not touch (L0H2 outputs the same on both runs) has an
    # effect of ~0 with a stderr of ~0: its values are paired with its own base run
    assert abs(float(r.effect[0, 2])) < 1e-4 and float(r.effect_stderr[0, 2]) < 1e-4

    csv = pd.read_csv(r.to_csv(tmp_path / "scan.csv"))
    order = csv.reindex(csv["effect"].abs().sort_values(ascending=False, kind="stable").index)
    assert set(_heads(order.head(5))) == CIRCUIT
    html = r.to_html(tmp_path / "report.html").read_text()
    table = report_data(html)["table"]  # the interactive report's head table, ranked as top() ranks
    first_five = [(int(n[1:n.index("H")]), int(n[n.index("H") + 1:])) for n in table["heads"][:5]]
    assert set(first_five) == CIRCUIT, first_five
    effect_column = next(c for c in table["columns"] if c["key"] == "effect")
    assert effect_column["title"] == r.effect_definition
    assert r.effect_definition in html  # the report's settings say what the effect is


def test_attribution_denoising_is_measured_from_the_corrupt_run(induction):
    model, clean, corrupt = induction
    a = headint.attribution_scan(model, clean, corrupt, "logit_diff", direction="denoising")
    assert a.reference == "corrupt"
    torch.testing.assert_close(a.effect, (a.values.double() - a.corrupt_baseline).float())
    assert set(_heads(a.top(3))) <= CIRCUIT


def test_cli_denoising_outputs_agree(tmp_path, capsys):
    """The command line's default patching direction: scan.csv, the printed table, settings.json
    and report.html all measure the effect from the corrupt run."""
    from headint.cli import main
    from scan_oracles import corrupt_of, make_batch, tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "model")
    clean = make_batch(4, 6, seed=1)
    corrupt = corrupt_of(clean, seed=2)
    for name, batch in (("prompts", clean), ("corrupt", corrupt)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for n in range(4):
                f.write(json.dumps({"input_ids": batch["input_ids"][n].tolist(), "target": int(clean["target"][n]),
                                    "contrast": int(clean["contrast"][n])}) + "\n")
    out = tmp_path / "out"
    assert main(["scan", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.jsonl"), "--corrupt",
                 str(tmp_path / "corrupt.jsonl"), "--method", "patch", "--out", str(out), "--no-progress",
                 "--backend", "reference"]) == 0
    printed = capsys.readouterr().out
    settings = json.loads((out / "settings.json").read_text())
    assert settings["direction"] == "denoising" and settings["effect_reference"] == "corrupt"
    assert settings["effect_definition"].startswith("effect = value - corrupt baseline") and settings["effect_definition"] in printed
    frame = pd.read_csv(out / "scan.csv")
    assert frame["effect"].to_numpy() == pytest.approx(frame["value"].to_numpy() - settings["corrupt_baseline"], abs=1e-5)
    assert "effect = value - corrupt baseline" in (out / "report.html").read_text()
