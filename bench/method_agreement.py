"""Exact scans vs their first-order estimates vs learned gates, on induction-2l and MiniLM
(issue #24's closing table).

For each model and replacement (zero, mean, resample; induction-2l also corrupted-prompt patching):
the exact scan (``headint.scan``), its attribution estimate (``attribution_scan`` with the same
method: AtP for ``patch``), and for zero and mean gradient head importance (``method="mask"``,
Michel et al.: it linearises *zero* ablation), each compared with the exact scan by Spearman rank
agreement of the per-head effects, with a 95% bootstrap interval over prompts
(``headint.results.stats.rank_agreement``); plus learned gates (``learn_gates(tolerance=...)``):
their logits' rank agreement with the exact effects' magnitude, the kept set's size and its
faithfulness with a bootstrap interval (``circuit_faithfulness``), against the exhaustive minimum
where 2^heads is small enough (induction-2l).

    python bench/method_agreement.py --model induction-2l
    python bench/method_agreement.py --model minilm --n 320 --gate-steps 80
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

import headint
from headint.results.stats import rank_agreement
from headint.scans.faithfulness import circuit_faithfulness


def per_example_effect(res) -> torch.Tensor:
    return res.per_example.double() - res.base_per_example.double()


def load(name: str, n: int):
    if name == "induction-2l":
        from headint.tasks.induction import induction_prompts

        model = headint.models.load("induction-2l")
        p = induction_prompts(n, seq_len=32, vocab=model.config.vocab_size, seed=3)
        clean = {"input_ids": p.clean, "attention_mask": torch.ones_like(p.clean), "target": p.target, "contrast": p.contrast}
        corrupt = dict(clean, input_ids=p.corrupted)
        return model, clean, corrupt, "logit_diff"
    from headint.models.minilm import load_minilm
    from headint.tasks.paraphrase import paraphrase_batch, paraphrase_margin_metric
    from headint.tasks.paraphrase_set import templated_triples

    model, tok = load_minilm()
    return model, paraphrase_batch(model, tok, templated_triples(limit=n)), None, paraphrase_margin_metric()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["induction-2l", "minilm"], default="induction-2l")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--gate-steps", type=int, default=60)
    ap.add_argument("--gate-batch", type=int, default=None)
    ap.add_argument("--tolerance", type=float, default=0.9)
    ap.add_argument("--json", default=None)
    ap.add_argument("--methods", default=None, help="comma-separated replacements (default zero,mean,resample[,patch])")
    ap.add_argument("--no-gates", action="store_true")
    args = ap.parse_args(argv)
    model, clean, corrupt, metric = load(args.model, args.n)
    rows = []
    t0 = time.perf_counter()
    methods = ["zero", "mean", "resample"] + (["patch"] if corrupt is not None else [])
    if args.methods:
        methods = args.methods.split(",")
    exact = {}
    for m in methods:
        kw = dict(corrupt=corrupt, direction="noising") if m == "patch" else {}
        t = time.perf_counter()
        exact[m] = headint.scan(model, clean, metric, method=m, progress=False, **kw)
        te = time.perf_counter() - t
        t = time.perf_counter()
        att = headint.attribution_scan(model, clean, corrupt if m == "patch" else None, metric, method=m, direction="noising")
        ta = time.perf_counter() - t
        a = rank_agreement(per_example_effect(att), per_example_effect(exact[m]), args.n_boot)
        rows.append(dict(model=args.model, replacement=m, estimate="AtP" if m == "patch" else f"attribution({m})", **a,
                         seconds_exact=round(te, 2), seconds_estimate=round(ta, 2),
                         exact_effect_max=float(exact[m].effect.abs().max()), estimate_effect_max=float(att.effect.abs().max())))
        print(rows[-1], flush=True)
    mask = headint.attribution_scan(model, clean, None, metric, method="mask")
    for m in [x for x in ("zero", "mean") if x in exact]:
        rows.append(dict(model=args.model, replacement=m, estimate="mask gradient (Michel)",
                         **rank_agreement(per_example_effect(mask), per_example_effect(exact[m]), args.n_boot)))
        print(rows[-1], flush=True)
    L, H = exact["zero"].effect.shape
    for m in ([] if args.no_gates else [x for x in ("zero", "mean") if x in exact]):
        t = time.perf_counter()
        g = headint.learn_gates(model, clean, metric, maximize=True, ablation=m, tolerance=args.tolerance, penalty_weight=0.1,
                                steps=args.gate_steps, batch_size=args.gate_batch, progress=False)
        tg = time.perf_counter() - t
        kept = g.open_heads
        fr = circuit_faithfulness(model, clean, {"gates": kept}, metric, ablation=m).to_frame(args.n_boot)
        from headint.results.stats import spearman

        row = dict(model=args.model, replacement=m, estimate=f"gates (tolerance {args.tolerance})",
                   spearman=spearman(g.params, exact[m].effect.abs()), kept=len(kept), kept_heads=[list(h) for h in kept],
                   faithfulness=float(fr["faithfulness"][0]), f_lo=float(fr["lo"][0]), f_hi=float(fr["hi"][0]),
                   runs=len(g.path), seconds=round(tg, 1))
        if L * H <= 12:
            heads = [(l, h) for l in range(L) for h in range(H)]
            subsets = [list(c) for k in range(L * H + 1) for c in itertools.combinations(heads, k)]
            f = circuit_faithfulness(model, clean, subsets, metric, ablation=m, batch_size=512).faithfulness()
            row["exhaustive_minimum"] = min(len(s) for s, v in zip(subsets, f) if v >= args.tolerance)
        rows.append(row)
        print(row, flush=True)
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
