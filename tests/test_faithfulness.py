"""Circuit faithfulness (``headint.scans.faithfulness``): every alone / complement / intact / none
value against hooks that replace the removed heads' outputs at the output projection's input,
under each ablation choice (zero, mean, resample, patch; all positions or given ones), padding
included; the bootstrap intervals and curve areas against direct computation; node vs edge level
on the induction circuit; argument errors."""

from __future__ import annotations

import pytest
import torch

import headint
from headint.results.faithfulness import curve_areas, faithfulness_ratio
from headint.scans.faithfulness import circuit_faithfulness, faithfulness_across, faithfulness_curve, node_edges
from headint.tasks.induction import induction_prompts

from scan_oracles import (corrupt_of, derangement, logits_with, make_batch, masked_mean_z, n_heads, n_layers, oracle_metric,
                          record_z)


def oracle_kept(model, batch, kept, ablation, *, corrupt=None, positions=None, seed=0):
    """``[N]``: the metric with every head outside ``kept`` replaced (hooks)."""
    L, H = n_layers(model), n_heads(model)
    zs, clean_logits = record_z(model, batch)
    if ablation == "mean":
        src = masked_mean_z(zs, batch["attention_mask"])
    elif ablation == "resample":
        perm = derangement(batch["input_ids"].shape[0], seed)
        src = {l: z[perm] for l, z in zs.items()}
    elif ablation == "patch":
        src = record_z(model, corrupt)[0]
    else:
        src = None
    edits = []
    for l in range(L):
        for h in range(H):
            if (l, h) in kept:
                continue
            for p in (positions if positions is not None else [None]):
                edits.append((l, h, p, None if src is None else src[l][:, :, h]))
    return oracle_metric("logit_diff", logits_with(model, batch, edits), batch, clean_logits)


@pytest.mark.parametrize("ablation,positions", [("zero", None), ("mean", None), ("resample", None), ("patch", None),
                                                ("mean", [4, 6])])
