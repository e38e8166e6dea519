"""Whole-model scans side by side: headint against the hook loop, TransformerLens and nnsight.

    python bench/scan_vs_hooks.py                    # CPU, GPT-2-small shaped, every section (~1 h on 2 cores)
    python bench/scan_vs_hooks.py --plot             # also bench/scan_time_vs_heads.png
    python bench/scan_vs_hooks.py --device cuda      # GPT-2-medium shaped, batch 32, T=128, triton backend
    python bench/scan_vs_hooks.py --quick            # tiny model, seconds: a smoke test of every section

Run it with the benchmark venv (``bench/README.md``) to include TransformerLens and nnsight; in a
venv without them their rows are skipped (and say so). The model is built from its
``transformers.GPT2Config`` (random weights, seeded; no download); prompts are seeded random
token ids; the metric is the logit difference of two fixed token ids at the last position.

Sections (each prints a table; everything also goes to ``--out``/scan_vs_hooks.json and .csv):

peers         every head, activation patching (denoising: the corrupted run with one head's clean
              output patched in), all implementations in one interleaved loop: the hook loop (one
              forward per head, a pre-hook on ``c_proj``), TransformerLens
              ``get_act_patch_attn_head_out_all_pos``, nnsight one trace per head, nnsight batched
              invokes (the heads of a layer in one forward), ``headint.scan`` with
              ``headint.metrics.LogitDiff`` and with a plain callable on full logits, and
              ``headint.attribution_scan``. Every exact method's per-example values are checked
              against the hook loop's first (``--tol``); medians, the ratio of every pair.
per_position  zero ablation per (head, position) on a subset (``--pp-layers``, ``--pp-heads``,
              ``--pp-positions``) against the hook loop; headint reuses positions (KV cache).
breakdown     where a hook-loop forward spends its time (full logits vs ``logits_to_keep=1`` vs blocks
              only) and how many token-layer-forwards per CPU second the blocks run at the hook loop's
              batch (N rows) and at a scan-like batch (``--breakdown-rows``).
long_context  a small model at T = 1024 and 4096 (``--long-t``): exact and attribution scans against
              the hook loop, time, peak memory and attention's share (see ``long_context.py``).
heads_sweep   (``--plot``) scan time against the number of heads scanned, heads taken from the
              first layers, headint and hook loop (zero ablation); plot in ``--plot-path``.
profile       (``--profile``) torch.profiler op tables of a one-layer scan and of its hook loop.

Timing: each measured call is preceded by a warm-up, implementations alternate within every
repeat (the order flips every repeat), the reported figure is the median over ``--repeats`` and
each speed-up is a ratio of medians. CPU seconds (all threads of the process) are reported next
to wall seconds, and the load average at start and end, because the machine may be shared. On
CUDA every timed call is bracketed by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers

import headint
from headint.metrics import LogitDiff

HERE = Path(__file__).resolve().parent
TARGET_ID, CONTRAST_ID = 464, 383  # two fixed token ids (" The", "\"" in GPT-2's vocabulary; any would do)

CONFIGS = {
    # GPT2Config() defaults: 12 layers, 12 heads, d_model 768, vocab 50257
    "gpt2-small": dict(),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    # seconds-long smoke test of every code path
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=128),
}


# ----------------------------------------------------------------------------------------------
# model, prompts, metric
# ----------------------------------------------------------------------------------------------
def build_model(config: str | dict = "gpt2-small", seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A GPT-2 LM built from its config with seeded random weights, in eval mode, no grads."""
    cfg = transformers.GPT2Config(**(CONFIGS[config] if isinstance(config, str) else config))
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def make_batch(model, n: int, t: int, seed: int = 1, device: str = "cpu") -> dict:
    """``input_ids`` ``[n, t]``, ``corrupt_ids`` (the same with every 4th token redrawn),
    ``target``/``contrast`` ``[n]`` (two fixed ids)."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, t), generator=g)
    corrupt = ids.clone()
    corrupt[:, ::4] = torch.randint(0, V, corrupt[:, ::4].shape, generator=g)
    target, contrast = TARGET_ID % V, CONTRAST_ID % V
    return {
        "input_ids": ids.to(device),
        "corrupt_ids": corrupt.to(device),
        "target": torch.full((n,), target, dtype=torch.long, device=device),
        "contrast": torch.full((n,), contrast, dtype=torch.long, device=device),
    }


def metric_from_logits(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Logit difference at the last position from full ``[N, T, V]`` logits: what a hook-loop user writes."""
    last = logits[:, -1].float()
    return last.gather(1, batch["target"][:, None])[:, 0] - last.gather(1, batch["contrast"][:, None])[:, 0]


