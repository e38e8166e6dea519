"""EAP and EAP-IG against exact edge patching on induction-2l: values, ranks, and where they differ.

The setting of ``tests/test_circuits.py``'s induction checks: 24 prompts
(``induction_prompts(24, seq_len=32, seed=1)``), metric ``logit_diff``, corrupt = the prompts'
corrupted versions, every edge of the graph. ``exact`` is :func:`headint.circuits.edge_patching`
(each edge alone carries its corrupt value, the rest clean). For each method it reports the named
induction edges (value and rank by ``|score|``), the largest edge outside the induction circuit,
how many outside edges outrank the weakest named edge, Pearson's r with exact over all edges and
the ratio method / exact over the 20 largest exact edges.

Run: ``python bench/circuits_induction_values.py`` (about a minute on 2 cores); prints one line per
method and writes ``bench/results/circuits_induction_values.json``. Nothing here is asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import headint
from headint import circuits
from headint.tasks.induction import induction_prompts

ROOT = Path(__file__).resolve().parent.parent
PREV, IND = (0,), (0, 2, 3)  # the previous-token head and the induction heads of induction-2l
NAMED = [f"a0.h{q}->a1.h{i}<k>" for q in PREV for i in IND] + [f"a1.h{i}->logits" for i in IND]
CIRCUIT = set(NAMED + [f"input->a0.h{q}<v>" for q in (0, 1)] + [f"input->a1.h{i}<{w}>" for i in IND for w in "qv"]
              + [f"a0.h1->a1.h{i}<k>" for i in IND])
METHODS = [("eap", 1), ("eap-ig", 1), ("eap-ig", 2), ("eap-ig", 4), ("eap-ig", 8), ("eap-ig", 16), ("eap-ig-activations", 8)]


def main() -> int:
    model = headint.models.load("induction-2l")
    p = induction_prompts(24, seq_len=32, vocab=model.config.vocab_size, seed=1)
    clean = {"input_ids": p.clean, "target": p.target, "contrast": p.contrast}
    corrupt = {"input_ids": p.corrupted}
    exact = circuits.edge_patching(model, clean, "logit_diff", corrupt=corrupt, batch_size=256)
    edges, ex = exact.edges, exact.scores.double()
    results = {"exact": exact}
    for method, steps in METHODS:
        key = method if method == "eap" else f"{method} ({steps} steps)"
        results[key] = circuits.attribute(model, clean, corrupt, "logit_diff", method=method, steps=steps)
    top20 = torch.sort(-ex.abs(), stable=True).indices[:20]
    out = {"n_edges": len(edges), "setting": "induction-2l, 24 prompts, T=32, seed 1, logit_diff", "methods": {}}
    for key, r in results.items():
        assert r.edges == edges
        s = r.scores.double()
        order = torch.sort(-s.abs(), stable=True).indices.tolist()
        rank = {edges[i]: k + 1 for k, i in enumerate(order)}
        weakest = min(abs(float(s[edges.index(e)])) for e in NAMED)
        outside = [edges[i] for i in order if edges[i] not in CIRCUIT]
        ratio = s[top20] / ex[top20]
        row = {
            "values": {e: [round(float(s[edges.index(e)]), 3), rank[e]] for e in [*NAMED, "input->a0.h0<v>", "input->a1.h3<v>"]},
            "largest_outside": [outside[0], round(float(s[edges.index(outside[0])]), 3), rank[outside[0]]],
            "outside_above_weakest_named": sum(abs(float(s[edges.index(e)])) >= weakest for e in outside),
            "pearson_r_vs_exact": round(float(torch.corrcoef(torch.stack([s, ex]))[0, 1]), 3),
            "ratio_to_exact_top20": {"median": round(float(ratio.median()), 2), "min": round(float(ratio.min()), 2),
                                     "max": round(float(ratio.max()), 2)},
        }
        out["methods"][key] = row
        print(f"{key:32s} {json.dumps(row)}", flush=True)
    path = ROOT / "bench" / "results" / "circuits_induction_values.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
