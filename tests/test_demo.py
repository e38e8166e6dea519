"""The main job: the scans on the embedded model find the induction circuit that the
attention-pattern scores name, independently of any intervention."""

import json

import pytest
import torch

import headint
from headint.demo import find_circuit, pair_interactions, run_demo
from headint.results.report import REPORT_BUDGET_BYTES
from headint.tasks.induction import copy_accuracy
from report_checks import assert_self_contained, report_data


@pytest.fixture(scope="module")
def found():
    model = headint.models.load("induction-2l")
    return model, find_circuit(model, n_examples=32, seed=3)


def _top_heads(result, k):
    eff = result.effect
    order = torch.argsort(eff.flatten())  # most negative (most damaging) first
    H = eff.shape[1]
    return {(int(i) // H, int(i) % H) for i in order[:k]}


def test_pattern_scores_name_a_circuit_and_bystanders(found):
    _, res = found
    roles = res["roles"]
    assert any("previous-token" in r for (l, _), r in roles.items() if l == 0)
    assert any("induction" in r for (l, _), r in roles.items() if l == 1)
    assert res["bystanders"], "the model has heads that are neither previous-token nor induction heads"


def test_exact_scans_single_out_the_pattern_circuit(found):
    _, res = found
    circuit = set(res["circuit"])
    redundant, _ = pair_interactions(res)
    in_redundant_pair = {h for a, b, *_ in redundant for h in (a, b)}
    for name in ("mean_scan", "patch_scan"):
        assert _top_heads(res[name], len(circuit)) == circuit, name
        s = res[name]
        gap = abs(s.clean_baseline - s.corrupt_baseline)
        # every circuit head is singled out alone (far beyond noise) or, where heads back
        # each other up, by the pairwise scan; bystanders do nothing
        for l, h in circuit:
            alone = s.effect[l, h] < -5 * max(float(s.effect_stderr[l, h]), 1e-3)
            assert alone or (l, h) in in_redundant_pair, (name, l, h)
        for l, h in res["bystanders"]:
            assert abs(float(s.effect[l, h])) < 0.05 * gap


def test_attribution_ranks_the_circuit_on_top(found):
    _, res = found
    circuit = set(res["circuit"])
    assert _top_heads(res["attribution"], len(circuit)) == circuit


def test_pairwise_scan_finds_backup_heads(found):
    _, res = found
    pairs = res["pair_scan"]
    labels = [tuple(map(tuple, s)) for s in pairs.labels]
    # the most damaging pair is made of circuit heads
    assert set(labels[int(pairs.effect.argmin())]) <= set(res["circuit"])
    redundant, _ = pair_interactions(res)
    roles = res["roles"]
    for a, b, pair, singles, inter in redundant:
        # redundancy is found between heads of the same role, never with a bystander
        assert roles[a] == roles[b] != "-", (a, b)
        assert pair < singles


def test_ablating_the_circuit_drops_copying_to_chance(found):
    _, res = found
    acc = res["copy_accuracy"]
    assert acc["clean"] > 0.9
    assert acc["circuit_ablated"] < 5 * acc["chance"]
    assert acc["bystander_ablated"] > 0.9


def test_every_bystander_alone_leaves_copying_intact(found):
    model, res = found
    cache = headint.record(model, torch.randint(0, model.config.vocab_size, (16, 32)), what=("z",))
    for l, h in res["bystanders"]:
        ivs = [headint.Ablate(layer=l, head=h, kind="mean", value=cache.mean_z(l, over_positions=True))]
        with headint.intervene(model, ivs):
            acc, _ = copy_accuracy(model, batch=64, seed=9)
        assert acc > 0.9, (l, h, acc)


def test_demo_command_writes_tables_and_heatmaps(tmp_path, capsys):
    assert run_demo(out=str(tmp_path), n_examples=16, seed=1) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    for head in summary["circuit"]:
        assert head in printed
    assert "pairwise scan" in printed and "copy accuracy" in printed
    for name in ("mean_scan", "patch_scan", "attribution", "pair_scan"):
        assert (tmp_path / f"{name}.csv").stat().st_size > 0
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert summary["scans"][name]["n_examples"] == 16  # the scan settings are recorded
    assert summary["scans"]["patch_scan"]["direction"] == "noising" and summary["scans"]["mean_scan"]["method"] == "mean"
    import pandas as pd

    pairs = pd.read_csv(tmp_path / "pair_scan.csv")
    singles = pd.read_csv(tmp_path / "mean_scan.csv").set_index(["layer", "head"])["effect"]
    for row in pairs.itertuples():
        a, b = [tuple(int(t) for t in h[1:].split("H")) for h in row.head_set.split("+")]
        assert abs(row.singles_sum - (singles[a] + singles[b])) < 1e-4  # the summed single effects, as printed
    html = (tmp_path / "report.html").read_text()
    assert_self_contained(html)
    assert len(html.encode()) < REPORT_BUDGET_BYTES
    data = report_data(html)
    assert set(summary["circuit"]) <= set(data["patterns"]["heads"]) and len(data["patterns"]["examples"]) == 3
    # the head table carries the printed columns: effects of the three scans, pattern scores, roles
    labels = [c["label"] for c in data["table"]["columns"]]
    assert {"effect", "\u00b1 stderr", "patch effect", "attribution", "prev-tok", "induction", "role"} <= set(labels)
    role = labels.index("role")
    assert {row[1]: row[role] for row in data["table"]["rows"]} == summary["roles"]
    assert [v["caption"] for v in data["scans"][1:]] == ["Activation patching (noising)",
                                                         "Attribution patching (gradient estimate of patching)",
                                                         "Pairs of heads: together vs single effects summed"]
    assert data["scans"][3]["pairs"] is not None