# ----------------------------------------------------------------------------------------------
# the hook loop
# ----------------------------------------------------------------------------------------------
def _zero_head_hook(head: int, n_heads: int, position: int | None = None):
    def pre_hook(_module, args):
        (x,) = args  # [N, T, H * D]: the concatenated head outputs entering the output projection
        N, T, HD = x.shape
        x = x.clone().view(N, T, n_heads, HD // n_heads)
        if position is None:
            x[:, :, head] = 0
        else:
            x[:, position, head] = 0
        return (x.view(N, T, HD),)

    return pre_hook


@torch.no_grad()
def hook_loop(model, batch: dict, pairs, positions=None) -> torch.Tensor:
    """One full forward per (head[, position]) with a pre-hook on ``c_proj``; values ``[V, N]``.

    ``pairs``: ``(layer, head)``; ``positions``: None (whole sequence) or a list of positions,
    giving one variant per (layer, head, position) in that order.
    """
    n_heads = model.config.n_head
    variants = [(l, h, None) for l, h in pairs] if positions is None else [(l, h, p) for l, h in pairs for p in positions]
    out = []
    for l, h, p in variants:
        handle = model.transformer.h[l].attn.c_proj.register_forward_pre_hook(_zero_head_hook(h, n_heads, p))
        try:
            logits = model(batch["input_ids"]).logits
        finally:
            handle.remove()
        out.append(metric_from_logits(logits, batch))
    return torch.stack(out)


def headint_values(result, pairs, positions=None) -> torch.Tensor:
    """``ScanResult`` per-example values in the hook loop's ``[V, N]`` order."""
    pe = result.per_example
    if positions is None:
        return torch.stack([pe[l, h] for l, h in pairs])
    return torch.stack([pe[l, h, p] for l, h in pairs for p in positions])


def hook_loop_cost(n_variants: int, N: int, L: int, T: int, V: int) -> dict:
    """What one forward per intervention does: every block over every row and token, full logits."""
    return dict(runs=n_variants, layer_forwards=n_variants * N * L, token_layer_forwards=n_variants * N * L * T,
                unembedded_logits=n_variants * N * T * V)


def headint_unembedded(result, N: int, T: int, V: int) -> int:
    """Logits headint computed: the clean pass in full, then 2 ids per row (restricted) or full."""
    cost = result.settings["cost"]
    clean = N * T * V
    rows = cost["rows"] - N
    return clean + (rows * 2 if result.settings.get("restricted_logits") else rows * T * V)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str):
    """(wall seconds, process CPU seconds over all threads, fn's output)."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def interleaved(fns: dict[str, Callable], repeats: int, device: str, log=print) -> tuple[dict, dict, dict]:
    """Run every fn ``repeats`` times, alternating (order reversed on odd repeats).

    Returns ({name: [wall seconds, ...]}, {name: [CPU seconds, ...]}, {name: output of its first run}).
    CPU seconds (``time.process_time``, all threads of this process) are reported next to wall time
    because on a shared machine other processes' load inflates wall time but not our CPU time.
    """
    times: dict[str, list] = {k: [] for k in fns}
    cpu: dict[str, list] = {k: [] for k in fns}
    first: dict = {}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            dt, ct, out = timed(fns[name], device)
            times[name].append(dt)
            cpu[name].append(ct)
            first.setdefault(name, out)
            log(f"    repeat {r + 1}/{repeats}  {name:<22s} {dt:9.3f} s wall  {ct:9.3f} s cpu   (load avg {_load():.1f})")
    return times, cpu, first


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def med(xs) -> float:
    return float(statistics.median(xs))


# ----------------------------------------------------------------------------------------------
# table output
# ----------------------------------------------------------------------------------------------
def print_table(title: str, rows: list[dict], cols: list[str]) -> None:
    print(f"\n== {title}")
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e5 or (v != 0 and abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,d}"
    return str(v)


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------
def check_agree(name: str, a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    diff = float((a.float().cpu() - b.float().cpu()).abs().max())
    scale = float(b.float().abs().max())
    print(f"  check {name}: max abs diff {diff:.3g} (values up to {scale:.3g}; tolerance {tol:g})")
    if not diff <= tol:
        raise SystemExit(f"FAILED: {name}: the values disagree (max abs diff {diff:.3g} > {tol:g}); nothing reported")
    return diff


def flop_accounting(L: int, d: int, d_ffn: int, V: int, N: int, T: int, H: int) -> dict:
    """Multiply-add FLOPs (2 per MAC) of an all-heads patching scan on a GPT-2 block stack.

    Per token and block: q/k/v ``6 d^2``, output projection ``2 d^2``, MLP ``4 d d_ffn``;
    attention of a query at position ``t``: ``4 d (t + 1)`` (scores and weighted sum, causal).

    - ``hook_loop``: per head, every block over every token, then full-vocabulary logits at
      every position (``2 d V`` per token), plus one clean forward;
    - ``headint``: what ``headint.scan`` runs: two clean passes with full logits; per layer one
      capture of the clean rows' q/k/v (and attention, where the capture stops); a head of layer
      ``l`` runs block ``l`` without q/k/v and attention (both are the clean run's) but with its
      output projection and MLP over every token, blocks ``l+1 .. L-2`` in full and the final
      block as q/k/v over all tokens plus everything for the last token (for ``l = L-1``: the
      last token's q/k/v, output projection and MLP); 2 logits per row;
    - ``minimum``: what an exact scan must compute: the same without the q/k/v of block ``l``,
      without the final block's queries except the last, and without full-vocabulary logits.
    """
    per_tok = 6 * d * d + 2 * d * d + 4 * d * d_ffn
    attn = sum(4 * d * (t + 1) for t in range(T))  # all queries of one row, one block
    full_block = T * per_tok + attn
    logits_all = 2 * d * V * T
    qkv, kv, q = 6 * d * d, 4 * d * d, 2 * d * d
    rest = per_tok - qkv  # output projection and MLP
    hook = H * L * N * (L * full_block + logits_all) + N * (L * full_block)
    hi = mn = 0
    for l in range(L):
        if l < L - 1:
            # block l: output projection and MLP; blocks in between: everything; final block:
            # q/k/v of every token, then the last token in full
            runs = T * rest + (L - 2 - l) * full_block + T * qkv + per_tok + 4 * d * T
            need = T * rest + (L - 2 - l) * full_block + T * kv + q + rest + 4 * d * T
        else:  # the final block is the intervened one: its attention and q/k/v are the clean ones
            runs = per_tok
            need = rest
        hi += H * N * (runs + 2 * 2 * d) + N * (T * qkv + attn)  # + the capture of layer l's q/k/v
        mn += H * N * (need + 2 * 2 * d)
    hi += 2 * N * (L * full_block + logits_all)
    mn += 2 * N * (L * full_block + 2 * 2 * d)
    return dict(hook_loop=hook, headint=hi, minimum=mn, hook_over_headint=hook / hi, hook_over_minimum=hook / mn,
                headint_over_minimum=hi / mn)


PEER_NAMES = ("hook loop", "transformer-lens", "nnsight (trace per head)", "nnsight (batched invokes)",
              "headint.scan LogitDiff", "headint.scan callable", "headint.scan LogitDiff, backend sdpa", "attribution_scan")


def section_peers(model, batch, args, rec) -> dict:
    """All heads, activation patching (denoising), every implementation in one interleaved loop."""
    import peers

    L, H, T, N, V = model.config.n_layer, model.config.n_head, batch["input_ids"].shape[1], batch["input_ids"].shape[0], model.config.vocab_size
    clean, corrupt = batch["input_ids"], batch["corrupt_ids"]
    tgt, con = int(batch["target"][0]), int(batch["contrast"][0])
    hi_clean = {"input_ids": clean, "target": batch["target"], "contrast": batch["contrast"]}
    hi_corrupt = {"input_ids": corrupt, "target": batch["target"], "contrast": batch["contrast"]}
    callable_metric = lambda logits: logits[:, -1, tgt] - logits[:, -1, con]  # noqa: E731 - what a user writes
    scan_kw = dict(corrupt=hi_corrupt, method="patch", direction="denoising", backend=args.backend, progress=False)
    fns = {
        "hook loop": lambda: peers.hook_loop(model, clean, corrupt, tgt, con),
        "headint.scan LogitDiff": lambda: headint.scan(model, hi_clean, LogitDiff(), **scan_kw),
        "headint.scan callable": lambda: headint.scan(model, hi_clean, callable_metric, **scan_kw),
        "attribution_scan": lambda: headint.attribution_scan(model, hi_clean, hi_corrupt, LogitDiff(), method="patch",
                                                             direction="denoising", backend=args.backend),
    }
    if args.backend == "auto" and args.device == "cpu":  # what auto's choice of kernel costs here
        fns["headint.scan LogitDiff, backend sdpa"] = lambda: headint.scan(model, hi_clean, LogitDiff(), **dict(scan_kw, backend="sdpa"))
    versions = peers.available()
    skipped = {}
    if "transformer_lens" in args.skip_peers:
        skipped["transformer-lens"] = "--skip-peers"
    elif versions["transformer_lens"] is None:
        skipped["transformer-lens"] = "not installed (see bench/README.md)"
    else:
        tl = peers.build_transformer_lens(model)
        fns["transformer-lens"] = lambda: peers.transformer_lens(tl, clean, corrupt, tgt, con)
    if "nnsight" in args.skip_peers:
        skipped["nnsight"] = "--skip-peers"
    elif versions["nnsight"] is None:
        skipped["nnsight"] = "not installed (see bench/README.md)"
    else:
        nn_model, lm = peers.wrap_nnsight(model), peers.wrap_nnsight_language_model(model)
        fns["nnsight (trace per head)"] = lambda: peers.nnsight_per_head(nn_model, clean, corrupt, tgt, con)
        fns["nnsight (batched invokes)"] = lambda: peers.nnsight_batched(lm, clean, corrupt, tgt, con)
    fns = {k: fns[k] for k in PEER_NAMES if k in fns}
    for k, why in skipped.items():
        print(f"  {k}: skipped, {why}")
    print(f"\n[peers] all {L * H} heads, activation patching (denoising), N={N}, T={T}: warm-up (one call each) ...")
    warm = {k: f() for k, f in fns.items()}  # also the values checked below
    headint.scan(model, hi_clean, LogitDiff(), **dict(scan_kw, layers=[L - 1]))
    backend_ran = headint.last_backend()
    ref = warm["hook loop"]

    def values(name, out):
        if name.startswith("headint.scan"):
            return out.per_example.reshape(L * H, N)
        if name == "attribution_scan":
            return None  # an estimate, compared by correlation below
        return out

    diffs = {}
    for k, out in warm.items():
        v = values(k, out)
        if v is not None and k != "hook loop":
            diffs[k] = check_agree(f"{k} vs hook loop", v, ref, args.tol)
    paths = {k: dict(metric_logits=warm[k].settings["metric_logits"], final_block=warm[k].settings["final_block"])
             for k in warm if k.startswith("headint.scan")}
    exact_eff = (warm["headint.scan LogitDiff"].per_example.mean(-1) - warm["headint.scan LogitDiff"].corrupt_baseline).flatten()
    attr_eff = (warm["attribution_scan"].per_example.mean(-1) - warm["attribution_scan"].corrupt_baseline).flatten()
    corr = float(torch.corrcoef(torch.stack([exact_eff, attr_eff]))[0, 1])
    times, cpu, _ = interleaved(fns, args.repeats, args.device)
    m = {k: med(v) for k, v in times.items()}
    c = {k: med(v) for k, v in cpu.items()}
    sc = warm["headint.scan LogitDiff"].settings["cost"]
    hc = hook_loop_cost(L * H, N, L, T, V)
    rows = [dict(method=k, median_s=m[k], speedup_vs_hooks=m["hook loop"] / m[k], cpu_s=c[k], cpu_speedup=c["hook loop"] / c[k],
                 max_abs_diff=diffs.get(k, 0.0 if k == "hook loop" else float("nan"))) for k in fns]
    print_table(f"all {L * H} heads, activation patching (median of {args.repeats}; headint backend {backend_ran})", rows,
                ["method", "median_s", "speedup_vs_hooks", "cpu_s", "cpu_speedup", "max_abs_diff"])
    names = list(fns)
    ratios = {a: {b: m[b] / m[a] for b in names} for a in names}  # ratios[a][b]: how many times faster a is than b
    print("\n  ratio of medians (row is this many times faster than column):")
    print("  " + " " * 28 + "".join(f"{b[:14]:>15s}" for b in names))
    for a in names:
        print(f"  {a[:28]:<28s}" + "".join(f"{ratios[a][b]:15.2f}" for b in names))
    baselines = [k for k in ("hook loop", "transformer-lens", "nnsight (trace per head)", "nnsight (batched invokes)") if k in m]
    fastest = min(baselines, key=lambda k: m[k])
    print(f"  fastest of {baselines}: {fastest} ({m[fastest]:.1f} s); headint LogitDiff {m[fastest] / m['headint.scan LogitDiff']:.2f}x, "
          f"callable {m[fastest] / m['headint.scan callable']:.2f}x faster than it")
    print(f"  paths: {paths}; attribution vs exact effect correlation r = {corr:.3f}")
    c_ = model.config
    flops = flop_accounting(L, c_.n_embd, c_.n_inner or 4 * c_.n_embd, V, N, T, H)
    print(f"  FLOPs: hook loop {flops['hook_loop']:.3g}, headint.scan {flops['headint']:.3g}, minimum of an exact scan "
          f"{flops['minimum']:.3g}: hook loop / headint {flops['hook_over_headint']:.2f}x, hook loop / minimum "
          f"{flops['hook_over_minimum']:.2f}x")
    out = dict(section="peers", n_variants=L * H, N=N, T=T, backend=backend_ran, versions=versions, skipped=skipped, times=times,
               cpu_times=cpu, median_s=m, cpu_median_s=c, ratios=ratios, fastest_baseline=fastest,
               speedup_logitdiff_vs_fastest=m[fastest] / m["headint.scan LogitDiff"],
               speedup_callable_vs_fastest=m[fastest] / m["headint.scan callable"], max_abs_diff=diffs, paths=paths,
               cost_headint=sc, cost_hooks=hc, batch_rows=warm["headint.scan LogitDiff"].settings["batch_rows"],
               attribution_cost=warm["attribution_scan"].settings["cost"], attribution_exact_corr=corr, flops=flops, rows=rows)
    rec.append(out)
    return out


def section_per_position(model, batch, args, rec) -> dict:
    L, H, T, N, V = model.config.n_layer, model.config.n_head, batch["input_ids"].shape[1], batch["input_ids"].shape[0], model.config.vocab_size
    layers = [l for l in args.pp_layers if l < L]
    heads = [h for h in args.pp_heads if h < H]
    positions = [p for p in (args.pp_positions or list(range(0, T, max(1, T // 8))) + [T - 1]) if p < T]
    positions = sorted(set(positions))
    pairs = [(l, h) for l in layers for h in heads]
    nv = len(pairs) * len(positions)
    metric = LogitDiff()
    run_scan = lambda: headint.scan(model, batch, metric, method="zero", per_position=True, layers=layers, heads=heads,
                                    positions=positions, backend=args.backend, progress=False)
    run_hooks = lambda: hook_loop(model, batch, pairs, positions)
    print(f"\n[per position] layers {layers} x heads {heads} x positions {positions} = {nv} variants: warm-up ...")
    headint.scan(model, batch, metric, method="zero", per_position=True, layers=layers[-1:], heads=heads[:1], positions=positions[-1:],
                 backend=args.backend, progress=False)
    times, cpu, first = interleaved({"headint.scan": run_scan, "hook loop": run_hooks}, args.repeats, args.device)
    res, hooks = first["headint.scan"], first["hook loop"]
    diff = check_agree("per position, zero ablation", headint_values(res, pairs, positions), hooks, args.tol)
    hc = hook_loop_cost(nv, N, L, T, V)
    sc = res.settings["cost"]
    m_scan, m_hook = med(times["headint.scan"]), med(times["hook loop"])
    c_scan, c_hook = med(cpu["headint.scan"]), med(cpu["hook loop"])
    rows = [
        dict(method="hook loop (1 forward/variant)", median_s=m_hook, cpu_s=c_hook, cpu_speedup=1.0, variants_per_s=nv / m_hook, layer_forwards=hc["layer_forwards"],
             token_layer_forwards=hc["token_layer_forwards"], speedup_vs_hooks=1.0),
        dict(method="headint.scan (exact)", median_s=m_scan, cpu_s=c_scan, cpu_speedup=c_hook / c_scan, variants_per_s=nv / m_scan,
             layer_forwards=sc["layer_forwards"],
             token_layer_forwards=sc["token_layer_forwards"], speedup_vs_hooks=m_hook / m_scan),
    ]
    print_table(f"per position: {nv} (head, position) variants (median of {args.repeats}; position reuse "
                f"{res.settings['position_reuse']})", rows,
                ["method", "median_s", "speedup_vs_hooks", "cpu_s", "cpu_speedup", "variants_per_s", "layer_forwards", "token_layer_forwards"])
    print(f"  token-layer-forwards: hook loop / headint.scan = {hc['token_layer_forwards'] / sc['token_layer_forwards']:.2f}x")
    out = dict(section="per_position", layers=layers, heads=heads, positions=positions, n_variants=nv, N=N, T=T, times=times,
               cpu_times=cpu, median_s={k: med(v) for k, v in times.items()}, cpu_median_s={k: med(v) for k, v in cpu.items()},
               speedup_scan_vs_hooks=m_hook / m_scan, cpu_speedup_scan_vs_hooks=c_hook / c_scan, max_abs_diff=diff,
               cost_headint=sc, cost_hooks=hc, position_reuse=res.settings["position_reuse"], rows=rows)
    rec.append(out)
    return out


def section_breakdown(model, batch, args, rec, peers_out=None) -> dict:
    """Where the hook loop's time goes, and how fast the blocks run at the hook loop's batch vs a scan's."""
    ids = batch["input_ids"]
    N, T = ids.shape
    L = model.config.n_layer
    big = ids.repeat(args.breakdown_rows // N, 1)
    R = big.shape[0]

    @torch.no_grad()
    def call(f):
        return lambda: f()

    fns = {
        f"full forward, {N} rows (hook-loop unit)": call(lambda: model(ids).logits),
        f"full forward, {N} rows, logits_to_keep=1": call(lambda: model(ids, logits_to_keep=1).logits),
        f"blocks only (model.transformer), {N} rows": call(lambda: model.transformer(ids, use_cache=False).last_hidden_state),
        f"blocks only (model.transformer), {R} rows": call(lambda: model.transformer(big, use_cache=False).last_hidden_state),
    }
    tlf = {k: (R if f"{R} rows" in k else N) * L * T for k in fns}
    print(f"\n[breakdown] one forward at the hook loop's batch ({N} rows) and the blocks at {R} rows: warm-up ...")
    for f in fns.values():
        f()
    times, cpu, _ = interleaved(fns, args.repeats, args.device)
    rows = [dict(what=k, median_s=med(times[k]), cpu_s=med(cpu[k]), token_layer_forwards=tlf[k],
                 tlf_per_cpu_s=tlf[k] / med(cpu[k])) for k in fns]
    if peers_out is not None:
        for key, cost in (("headint.scan LogitDiff", peers_out["cost_headint"]), ("hook loop", peers_out["cost_hooks"])):
            tl = cost["token_layer_forwards"]
            rows.append(dict(what=f"{key}, all heads, patching (whole scan, from the peers section)", median_s=peers_out["median_s"][key],
                             cpu_s=peers_out["cpu_median_s"][key], token_layer_forwards=tl, tlf_per_cpu_s=tl / peers_out["cpu_median_s"][key]))
    print_table(f"breakdown (median of {args.repeats}); tlf = token-layer-forwards", rows,
                ["what", "median_s", "cpu_s", "token_layer_forwards", "tlf_per_cpu_s"])
    k_full, k_keep, k_blocks, k_big = list(fns)
    unembed_share = 1 - med(cpu[k_keep]) / med(cpu[k_full])
    batch_gain = (tlf[k_big] / med(cpu[k_big])) / (tlf[k_blocks] / med(cpu[k_blocks]))
    print(f"  full-vocabulary logits at every position: {unembed_share:.0%} of a hook-loop forward's CPU time; "
          f"blocks at {R} rows run {batch_gain:.2f}x more token-layer-forwards per CPU second than at {N} rows")
    out = dict(section="breakdown", rows=rows, times=times, cpu_times=cpu, unembed_share=unembed_share, batch_gain=batch_gain,
               rows_small=N, rows_big=R)
    rec.append(out)
    return out


def section_profile(model, batch, args, out_dir: Path) -> None:
    """torch.profiler op tables of a one-layer scan and of the hook loop over the same heads (--profile)."""
    from torch.profiler import ProfilerActivity, profile

    L, H = model.config.n_layer, model.config.n_head
    layer = args.profile_layer
    pairs = [(layer, h) for h in range(H)]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    metric = LogitDiff()
    headint.scan(model, batch, metric, method="zero", layers=[layer], backend=args.backend, progress=False)  # warm-up
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, fn in (("headint_scan", lambda: headint.scan(model, batch, metric, method="zero", layers=[layer], backend=args.backend, progress=False)),
                     ("hook_loop", lambda: hook_loop(model, batch, pairs))):
        with profile(activities=acts) as prof:
            fn()
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        path = out_dir / f"profile_{name}_layer{layer}_{args.device}.txt"
        path.write_text(table)
        print(f"\n[profile] {name}, the {H} heads of layer {layer} (top ops by {sort}; full table in {path})")
        print("\n".join(table.splitlines()[:18]))


def section_heads_sweep(model, batch, args, rec) -> dict:
    """Scan time against the number of heads scanned, heads from the first layers on."""
    L, H = model.config.n_layer, model.config.n_head
    counts = [k for k in (args.sweep_heads or [H, 3 * H, 6 * H, L * H]) if k <= L * H]
    metric = LogitDiff()
    points = []
    print(f"\n[heads sweep] heads from the first layers: {counts}")
    for k in counts:
        pairs = [(l, h) for l in range(L) for h in range(H)][:k]
        layers = sorted({l for l, _ in pairs})
        if k % H:
            raise SystemExit(f"--sweep-heads: {k} is not a multiple of the {H} heads per layer")
        run_scan = lambda: headint.scan(model, batch, metric, method="zero", layers=layers, backend=args.backend, progress=False)
        run_hooks = lambda: hook_loop(model, batch, pairs)
        times, cpu, first = interleaved({"headint.scan": run_scan, "hook loop": run_hooks}, args.sweep_repeats, args.device,
                                        log=lambda s: print("  " + s.strip()))
        check_agree(f"{k} heads", headint_values(first["headint.scan"], pairs), first["hook loop"], args.tol)
        t_scan, t_hook, reps = med(times["headint.scan"]), med(times["hook loop"]), args.sweep_repeats
        ct_scan, ct_hook = med(cpu["headint.scan"]), med(cpu["hook loop"])
        points.append(dict(heads=k, layers=f"0-{layers[-1]}", headint_s=t_scan, hooks_s=t_hook, speedup=t_hook / t_scan,
                           headint_cpu_s=ct_scan, hooks_cpu_s=ct_hook, cpu_speedup=ct_hook / ct_scan, repeats=reps))
    print_table("scan time vs heads scanned (heads of the first layers)", points,
                ["heads", "layers", "headint_s", "hooks_s", "speedup", "headint_cpu_s", "hooks_cpu_s", "cpu_speedup", "repeats"])
    out = dict(section="heads_sweep", points=points)
    rec.append(out)
    if args.plot_path:
        plot_sweep(points, args.plot_path, title=args.model_title)
    return out


def plot_sweep(points: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["heads"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, suffix, what in ((axes[0], "_s", "wall time"), (axes[1], "_cpu_s", "process CPU time (all threads)")):
        hooks = [p["hooks" + suffix] for p in points]
        hi = [p["headint" + suffix] for p in points]
        ax.plot(x, hooks, "o-", label="hook loop (one forward per head)")
        ax.plot(x, hi, "s-", label="headint.scan (batched, depth reuse)")
        for xi, h, y in zip(x, hooks, hi):
            ax.annotate(f"{h / y:.1f}x", (xi, y), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
        ax.set_xlabel("heads scanned (zero ablation; all heads of layers 0..k)")
        ax.set_ylabel(f"{what} (s), median")
        ax.set_xticks(x)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(what, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"  plot written to {path}")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args) -> dict:
    import peers

    env = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), python=platform.python_version(),
               torch=torch.__version__, transformers=transformers.__version__, headint=headint.__version__,
               peers=peers.available(), threads=torch.get_num_threads(), nproc=os.cpu_count(), cpu=cpu_model(),
               load_avg_start=_load(), argv=sys.argv)
    try:
        env["git_commit"] = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, timeout=10).stdout.strip()
        env["git_dirty"] = bool(subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no"],
                                               capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:
        env["git_commit"] = None
    if torch.device(args.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_outputs(out_dir: Path, env: dict, sections: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ("scan_vs_hooks" if env["device"] == "cpu" else f"scan_vs_hooks_{env['device']}") + env.get("stem_suffix", "")
    with open(out_dir / f"{stem}.json", "w") as f:
        json.dump(dict(environment=env, sections=sections), f, indent=2, default=str)
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "T", "method", "median_wall_s", "speedup_vs_hooks_wall", "median_cpu_s", "speedup_vs_hooks_cpu",
                    "max_abs_diff", "peak_mem_mib", "attention_share"])
        for s in sections:
            if s["section"] == "heads_sweep":
                for p in s["points"]:
                    w.writerow([f"heads_sweep_{p['heads']}", "", "hook loop", p["hooks_s"], 1.0, p["hooks_cpu_s"], 1.0, "", "", ""])
                    w.writerow([f"heads_sweep_{p['heads']}", "", "headint.scan", p["headint_s"], p["speedup"], p["headint_cpu_s"],
                                p["cpu_speedup"], "", "", ""])
                continue
            for r in s.get("rows", []):
                w.writerow([s["section"], r.get("T", s.get("T", "")), r.get("method", r.get("what")), r["median_s"],
                            r.get("speedup_vs_hooks", ""), r.get("cpu_s", ""), r.get("cpu_speedup", ""),
                            r.get("max_abs_diff", s.get("max_abs_diff", "") if not isinstance(s.get("max_abs_diff"), dict) else ""),
                            r.get("peak_mem_mib", ""), r.get("attention_share", "")])
    print(f"\nresults written to {out_dir / (stem + '.json')} and {out_dir / (stem + '.csv')}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", choices=list(CONFIGS), help="model shape (default gpt2-small on cpu, gpt2-medium on cuda)")
    ap.add_argument("--n", type=int, help="prompts (default 8 on cpu, 32 on cuda)")
    ap.add_argument("--t", type=int, help="tokens per prompt (default 32 on cpu, 128 on cuda)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the all-heads and per-position sections")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on cpu")
    ap.add_argument("--backend", default="auto", help="headint attention backend (auto: triton on CUDA, the fastest available on CPU)")
    ap.add_argument("--tol", type=float, help="max abs diff allowed between any exact method and the hook loop (default 1e-5 fp32, 5e-2 otherwise)")
    ap.add_argument("--pp-layers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 6], help="per-position subset: layers")
    ap.add_argument("--pp-heads", type=lambda s: [int(x) for x in s.split(",")], default=[0], help="per-position subset: heads")
    ap.add_argument("--pp-positions", type=lambda s: [int(x) for x in s.split(",")], help="per-position subset: positions (default every T/8-th and the last)")
    ap.add_argument("--skip-peers", default="", help="comma-separated peers left out of the peers section: transformer_lens, nnsight")
    ap.add_argument("--long-t", type=lambda s: [int(x) for x in s.split(",")], help="long-context lengths (default 1024,4096)")
    ap.add_argument("--long-n", type=int, default=2, help="long-context prompts")
    ap.add_argument("--long-repeats", type=int, default=1, help="interleaved repeats of the long-context section")
    ap.add_argument("--long-tol", type=float, default=1e-4, help="max abs diff allowed between headint and the hook loop at long context")
    ap.add_argument("--stem-suffix", default="", help="appended to the output files' stem (e.g. _quick)")
    ap.add_argument("--plot", action="store_true", help="also run the heads sweep and draw --plot-path")
    ap.add_argument("--plot-path", default=str(HERE / "scan_time_vs_heads.png"))
    ap.add_argument("--sweep-heads", type=lambda s: [int(x) for x in s.split(",")],
                    help="head counts of the sweep, multiples of the heads per layer (default H, 3H, 6H and all: 12,36,72,144 on GPT-2 small)")
    ap.add_argument("--sweep-repeats", type=int, default=1)
    ap.add_argument("--breakdown-rows", type=int, help="rows of the batched blocks-only forward in the breakdown section (default 8 N)")
    ap.add_argument("--profile", action="store_true", help="also write torch.profiler tables of a one-layer scan and its hook loop")
    ap.add_argument("--profile-layer", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: peers, per_position, breakdown, long_context")
    ap.add_argument("--quick", action="store_true", help="tiny model, N=4, T=16, 1 repeat: a smoke test")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    if args.quick:
        args.config, args.n, args.t, args.repeats = args.config or "tiny", args.n or 2, args.t or 8, 1
        args.pp_layers, args.pp_heads, args.pp_positions = [0, 1], [0], args.pp_positions or [0, 7]
        args.long_t, args.long_n = args.long_t or [32], 1
    args.config = args.config or ("gpt2-medium" if cuda else "gpt2-small")
    args.n = args.n or (32 if cuda else 8)
    args.t = args.t or (128 if cuda else 32)
    args.breakdown_rows = args.breakdown_rows or 8 * args.n
    if args.tol is None:
        args.tol = 1e-5 if args.dtype == "float32" else 5e-2
    args.long_t = args.long_t or [1024, 4096]
    args.skip = {s for s in args.skip.split(",") if s}
    args.skip_peers = {s for s in args.skip_peers.split(",") if s}
    if not args.plot:
        args.plot_path = None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.config, device=args.device, dtype=dtype)
    batch = make_batch(model, args.n, args.t, device=args.device)
    c = model.config
    args.model_title = (f"{args.config}-shaped GPT-2 ({c.n_layer} layers x {c.n_head} heads, d_model {c.n_embd}), "
                        f"N={args.n}, T={args.t}, {args.device}, {torch.get_num_threads() if args.device == 'cpu' else ''}"
                        f"{' threads' if args.device == 'cpu' else ''}").rstrip(", ")
    env = environment(args)
    env.update(stem_suffix=args.stem_suffix, device=args.device, config=args.config, n=args.n, t=args.t, dtype=args.dtype, repeats=args.repeats,
               model=dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size),
               backends_available=headint.available_backends(args.device))
    print(f"headint {headint.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; {args.model_title}; "
          f"backends available: {env['backends_available']}; git {env.get('git_commit')}")
    t_start = time.perf_counter()
    sections: list[dict] = []
    elapsed: dict[str, float] = {}
    env["section_elapsed_s"] = elapsed

    def run(name, fn, *a):
        t0 = time.perf_counter()
        try:
            return fn(*a)
        finally:
            elapsed[name] = time.perf_counter() - t0
            env["load_avg_end"] = _load()
            write_outputs(Path(args.out), env, sections)  # after every section: a long run keeps what it finished

    peers_out = None
    if "peers" not in args.skip:
        peers_out = run("peers", section_peers, model, batch, args, sections)
    if "per_position" not in args.skip:
        run("per_position", section_per_position, model, batch, args, sections)
    if "breakdown" not in args.skip:
        run("breakdown", section_breakdown, model, batch, args, sections, peers_out)
    if "long_context" not in args.skip:
        from long_context import section_long_context

        run("long_context", section_long_context, args, sections, interleaved, med, check_agree, print_table)
    if args.plot:
        run("heads_sweep", section_heads_sweep, model, batch, args, sections)
    if args.profile:
        run("profile", section_profile, model, batch, args, Path(args.out))
    env["total_s"] = time.perf_counter() - t_start
    env["load_avg_end"] = _load()
    print(f"\ntotal {env['total_s']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in elapsed.items())
          + f"; load average at start {env['load_avg_start']:.1f}, at end {env['load_avg_end']:.1f})")
    write_outputs(Path(args.out), env, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
