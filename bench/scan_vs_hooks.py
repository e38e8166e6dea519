"""Whole-model scan throughput: ``headint.scan`` against the hook loop users write today.

    python bench/scan_vs_hooks.py                    # CPU, GPT-2-small shaped, ~10 min on 2 cores
    python bench/scan_vs_hooks.py --plot             # also bench/scan_time_vs_heads.png
    python bench/scan_vs_hooks.py --device cuda      # GPT-2-medium shaped, batch 32, T=128, triton backend
    python bench/scan_vs_hooks.py --quick            # tiny model, seconds: a smoke test of every section

The model is built from its ``transformers.GPT2Config`` (random weights, seeded; no download).
Prompts are seeded random token ids; the metric is the logit difference between two fixed token
ids at the last position (``headint.metrics.LogitDiff``).

Sections (each prints a table; everything also goes to ``--out``/scan_vs_hooks.json and .csv):

all_heads     zero-ablation of every head: ``headint.scan(method="zero")`` against the hook loop,
              one full forward per head with a ``register_forward_pre_hook`` on
              ``transformer.h[l].attn.c_proj`` zeroing that head's slice of its input, full logits,
              the same metric. Before anything is reported the per-example values of both are
              compared (max abs diff).
attribution   ``headint.attribution_scan(method="mask")`` (the first-order estimate of
              zero-ablation) timed in the same interleaved loop.
per_position  the same comparison per (head, position) on a subset (default: head 0 of layers 0 and 6
              at positions 0, 4, ..., 28 and 31: 18 variants; ``--pp-layers``, ``--pp-heads``,
              ``--pp-positions``), where headint also reuses positions (KV cache of clean keys).
breakdown     where a hook-loop forward spends its time (full logits vs ``logits_to_keep=1`` vs blocks
              only) and how many token-layer-forwards per CPU second the blocks run at the hook loop's
              batch (N rows) and at a scan-like batch (``--breakdown-rows``).
transformer_lens  ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` on the same weights
              (converted with ``convert_gpt2_weights``), zero ablation through a zeroed ``hook_z``
              cache; skipped when transformer-lens is not installed.
heads_sweep   (``--plot``) scan time against the number of heads scanned, heads taken from the
              first layers, headint and hook loop; plot in ``--plot-path``.
profile       (``--profile``) torch.profiler op tables of a one-layer scan and of its hook loop,
              written to ``--out``.

Timing: each measured call is preceded by a warm-up, implementations alternate within every
repeat (the order flips every repeat), the reported figure is the median over ``--repeats`` and
the speed-up is the ratio of medians. On CUDA every timed call is bracketed by
``torch.cuda.synchronize()``.
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
    "tiny": dict(n_layer=4, n_head=4, n_embd=64, vocab_size=1000, n_positions=128),
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
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, t), generator=g)
    target, contrast = TARGET_ID % V, CONTRAST_ID % V
    return {
        "input_ids": ids.to(device),
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
    print(f"  check {name}: max |headint - baseline| = {diff:.3g} (values up to {scale:.3g}; tolerance {tol:g})")
    if not diff <= tol:
        raise SystemExit(f"FAILED: {name}: headint and the baseline disagree (max abs diff {diff:.3g} > {tol:g}); nothing reported")
    return diff


def section_all_heads(model, batch, args, rec) -> dict:
    L, H, T, N, V = model.config.n_layer, model.config.n_head, batch["input_ids"].shape[1], batch["input_ids"].shape[0], model.config.vocab_size
    pairs = [(l, h) for l in range(L) for h in range(H)]
    metric = LogitDiff()
    run_scan = lambda: headint.scan(model, batch, metric, method="zero", backend=args.backend, progress=False)
    run_hooks = lambda: hook_loop(model, batch, pairs)
    run_attr = lambda: headint.attribution_scan(model, batch, metric=metric, method="mask", backend=args.backend)
    print(f"\n[all heads] zero-ablation of {len(pairs)} heads, N={N}, T={T}: warm-up ...")
    warm_scan = headint.scan(model, batch, metric, method="zero", layers=[L - 1], backend=args.backend, progress=False)
    hook_loop(model, batch, pairs[:1])
    run_attr()
    backend_ran = headint.last_backend()
    fns = {"headint.scan": run_scan, "hook loop": run_hooks, "attribution_scan": run_attr}
    times, cpu, first = interleaved(fns, args.repeats, args.device)
    res, hooks = first["headint.scan"], first["hook loop"]
    diff = check_agree("all heads, zero ablation", headint_values(res, pairs), hooks, args.tol)

    attr = first["attribution_scan"]
    exact_eff = (res.per_example.mean(-1) - res.clean_baseline).flatten()
    attr_eff = (attr.per_example.mean(-1) - attr.clean_baseline).flatten()
    corr = float(torch.corrcoef(torch.stack([exact_eff, attr_eff]))[0, 1])

    hc = hook_loop_cost(len(pairs), N, L, T, V)
    sc = res.settings["cost"]
    m_scan, m_hook, m_attr = med(times["headint.scan"]), med(times["hook loop"]), med(times["attribution_scan"])
    c_scan, c_hook, c_attr = med(cpu["headint.scan"]), med(cpu["hook loop"]), med(cpu["attribution_scan"])
    rows = [
        dict(method="hook loop (1 forward/head)", median_s=m_hook, cpu_s=c_hook, cpu_speedup=1.0, heads_per_s=len(pairs) / m_hook, layer_forwards=hc["layer_forwards"],
             token_layer_forwards=hc["token_layer_forwards"], logits=hc["unembedded_logits"], speedup_vs_hooks=1.0),
        dict(method="headint.scan (exact)", median_s=m_scan, cpu_s=c_scan, cpu_speedup=c_hook / c_scan, heads_per_s=len(pairs) / m_scan,
             layer_forwards=sc["layer_forwards"],
             token_layer_forwards=sc["token_layer_forwards"], logits=headint_unembedded(res, N, T, V), speedup_vs_hooks=m_hook / m_scan),
        dict(method="attribution_scan (mask)", median_s=m_attr, cpu_s=c_attr, cpu_speedup=c_hook / c_attr, heads_per_s=len(pairs) / m_attr,
             layer_forwards=attr.settings["cost"]["layer_forwards"],
             token_layer_forwards=attr.settings["cost"]["token_layer_forwards"], logits=float("nan"), speedup_vs_hooks=m_hook / m_attr),
    ]
    print_table(f"all {len(pairs)} heads, zero ablation (median of {args.repeats}; backend {backend_ran})", rows,
                ["method", "median_s", "speedup_vs_hooks", "cpu_s", "cpu_speedup", "heads_per_s", "layer_forwards", "token_layer_forwards", "logits"])
    print(f"  ratio of medians hook loop / headint.scan = {m_hook / m_scan:.2f}x wall, {c_hook / c_scan:.2f}x cpu;  "
          f"headint.scan / attribution_scan = {m_scan / m_attr:.1f}x wall, {c_scan / c_attr:.1f}x cpu")
    print(f"  layer-forwards: hook loop / headint.scan = {hc['layer_forwards'] / sc['layer_forwards']:.2f}x;  "
          f"attribution vs exact effect (mean over examples) correlation r = {corr:.3f}")
    out = dict(section="all_heads", n_variants=len(pairs), N=N, T=T, backend=backend_ran, times=times, cpu_times=cpu,
               median_s={k: med(v) for k, v in times.items()}, cpu_median_s={k: med(v) for k, v in cpu.items()},
               speedup_scan_vs_hooks=m_hook / m_scan, cpu_speedup_scan_vs_hooks=c_hook / c_scan,
               speedup_attr_vs_scan=m_scan / m_attr, cpu_speedup_attr_vs_scan=c_scan / c_attr, max_abs_diff=diff, cost_headint=sc,
               cost_headint_settings_one_forward=res.settings["cost_one_forward_per_intervention"], cost_hooks=hc,
               unembedded_logits_headint=headint_unembedded(res, N, T, V), batch_rows=res.settings["batch_rows"],
               attribution_cost=attr.settings["cost"], attribution_exact_corr=corr, rows=rows)
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


def section_breakdown(model, batch, args, rec, all_heads=None) -> dict:
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
    if all_heads is not None:
        sc = all_heads["cost_headint"]["token_layer_forwards"]
        rows.append(dict(what="headint.scan, all heads (whole scan, from the all-heads section)", median_s=all_heads["median_s"]["headint.scan"],
                         cpu_s=all_heads["cpu_median_s"]["headint.scan"], token_layer_forwards=sc,
                         tlf_per_cpu_s=sc / all_heads["cpu_median_s"]["headint.scan"]))
        hc = all_heads["cost_hooks"]["token_layer_forwards"]
        rows.append(dict(what="hook loop, all heads (whole loop, from the all-heads section)", median_s=all_heads["median_s"]["hook loop"],
                         cpu_s=all_heads["cpu_median_s"]["hook loop"], token_layer_forwards=hc,
                         tlf_per_cpu_s=hc / all_heads["cpu_median_s"]["hook loop"]))
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


def _tl_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("transformer-lens")
    except Exception:
        return None


def build_transformer_lens(model, args):
    """The same weights in TransformerLens; returns (tl_model, api) with api "bridge" (TL >= 4) or "hooked" (TL < 4).

    TL >= 4 removed ``HookedTransformer``: a ``TransformerBridge`` is built around a copy of the HF
    model (``build_bridge_from_module``, no hub access; it switches the copy to eager attention).
    TL < 4: a ``HookedTransformer`` from a config, loaded with ``convert_gpt2_weights`` (no folding).
    """
    import copy

    try:
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    except ImportError:
        build_bridge_from_module = None
    if build_bridge_from_module is not None:
        tl = build_bridge_from_module(copy.deepcopy(model), "GPT2LMHeadModel", hf_config=model.config)
        return tl.eval(), "bridge"
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd,
        d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_epsilon,
        device=args.device, dtype=next(model.parameters()).dtype, default_prepend_bos=False,
    )
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(model, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    return tl.eval(), "hooked"


def section_transformer_lens(model, batch, args, rec, headint_all=None) -> dict | None:
    try:
        from transformer_lens import ActivationCache
        from transformer_lens.patching import get_act_patch_attn_head_out_all_pos
    except Exception as e:  # ImportError, or a broken install
        msg = "skipped: transformer-lens not installed (pip install headint[bench])"
        print(f"\n[transformer-lens] {msg}" + ("" if isinstance(e, ModuleNotFoundError) else f"  ({type(e).__name__}: {e})"))
        rec.append(dict(section="transformer_lens", skipped=msg, error=f"{type(e).__name__}: {e}"))
        return None
    tl, api = build_transformer_lens(model, args)
    ids = batch["input_ids"]
    with torch.no_grad():
        diff_logits = float((tl(ids) - model(ids).logits).abs().max())
        _, cache = tl.run_with_cache(ids)
    L = model.config.n_layer
    zeros = {f"blocks.{l}.attn.hook_z": torch.zeros_like(cache[f"blocks.{l}.attn.hook_z"]) for l in range(L)}
    zero_cache = ActivationCache(zeros, tl)  # zero ablation = patching a cache of zeros into the run
    del cache
    tgt, con = batch["target"], batch["contrast"]
    version = _tl_version()
    # TL >= 4 can keep per-example values (reduce="none"); older TL wants a scalar metric (the mean)
    per_example = api == "bridge"

    def tl_metric(logits):
        last = logits[:, -1].float()
        d = last.gather(1, tgt[:, None])[:, 0] - last.gather(1, con[:, None])[:, 0]
        return d if per_example else d.mean()

    kw = dict(reduce="none") if per_example else {}
    print(f"\n[transformer-lens {version}, {'TransformerBridge' if api == 'bridge' else 'HookedTransformer'}] "
          f"same weights: max |TL logits - HF logits| = {diff_logits:.3g}; warm-up ...")
    with _quiet_tqdm():
        run_tl = lambda: get_act_patch_attn_head_out_all_pos(tl, ids, zero_cache, tl_metric, **kw)
        metric = LogitDiff()
        run_scan = lambda: headint.scan(model, batch, metric, method="zero", backend=args.backend, progress=False)
        with torch.no_grad():
            tl.run_with_hooks(ids, fwd_hooks=[])
        times, cpu, first = interleaved({"headint.scan": run_scan, "transformer-lens": run_tl}, args.tl_repeats, args.device)
    res = first["transformer-lens"]
    if per_example:
        tl_vals, hi_vals, what = res.values.float().cpu(), first["headint.scan"].per_example, "per example"
    else:
        tl_vals, hi_vals, what = res.float().cpu(), first["headint.scan"].per_example.mean(-1), "mean over examples"
    diff = check_agree(f"transformer-lens get_act_patch_attn_head_out_all_pos ({what})", hi_vals, tl_vals, args.tol)
    m_scan, m_tl = med(times["headint.scan"]), med(times["transformer-lens"])
    c_scan, c_tl = med(cpu["headint.scan"]), med(cpu["transformer-lens"])
    rows = [dict(method="transformer_lens get_act_patch_attn_head_out_all_pos", median_s=m_tl, speedup_vs_tl=1.0, cpu_s=c_tl, cpu_speedup=1.0),
            dict(method="headint.scan (exact)", median_s=m_scan, speedup_vs_tl=m_tl / m_scan, cpu_s=c_scan, cpu_speedup=c_tl / c_scan)]
    if headint_all is not None:
        mh, ch = headint_all["median_s"]["hook loop"], headint_all["cpu_median_s"]["hook loop"]
        rows.append(dict(method="HF hook loop (all-heads section)", median_s=mh, speedup_vs_tl=m_tl / mh, cpu_s=ch, cpu_speedup=c_tl / ch))
    print_table(f"TransformerLens {version}, all heads, zero ablation (median of {args.tl_repeats})", rows,
                ["method", "median_s", "speedup_vs_tl", "cpu_s", "cpu_speedup"])
    out = dict(section="transformer_lens", version=version, api=api, times=times, cpu_times=cpu,
               median_s={k: med(v) for k, v in times.items()}, cpu_median_s={k: med(v) for k, v in cpu.items()},
               speedup_scan_vs_tl=m_tl / m_scan, cpu_speedup_scan_vs_tl=c_tl / c_scan, max_abs_diff=diff, compared=what,
               logits_conversion_diff=diff_logits, rows=rows)
    rec.append(out)
    return out


@contextlib.contextmanager
def _quiet_tqdm():
    """TransformerLens' patching draws a tqdm bar per call; replace it by a pass-through while timing."""
    import transformer_lens.patching as tlp

    old = getattr(tlp, "tqdm", None)
    tlp.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        tlp.tqdm = old


