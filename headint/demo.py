"""The main job: find the induction circuit of the embedded model, out of the box.

``headint demo`` (or :func:`run_demo`) loads ``induction-2l`` (shipped with the package),
builds prompts whose next token is predictable only by in-context copying, and runs

1. exact mean-ablation and activation-patching scans over every head,
2. an attribution-patching scan (one forward + one backward),
3. an exact scan of every pair of heads (to expose heads that back each other up),

then prints the top heads next to their attention-pattern scores (previous-token and
induction scores, measured independently of any intervention) and writes heatmaps, CSVs
(``pair_scan.csv`` with the summed single effects beside each pair's), ``summary.json``
(with every scan's settings) and a self-contained ``report.html``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .integration.structure import model_shape
from .integration.hf import intervene
from .integration.record import record
from .interventions import Ablate
from .metrics import LogitDiff
from .models import load
from .pattern_views import example_patterns, report_heads
from .patterns import induction_scores, previous_token_scores
from .integration.record import record
from .results.pairs import pair_frame
from .results.report import RelatedScan
from .scans import all_pairs, attribution_scan, scan
from .tasks.induction import copy_accuracy, induction_prompts, repeated_random_tokens
from .tokens import to_str_tokens

PREV_TOKEN_THRESHOLD = 0.4
INDUCTION_THRESHOLD = 0.3


def head_name(l: int, h: int) -> str:
    return f"L{l}H{h}"


def find_circuit(model, n_examples: int = 64, seed: int = 0, backend: str = "auto", progress: bool = False) -> dict:
    """Run the demo's scans and return everything it reports (no printing, no files)."""
    shape = model_shape(model)
    vocab = model.config.vocab_size
    seq_len = min(32, model.config.n_positions)
    p = induction_prompts(n_examples, seq_len=seq_len, vocab=vocab, seed=seed)
    clean = {"input_ids": p.clean, "target": p.target, "contrast": p.contrast}
    corrupt = {"input_ids": p.corrupted, "target": p.target, "contrast": p.contrast}
    metric = LogitDiff()

    probe = repeated_random_tokens(64, 12, vocab=vocab, seed=seed + 1)
    prev = previous_token_scores(model, probe)
    ind = induction_scores(model, probe)

    mean_scan = scan(model, clean, metric, corrupt=corrupt, method="mean", progress=progress, backend=backend)
    patch_scan = scan(model, clean, metric, corrupt=corrupt, method="patch", direction="noising", progress=progress, backend=backend)
    attribution = attribution_scan(model, clean, corrupt, metric, direction="noising", backend=backend)
    pair_scan = scan(model, clean, metric, corrupt=corrupt, method="mean", head_sets=all_pairs(shape), progress=progress, backend=backend)

    roles = {}
    for l in range(shape.n_layers):
        for h in range(shape.n_heads):
            r = []
            if prev[l, h] >= PREV_TOKEN_THRESHOLD:
                r.append("previous-token")
            if ind[l, h] >= INDUCTION_THRESHOLD:
                r.append("induction")
            roles[(l, h)] = "+".join(r) or "-"
    circuit = [k for k, r in roles.items() if r != "-"]
    bystanders = [k for k, r in roles.items() if r == "-"]

    # Copy accuracy with the circuit (or a bystander) mean-ablated.
    cache = record(model, p.clean, what=("z",), backend=backend)
    def accuracy_with(heads):
        ivs = [Ablate(layer=l, head=h, kind="mean", value=cache.mean_z(l, over_positions=True)) for l, h in heads]
        with intervene(model, ivs, backend=backend):
            return copy_accuracy(model, seed=seed + 2)[0]
    acc_clean, chance = copy_accuracy(model, seed=seed + 2)
    acc_circuit = accuracy_with(circuit) if circuit else float("nan")
    acc_bystander = accuracy_with(bystanders[:1]) if bystanders else float("nan")

    return dict(shape=shape, prev=prev, ind=ind, roles=roles, circuit=circuit, bystanders=bystanders,
                mean_scan=mean_scan, patch_scan=patch_scan, attribution=attribution, pair_scan=pair_scan,
                prompts=p, copy_accuracy=dict(clean=acc_clean, circuit_ablated=acc_circuit, bystander_ablated=acc_bystander, chance=chance))


