"""What each of the exact scan's shortcuts saves, measured by switching them off one at a time.

    python bench/speed_paths.py                      # GPT-2 small N=8 T=32, and the long-context model at T=1024
    python bench/speed_paths.py --quick

Also: per-position scans with ``group_positions`` 1, 2, 4, 8 (does batching neighbouring start
positions pay on this device?).

The all-heads activation-patching scan (``LogitDiff``) runs interleaved with every combination of
the runner's shortcuts (``headint.scan(shortcuts=...)``, :class:`headint.scans.shortcuts.Shortcuts`: the clean attention at each variant's
first intervened layer, the final block for the last query only), and a callable metric with
the last-position probe on and off (``CallableMetric(probe_last=False)``), and on CPU with the
cap of tokens per forward lifted (``batching.CPU_TOKENS_PER_FORWARD``: memory-sized batches). Values are checked
equal across all of them (they are exact either way); medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import headint
import headint.scans.batching as batching
from headint.metrics import CallableMetric, LogitDiff

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from long_context import build_long_model  # noqa: E402
from scan_vs_hooks import _load, build_model, environment, interleaved, make_batch, med, print_table  # noqa: E402

COMBOS = {
    "all shortcuts": dict(clean_attention=True, last_query=True),
    "no clean attention": dict(clean_attention=False, last_query=True),
    "no last-query block": dict(clean_attention=True, last_query=False),
    "neither": dict(clean_attention=False, last_query=False),
}


def _uncapped(fn):
    def run():
        saved = batching.CPU_TOKENS_PER_FORWARD
        batching.CPU_TOKENS_PER_FORWARD = 1 << 40
        try:
            return fn()
        finally:
            batching.CPU_TOKENS_PER_FORWARD = saved
    return run


def measure(model, batch: dict, args, label: str) -> dict:
    hi_clean = {k: batch[k] for k in ("input_ids", "target", "contrast")}
    hi_corrupt = dict(hi_clean, input_ids=batch["corrupt_ids"])
    tgt, con = int(batch["target"][0]), int(batch["contrast"][0])
    fn = lambda logits: logits[:, -1, tgt] - logits[:, -1, con]  # noqa: E731
    kw = dict(corrupt=hi_corrupt, method="patch", backend=args.backend, progress=False)
    fns = {f"LogitDiff, {k}": (lambda v=v: headint.scan(model, hi_clean, LogitDiff(), shortcuts=v, **kw)) for k, v in COMBOS.items()}
    if args.device == "cpu":  # the CPU cap of tokens per forward lifted: memory-sized batches
        fns["LogitDiff, all shortcuts, memory-sized batches"] = _uncapped(lambda: headint.scan(model, hi_clean, LogitDiff(), **kw))
    fns["callable, probed"] = lambda: headint.scan(model, hi_clean, fn, **kw)
    fns["callable, probe_last=False"] = lambda: headint.scan(model, hi_clean, CallableMetric(fn, probe_last=False), **kw)
    print(f"\n[{label}] warm-up and value checks ...")
    first = {k: f() for k, f in fns.items()}
    ref = first["LogitDiff, all shortcuts"].per_example
    diffs = {k: float((r.per_example - ref).abs().max()) for k, r in first.items()}
    for k, d in diffs.items():
        if not d <= args.tol:
            raise SystemExit(f"FAILED: {k} differs from the scan with all shortcuts by {d:.3g}")
    times, cpu, _ = interleaved(fns, args.repeats, args.device)
    base = med(times["LogitDiff, neither"])
    rows = [dict(method=k, median_s=med(times[k]), cpu_s=med(cpu[k]), speedup_vs_neither=base / med(times[k]), max_abs_diff=diffs[k],
                 token_layer_forwards=first[k].settings["cost"]["token_layer_forwards"], batch_rows=first[k].settings["batch_rows"])
            for k in fns]
    print_table(f"{label} (median of {args.repeats})", rows, ["method", "median_s", "cpu_s", "speedup_vs_neither", "max_abs_diff",
                                                                "token_layer_forwards", "batch_rows"])
    return dict(label=label, N=int(batch["input_ids"].shape[0]), T=int(batch["input_ids"].shape[1]), times=times, cpu_times=cpu,
                rows=rows)


def measure_grouping(model, batch: dict, args, label: str, groups=(1, 2, 4, 8)) -> dict:
    """Per-position scans (zero ablation, heads 0 of layers 0 and L/2, every position) with
    ``group_positions`` in ``groups``: fewer, bigger runs against a few more tokens each."""
    L = model.config.n_layer
    kw = dict(method="zero", per_position=True, layers=[0, L // 2], heads=[0], backend=args.backend, progress=False)
    fns = {f"group_positions={g}": (lambda g=g: headint.scan(model, batch, LogitDiff(), group_positions=g, **kw)) for g in groups}
    print(f"\n[{label}] warm-up and value checks ...")
    first = {k: f() for k, f in fns.items()}
    ref = first["group_positions=1"].per_example
    for k, r in first.items():
        same_nan = torch.equal(torch.isnan(r.per_example), torch.isnan(ref))  # unscanned cells
        d = float((r.per_example - ref).nan_to_num(0.0).abs().max()) if same_nan else float("inf")
        if not d <= args.tol:
            raise SystemExit(f"FAILED: {k} differs from group_positions=1 by {d:.3g}")
    times, cpu, _ = interleaved(fns, args.repeats, args.device)
    base = med(times["group_positions=1"])
    rows = [dict(method=k, median_s=med(times[k]), cpu_s=med(cpu[k]), speedup_vs_ungrouped=base / med(times[k]),
                 runs=first[k].settings["cost"]["runs"], token_layer_forwards=first[k].settings["cost"]["token_layer_forwards"])
            for k in fns]
    print_table(f"{label} (median of {args.repeats})", rows, ["method", "median_s", "cpu_s", "speedup_vs_ungrouped", "runs",
                                                                "token_layer_forwards"])
    return dict(label=label, times=times, cpu_times=cpu, rows=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-t", type=int, default=1024)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "speed_paths.json"))
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    args.stem_suffix = ""
    env = environment(args)
    out = []
    config, n, t = ("tiny", 2, 8) if args.quick else ("gpt2-small", 8, 32)
    model = build_model(config, device=args.device)
    out.append(measure(model, make_batch(model, n, t, device=args.device), args, f"{config} N={n} T={t}"))
    out.append(measure_grouping(model, make_batch(model, n, t, device=args.device), args, f"per-position grouping, {config} N={n} T={t}"))
    T = 64 if args.quick else args.long_t
    long_model = build_long_model(args.device, T)
    out.append(measure(long_model, make_batch(long_model, 2, T, device=args.device), args, f"long-context model N=2 T={T}"))
    env["load_avg_end"] = _load()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(environment=env, sections=out), indent=2, default=str))
    print(f"\nload average {env['load_avg_start']:.1f} at start, {env['load_avg_end']:.1f} at end; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
