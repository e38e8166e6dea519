"""Render ``scan_vs_hooks.py`` and ``speed_paths.py`` JSON results as Markdown tables (for bench/RESULTS.md).

    python bench/render_results.py bench/results/scan_vs_hooks.json [more.json ...] [bench/results/speed_paths.json]
    python bench/render_results.py run1.json:peers,breakdown run2.json:long_context   # only those sections of each file
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan_vs_hooks import flop_accounting  # noqa: E402


def fmt(v, digits=2) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,d}"
    return str(v)


def table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def reps(xs) -> str:
    return ", ".join(f"{x:.1f}" if x >= 10 else f"{x:.2f}" for x in xs)


def render_speed_paths(path: str, data: dict) -> str:
    """The tables of ``speed_paths.py``: each shortcut switched off, and position grouping."""
    env = data["environment"]
    md = [f"### {path}", "",
          f"{env['date']}, {' '.join(env.get('argv', [])[1:]) or 'defaults'}, {env['threads']} threads on {env.get('nproc')} cores ({env.get('cpu')}), torch {env['torch']}, "
          f"git {env.get('git_commit')}{' (+ uncommitted changes)' if env.get('git_dirty') else ''}; load average "
          f"{env['load_avg_start']:.1f} at start, {env.get('load_avg_end', float('nan')):.1f} at end", ""]
    for s in data["sections"]:
        rows = s["rows"]
        if "speedup_vs_neither" in rows[0]:
            md += [f"**{s['label']}**, all heads, activation patching (values equal across rows to the max abs diff shown)", ""]
            md += [table(["scan", "median wall s", "median CPU s", "speed-up vs no shortcut", "max abs diff", "rows per batch",
                          "wall s, each repeat"],
                         [[r["method"], r["median_s"], r["cpu_s"], r["speedup_vs_neither"], f"{r['max_abs_diff']:.2g}", r.get("batch_rows"),
                           reps(s["times"][r["method"]])] for r in rows]), ""]
        else:
            md += [f"**{s['label']}**, per-position zero ablation (heads 0 of layers 0 and L/2, every position)", ""]
            md += [table(["scan", "median wall s", "median CPU s", "speed-up vs ungrouped", "runs", "token-layer-forwards",
                          "wall s, each repeat"],
                         [[r["method"], r["median_s"], r["cpu_s"], r["speedup_vs_ungrouped"], r["runs"], r["token_layer_forwards"],
                           reps(s["times"][r["method"]])] for r in rows]), ""]
    return "\n".join(md)


def render(arg: str) -> str:
    path, _, only = arg.partition(":")
    data = json.load(open(path))
    if only:
        data["sections"] = [s for s in data["sections"] if s["section"] in only.split(",")]
    if data["sections"] and "label" in data["sections"][0]:
        return render_speed_paths(path, data)
    env = data["environment"]
    md = [f"### {path}", "",
          f"{env['date']}, {env['device']}, {env.get('config')} N={env.get('n')} T={env.get('t')} {env.get('dtype')}, "
          f"{env['threads']} threads on {env.get('nproc')} cores ({env.get('cpu')}), torch {env['torch']}, transformers {env['transformers']}, "
          f"peers {env.get('peers')}, git {env.get('git_commit')}"
          f"{' (+ uncommitted changes)' if env.get('git_dirty') else ''}; load average {env['load_avg_start']:.1f} at start, "
          f"{env.get('load_avg_end', float('nan')):.1f} at end; total {env.get('total_s', 0):.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in env.get('section_elapsed_s', {}).items())})", ""]
    for s in data["sections"]:
        kind = s["section"]
        if kind == "peers":
            md += [f"**All heads, activation patching** ({s['n_variants']} heads, N={s['N']}, T={s['T']}, headint backend "
                   f"{s['backend']}; every exact method checked against the hook loop before timing)", ""]
            rows = [[r["method"], r["median_s"], r["speedup_vs_hooks"], r["cpu_s"], r["cpu_speedup"],
                     "-" if r["max_abs_diff"] != r["max_abs_diff"] else f"{r['max_abs_diff']:.2g}", reps(s["times"][r["method"]]),
                     reps(s["cpu_times"][r["method"]])] for r in s["rows"]]
            md += [table(["method", "median wall s", "speed-up vs hook loop (wall)", "median CPU s", "speed-up (CPU)",
                          "max abs diff vs hook loop", "wall s, each repeat", "CPU s, each repeat"], rows), ""]
            names = [r["method"] for r in s["rows"]]
            md += ["Ratio of median wall times (row is this many times faster than column):", ""]
            md += [table([""] + names, [[a] + [s["ratios"][a][b] for b in names] for a in names]), ""]
            for k, why in s.get("skipped", {}).items():
                md += [f"- {k}: skipped, {why}"]
            m = env["model"]  # recomputed from the shape, so the accounting can be corrected after a run
            f = flop_accounting(m["n_layer"], m["n_embd"], 4 * m["n_embd"], m["vocab_size"], s["N"], s["T"], m["n_head"])
            md += [f"Fastest of the others: {s['fastest_baseline']}; headint.scan is {s['speedup_logitdiff_vs_fastest']:.2f}x faster "
                   f"with LogitDiff and {s['speedup_callable_vs_fastest']:.2f}x with the callable. Paths: "
                   + "; ".join(f"{k}: metric logits {v['metric_logits']}, {v['final_block']}" for k, v in s["paths"].items())
                   + f". Rows per batch {s['batch_rows']}; attribution vs exact effects r = {s['attribution_exact_corr']:.3f}.", "",
                   f"FLOPs (multiply-adds x2, `flop_accounting`): hook loop {f['hook_loop']:.3g}, headint.scan {f['headint']:.3g}, "
                   f"the minimum of an exact scan {f['minimum']:.3g}: hook loop / headint = {f['hook_over_headint']:.2f}x, "
                   f"hook loop / minimum = {f['hook_over_minimum']:.2f}x.", ""]
            continue
        if kind == "long_context":
            c = s["config"]
            md += [f"**Long context** ({c['n_layer']} layers x {c['n_head']} heads, d_model {c['n_embd']}, vocabulary {c['vocab_size']}, "
                   f"N={s['N']}; activation patching of all heads; peak memory above the start of each call; attention share: "
                   "self time of ops named *attention* under torch.profiler)", ""]
            md += [table(["T", "method", "median wall s", "speed-up vs hook loop", "median CPU s", "peak memory MiB", "attention share"],
                         [[r["T"], r["method"], r["median_s"], r["speedup_vs_hooks"], r["cpu_s"], r["peak_mem_mib"],
                           f"{r['attention_share']:.0%}"] for r in s["rows"]]), ""]
            md += ["; ".join(f"T={r['T']}: max abs diff exact vs hook loop {r['max_abs_diff']:.2g}, rows per batch {r['batch_rows']}, "
                             f"{r['final_block']}" for r in s["runs"]), ""]
            continue
        if kind in ("all_heads", "per_position"):
            title = ("All heads" if kind == "all_heads" else
                     f"Per position: layers {s['layers']} x heads {s['heads']} x positions {s['positions']}")
            md += [f"**{title}** ({s['n_variants']} variants, backend {s.get('backend', 'auto')}, "
                   f"max abs diff headint vs hook loop {s['max_abs_diff']:.2g})", ""]
            rows = []
            for r in s["rows"]:
                key = "hook loop" if r["method"].startswith("hook loop") else ("headint.scan" if r["method"].startswith("headint.scan") else "attribution_scan")
                rows.append([r["method"], r["median_s"], r.get("speedup_vs_hooks"), r.get("cpu_s"), r.get("cpu_speedup"),
                             r.get("layer_forwards"), r.get("token_layer_forwards"), reps(s["times"][key]), reps(s["cpu_times"][key])])
            md += [table(["method", "median wall s", "speed-up (wall)", "median CPU s", "speed-up (CPU)", "layer-forwards",
                          "token-layer-forwards", "wall s, each repeat", "CPU s, each repeat"], rows), ""]
            if kind == "all_heads":
                md += [f"Logits computed: hook loop {s['cost_hooks']['unembedded_logits']:,}, headint {s['unembedded_logits_headint']:,}. "
                       f"headint.scan / attribution_scan: {s['speedup_attr_vs_scan']:.1f}x wall, {s['cpu_speedup_attr_vs_scan']:.1f}x CPU; "
                       f"attribution vs exact effects correlation r = {s['attribution_exact_corr']:.3f}. Rows per batch: {s['batch_rows']}.", ""]
        elif kind == "breakdown":
            md += ["**Breakdown**", ""]
            md += [table(["what", "median wall s", "median CPU s", "token-layer-forwards", "token-layer-forwards per CPU s"],
                         [[r["what"], r["median_s"], r["cpu_s"], r["token_layer_forwards"], r["tlf_per_cpu_s"]] for r in s["rows"]]), ""]
            md += [f"Full-vocabulary logits at every position: {s['unembed_share']:.0%} of a hook-loop forward's CPU time; the blocks "
                   f"at {s['rows_big']} rows run {s['batch_gain']:.2f}x the token-layer-forwards per CPU second of {s['rows_small']} rows.", ""]
        elif kind == "transformer_lens":
            if s.get("skipped"):
                md += [f"**TransformerLens**: {s['skipped']}", ""]
                continue
            md += [f"**TransformerLens {s['version']}** ({s['api']}; checked {s['compared']}, max abs diff {s['max_abs_diff']:.2g}; "
                   f"converted-weights logits differ from HF by {s['logits_conversion_diff']:.2g})", ""]
            md += [table(["method", "median wall s", "speed-up vs TL (wall)", "median CPU s", "speed-up vs TL (CPU)"],
                         [[r["method"], r["median_s"], r["speedup_vs_tl"], r["cpu_s"], r["cpu_speedup"]] for r in s["rows"]]), ""]
        elif kind == "heads_sweep":
            md += ["**Scan time vs heads scanned** (heads of the first layers)", ""]
            md += [table(["heads", "layers", "headint wall s", "hook loop wall s", "speed-up (wall)", "headint CPU s", "hook loop CPU s",
                          "speed-up (CPU)", "repeats"],
                         [[p["heads"], p["layers"], p["headint_s"], p["hooks_s"], p["speedup"], p["headint_cpu_s"], p["hooks_cpu_s"],
                           p["cpu_speedup"], p["repeats"]] for p in s["points"]]), ""]
    return "\n".join(md)


if __name__ == "__main__":
    print("\n\n".join(render(p) for p in sys.argv[1:]))