def _table(res: dict) -> str:
    s = res["mean_scan"]
    a = res["attribution"]
    pt = res["patch_scan"]
    rows = []
    for l in range(res["shape"].n_layers):
        for h in range(res["shape"].n_heads):
            rows.append((float(s.effect[l, h]), l, h))
    rows.sort(key=lambda r: r[0])  # most negative effect (most important) first
    lines = [f"{'head':>6} {'mean-abl. effect':>17} {'± stderr':>9} {'patch effect':>13} {'attribution':>12} {'prev-tok':>9} {'induction':>10}  role"]
    for eff, l, h in rows:
        lines.append(
            f"{head_name(l, h):>6} {eff:>17.3f} {float(s.effect_stderr[l, h]):>9.3f} {float(pt.effect[l, h]):>13.3f} "
            f"{float(a.effect[l, h]):>12.3f} {float(res['prev'][l, h]):>9.2f} {float(res['ind'][l, h]):>10.2f}  {res['roles'][(l, h)]}"
        )
    return "\n".join(lines)


def pair_interactions(res: dict, rel: float = 0.25) -> tuple[list[tuple], list[tuple]]:
    """Pairs whose joint ablation differs clearly from the sum of the two single ablations.

    interaction = pair effect - (effect a + effect b). Clearly negative: the pair does more
    damage than the two heads alone (redundancy: each covers for the other). Clearly positive:
    either head alone already removes what the pair removes (the heads act in series).
    "Clearly": beyond ``rel`` of |pair effect|, beyond three paired standard errors, and beyond
    10% of the clean-corrupt gap of the metric.
    Returns (redundant, serial), each ``[(a, b, pair_effect, summed_singles, interaction)]``.
    """
    single = res["mean_scan"]
    pairs = res["pair_scan"]
    gap = abs((single.clean_baseline or 0.0) - (single.corrupt_baseline or 0.0))
    redundant, serial = [], []
    for i, hs in enumerate(pairs.labels):
        a, b = (tuple(x) for x in hs)
        pair, singles = float(pairs.effect[i]), float(single.effect[a] + single.effect[b])
        inter = pair - singles
        if abs(inter) > rel * abs(pair) and abs(inter) > 3 * float(pairs.effect_stderr[i]) and abs(inter) > 0.1 * gap:
            (redundant if inter < 0 else serial).append((a, b, pair, singles, inter))
    return sorted(redundant, key=lambda r: r[4]), sorted(serial, key=lambda r: -r[4])


def _redundancy(res: dict) -> str:
    redundant, serial = pair_interactions(res)
    n = len(res["pair_scan"].labels)
    lines = []
    if redundant:
        lines.append(f"pairwise scan ({n} pairs): heads that back each other up (together they do more than alone):")
        for a, b, pair, singles, inter in redundant[:5]:
            lines.append(f"  {head_name(*a)} + {head_name(*b)}: together {pair:.3f}, single effects summed {singles:.3f}")
        lines.append("  -> single-head ablation underestimates these heads, since each covers for the other; "
                     "the pairwise scan is what finds them.")
    else:
        lines.append(f"pairwise scan ({n} pairs): no redundant heads; no pair does clearly more damage than its two "
                     "heads alone, so the single-head scan already shows every head that matters here.")
    for a, b, pair, singles, inter in serial[:3]:
        lines.append(f"  {head_name(*a)} and {head_name(*b)} act in series: together {pair:.3f}, single effects summed "
                     f"{singles:.3f} (either one alone removes the behaviour)")
    return "\n".join(lines)


PATTERN_EXAMPLES = 3  # the report shows the attention patterns of every head on this many prompts