def section_heads_sweep(model, batch, args, rec, all_heads=None) -> dict:
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
        if all_heads is not None and k == L * H:
            t_scan, t_hook = all_heads["median_s"]["headint.scan"], all_heads["median_s"]["hook loop"]
            ct_scan, ct_hook = all_heads["cpu_median_s"]["headint.scan"], all_heads["cpu_median_s"]["hook loop"]
            reps = len(all_heads["times"]["hook loop"])
            print(f"  {k:4d} heads: reusing the all-heads medians")
        else:
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
def environment(args) -> dict:
    env = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), python=platform.python_version(),
               torch=torch.__version__, transformers=transformers.__version__, headint=headint.__version__,
               threads=torch.get_num_threads(), nproc=os.cpu_count(), cpu=platform.processor() or platform.machine(),
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
    stem = "scan_vs_hooks" if env["device"] == "cpu" else f"scan_vs_hooks_{env['device']}"
    with open(out_dir / f"{stem}.json", "w") as f:
        json.dump(dict(environment=env, sections=sections), f, indent=2, default=str)
    names = {"hook loop": "hook loop", "HF hook loop": None, "headint.scan": "headint.scan", "attribution_scan": "attribution_scan",
             "transformer_lens": "transformer-lens"}
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "method", "median_wall_s", "speedup_wall", "median_cpu_s", "speedup_cpu", "layer_forwards",
                    "token_layer_forwards", "wall_s_each_repeat", "cpu_s_each_repeat", "max_abs_diff"])
        for s in sections:
            if s["section"] == "heads_sweep":
                for p in s["points"]:
                    w.writerow([f"heads_sweep_{p['heads']}", "hook loop", p["hooks_s"], 1.0, p["hooks_cpu_s"], 1.0, "", "", "", "", ""])
                    w.writerow([f"heads_sweep_{p['heads']}", "headint.scan", p["headint_s"], p["speedup"], p["headint_cpu_s"], p["cpu_speedup"],
                                "", "", "", "", ""])
                continue
            for r in s.get("rows", []):
                method = r.get("method", r.get("what"))
                name = next((v for k, v in names.items() if method.startswith(k)), method if s["section"] == "breakdown" else None)
                reps = lambda d: ";".join(f"{t:.4f}" for t in s.get(d, {}).get(name, [])) if name else ""
                w.writerow([s["section"], method, r["median_s"], r.get("speedup_vs_hooks", r.get("speedup_vs_tl", "")), r.get("cpu_s", ""),
                            r.get("cpu_speedup", ""), r.get("layer_forwards", ""), r.get("token_layer_forwards", ""), reps("times"),
                            reps("cpu_times"), s.get("max_abs_diff", "")])
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
    ap.add_argument("--tol", type=float, help="max abs diff allowed between headint and the hook loop (default 1e-3 fp32, 5e-2 otherwise)")
    ap.add_argument("--pp-layers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 6], help="per-position subset: layers")
    ap.add_argument("--pp-heads", type=lambda s: [int(x) for x in s.split(",")], default=[0], help="per-position subset: heads")
    ap.add_argument("--pp-positions", type=lambda s: [int(x) for x in s.split(",")], help="per-position subset: positions (default every T/8-th and the last)")
    ap.add_argument("--tl-repeats", type=int, default=1, help="interleaved repeats of the TransformerLens section")
    ap.add_argument("--plot", action="store_true", help="also run the heads sweep and draw --plot-path")
    ap.add_argument("--plot-path", default=str(HERE / "scan_time_vs_heads.png"))
    ap.add_argument("--sweep-heads", type=lambda s: [int(x) for x in s.split(",")],
                    help="head counts of the sweep, multiples of the heads per layer (default H, 3H, 6H and all: 12,36,72,144 on GPT-2 small)")
    ap.add_argument("--sweep-repeats", type=int, default=1)
    ap.add_argument("--breakdown-rows", type=int, help="rows of the batched blocks-only forward in the breakdown section (default 8 N)")
    ap.add_argument("--profile", action="store_true", help="also write torch.profiler tables of a one-layer scan and its hook loop")
    ap.add_argument("--profile-layer", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: all_heads, per_position, breakdown, transformer_lens")
    ap.add_argument("--quick", action="store_true", help="tiny model, N=4, T=16, 1 repeat: a smoke test")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    if args.quick:
        args.config, args.n, args.t, args.repeats = args.config or "tiny", args.n or 4, args.t or 16, 1
        args.pp_layers, args.pp_heads = [0, 2], [0, 1]
    args.config = args.config or ("gpt2-medium" if cuda else "gpt2-small")
    args.n = args.n or (32 if cuda else 8)
    args.t = args.t or (128 if cuda else 32)
    args.breakdown_rows = args.breakdown_rows or 8 * args.n
    if args.tol is None:
        args.tol = 1e-3 if args.dtype == "float32" else 5e-2
    args.skip = {s for s in args.skip.split(",") if s}
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
    env.update(device=args.device, config=args.config, n=args.n, t=args.t, dtype=args.dtype, repeats=args.repeats,
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

    all_heads = None
    if "all_heads" not in args.skip:
        all_heads = run("all_heads", section_all_heads, model, batch, args, sections)
    if "per_position" not in args.skip:
        run("per_position", section_per_position, model, batch, args, sections)
    if "breakdown" not in args.skip:
        run("breakdown", section_breakdown, model, batch, args, sections, all_heads)
    if "transformer_lens" not in args.skip:
        run("transformer_lens", section_transformer_lens, model, batch, args, sections, all_heads)
    if args.plot:
        run("heads_sweep", section_heads_sweep, model, batch, args, sections, all_heads)
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