def test_values_match_hooks(model, ablation, positions):
    batch = make_batch(N=4, T=7, pad="left", seed=3)
    corrupt = corrupt_of(batch) if ablation == "patch" else None
    L, H = n_layers(model), n_heads(model)
    circuits = {"a": [(0, 1), (1, 2)], "b": [(L - 1, 0)], "empty": []}
    res = circuit_faithfulness(model, batch, circuits, "logit_diff", ablation=ablation, corrupt=corrupt, positions=positions,
                               batch_size=5)
    everything = {(l, h) for l in range(L) for h in range(H)}
    kw = dict(corrupt=corrupt, positions=positions)
    torch.testing.assert_close(res.intact, oracle_kept(model, batch, everything, ablation, **kw), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(res.none, oracle_kept(model, batch, set(), ablation, **kw), atol=2e-4, rtol=1e-4)
    for k, (name, heads) in enumerate(circuits.items()):
        torch.testing.assert_close(res.alone[k], oracle_kept(model, batch, set(heads), ablation, **kw), atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(res.complement[k], oracle_kept(model, batch, everything - set(heads), ablation, **kw),
                                   atol=2e-4, rtol=1e-4)
    assert (res.alone - res.intact).abs().max() > 1e-3  # the ablation did something
    frame = res.to_frame(n_boot=200)
    assert list(frame["circuit"]) == ["a", "b", "empty"] and frame["ablation"].iloc[0] == ablation
    f = faithfulness_ratio(res.alone.double().mean(1), res.intact.double().mean(), res.none.double().mean())
    torch.testing.assert_close(torch.tensor(frame["faithfulness"].values), f)
    assert abs(frame["faithfulness"].iloc[2]) < 1e-9  # the empty circuit is the fully ablated model
    assert ((frame["lo"] <= frame["faithfulness"] + 1e-9) & (frame["faithfulness"] <= frame["hi"] + 1e-9)).all()


def test_bootstrap_intervals_and_areas_by_hand():
    """Replicates share one draw of the prompts across terms: recompute one replicate's ratio."""
    from headint.results.faithfulness import FaithfulnessResult
    from headint.results.stats import percentile_interval

    g = torch.Generator().manual_seed(0)
    N = 30
    intact, none = 10 + torch.randn(N, generator=g), torch.randn(N, generator=g)
    alone = torch.stack([none + k / 4 * (intact - none) + 0.3 * torch.randn(N, generator=g) for k in range(5)])
    res = FaithfulnessResult([f"k{k}" for k in range(5)], [0, 1, 2, 3, 4], 4, alone, alone.flip(0), intact, none, "m")
    reps, _ = res._replicates(300, seed=7)
    draws = torch.randint(0, N, (300, N), generator=torch.Generator().manual_seed(7))
    d = draws[5]
    want = (alone[:, d].double().mean(1) - none[d].double().mean()) / (intact[d].double().mean() - none[d].double().mean())
    torch.testing.assert_close(reps[5], want)
    lo, hi = percentile_interval(reps)
    frame = res.to_frame(n_boot=300, seed=7)
    torch.testing.assert_close(torch.tensor(frame["lo"].values), lo)
    a = res.areas(n_boot=300, seed=7)
    x = torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    f = res.faithfulness()
    want_cpr = sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(4))
    want_cmd = sum((x[i + 1] - x[i]) * ((1 - f[i]).abs() + (1 - f[i + 1]).abs()) / 2 for i in range(4))
    assert abs(a["cpr"] - float(want_cpr)) < 1e-12 and abs(a["cmd"] - float(want_cmd)) < 1e-12
    assert a["cpr_lo"] <= a["cpr"] <= a["cpr_hi"] and a["cmd_lo"] <= a["cmd"] <= a["cmd_hi"]
    cpr, cmd = curve_areas(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert float(cpr) == 1.0 and float(cmd) == 0.0


def _induction(n=16):
    model = headint.models.load("induction-2l")
    p = induction_prompts(n, seq_len=32, vocab=model.config.vocab_size, seed=3)
    return model, {"input_ids": p.clean, "target": p.target, "contrast": p.contrast}


def test_induction_circuit_across_choices_node_and_edge():
    """The induction circuit is faithful under every choice; with mean sources the node circuit and
    its edge reading (node_edges, empty circuit = input/MLP/logit edges) give identical values."""
    model, batch = _induction()
    circuit = {"induction": [(0, 0), (0, 1), (1, 0), (1, 2), (1, 3)], "prev+L1H3": [(0, 0), (1, 3)]}
    frame, results = faithfulness_across(model, batch, circuit, choices=[
        dict(ablation="zero"), dict(ablation="mean"), dict(ablation="resample"), dict(ablation="mean", positions=[31]),
        dict(level="edge", source="mean", name="edge mean")], n_boot=200)
    assert len(frame) == 10 and frame["choice"].nunique() == 5
    full = frame[frame["circuit"] == "induction"]
    assert (full["faithfulness"] > 0.95).all() and (full["complement"].abs() < 0.1).all(), full
    node, edge = results["ablation=mean"], results["edge mean"]
    torch.testing.assert_close(edge.alone, node.alone, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(edge.none, node.none, atol=2e-4, rtol=1e-4)
    g = headint.circuits.graph_of(model)
    assert set(node_edges(g, [])) <= set(node_edges(g, [(0, 0)])) and len(node_edges(g, [(0, 0), (1, 3)])) > len(node_edges(g, []))


def test_curve_over_size_from_a_ranking():
    model, batch = _induction()
    ranking = [(1, 3), (0, 0), (1, 2), (0, 1), (1, 0), (0, 3), (1, 1), (0, 2)]
    res = faithfulness_curve(model, batch, ranking, ablation="mean", sizes=[0, 2, 4, 5, 8])
    f = res.faithfulness()
    assert abs(float(f[0])) < 1e-9 and abs(float(f[-1]) - 1) < 1e-9 and float(f[3]) > 0.95
    a = res.areas(n_boot=100)
    assert 0.0 < a["cpr"] < 1.0 and a["cpr_lo"] <= a["cpr"] <= a["cpr_hi"]


def test_errors():
    model, batch = _induction(4)
    with pytest.raises(ValueError, match="ablation must be one of"):
        circuit_faithfulness(model, batch, [[(0, 0)]], ablation="gaussian")
    with pytest.raises(ValueError, match="needs corrupt="):
        circuit_faithfulness(model, batch, [[(0, 0)]], ablation="patch")
    with pytest.raises(ValueError, match="out of range"):
        circuit_faithfulness(model, batch, [[(2, 0)]])
    with pytest.raises(ValueError, match="twice"):
        circuit_faithfulness(model, batch, [[(0, 0), (0, 0)]])
    with pytest.raises(ValueError, match="positions"):
        circuit_faithfulness(model, batch, [[(0, 0)]], positions=[99])
    with pytest.raises(ValueError, match="sizes"):
        faithfulness_curve(model, batch, [(0, 0)], sizes=[3])