def _write_report(model, res: dict, path: Path, backend: str) -> Path:
    """``report.html``: the mean-ablation scan (heatmap, head table with the patching and
    attribution effects, pattern scores and roles), the attention patterns of the heads on the
    first prompts, and the patching, attribution and pair scans, each interactive."""
    examples = [res["prompts"].clean[i] for i in range(min(PATTERN_EXAMPLES, len(res["prompts"].clean)))]
    heads = report_heads(res["mean_scan"], [len(ids) for ids in examples])
    related = [RelatedScan("Activation patching (noising)", res["patch_scan"], column="patch effect"),
               RelatedScan("Attribution patching (gradient estimate of patching)", res["attribution"], column="attribution"),
               RelatedScan("Pairs of heads: together vs single effects summed", res["pair_scan"], singles=res["mean_scan"])]
    head_columns = {"prev-tok": res["prev"], "induction": res["ind"], "role": res["roles"]}
    return res["mean_scan"].to_html(path, patterns=example_patterns(model, examples, heads, backend=backend),
                                    pattern_tokens=[to_str_tokens(None, ids) for ids in examples],
                                    title="headint demo: induction-2l, mean ablation", related=related,
                                    head_columns=head_columns)


def run_demo(out: str = "headint-demo", n_examples: int = 64, seed: int = 0, backend: str = "auto") -> int:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = load("induction-2l")
    res = find_circuit(model, n_examples=n_examples, seed=seed, backend=backend)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    singles = res["mean_scan"]  # the pair scan mean-ablates too: its single-head counterpart
    for name in ("mean_scan", "patch_scan", "attribution", "pair_scan"):
        r = res[name]
        title = f"induction-2l: {name.replace('_', ' ')} (logit difference)"
        if name == "pair_scan":
            frame = r.to_frame()
            extra = pair_frame(r, singles)
            for col in ("singles_sum", "singles_sum_stderr", "interaction", "interaction_stderr"):
                frame[col] = extra[col].to_numpy()
            frame.to_csv(out_dir / f"{name}.csv", index=False)
            r.heatmap(out_dir / f"{name}.png", title=title, singles=singles)
        else:
            r.to_csv(out_dir / f"{name}.csv")
            r.heatmap(out_dir / f"{name}.png", title=title)
    acc = res["copy_accuracy"]
    summary = dict(
        circuit=[head_name(*k) for k in res["circuit"]], bystanders=[head_name(*k) for k in res["bystanders"]],
        roles={head_name(*k): v for k, v in res["roles"].items()},
        previous_token_scores=res["prev"].tolist(), induction_scores=res["ind"].tolist(),
        clean_logit_diff=res["mean_scan"].clean_baseline, corrupt_logit_diff=res["mean_scan"].corrupt_baseline,
        copy_accuracy=acc, n_examples=n_examples, seed=seed, backend=backend,
        scans={name: res[name].settings for name in ("mean_scan", "patch_scan", "attribution", "pair_scan")},
    )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_report(model, res, out_dir / "report.html", backend)

    s = res["mean_scan"]
    print(f"headint demo: induction-2l, {n_examples} prompts whose next token is predictable only by in-context copying")
    print(f"logit difference (target - contrast): clean {s.clean_baseline:.3f}, corrupted {s.corrupt_baseline:.3f}\n")
    print("Every head, most important first (effect = change of the logit difference; pattern scores from attention maps):")
    print(_table(res))
    print()
    print(_redundancy(res))
    print()
    print("Circuit named by the pattern scores:", ", ".join(f"{head_name(*k)} ({res['roles'][k]})" for k in res["circuit"]) or "none")
    print(f"copy accuracy: intact {acc['clean']:.3f}; circuit mean-ablated {acc['circuit_ablated']:.3f}; "
          f"one bystander ablated {acc['bystander_ablated']:.3f}; chance {acc['chance']:.3f}")
    print(f"\nwrote CSVs, heatmaps, summary.json and report.html to {out_dir}/ in {time.perf_counter() - t0:.1f} s")
    return 0
