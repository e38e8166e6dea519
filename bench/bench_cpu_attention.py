"""The attention op on CPU: the native kernel against torch SDPA (and ``auto``, and the reference).

    python bench/bench_cpu_attention.py                       # T = 256 ... 8192, everything (~20 min idle)
    python bench/bench_cpu_attention.py --results bench/RESULTS.md   # the same, and rewrite its section there
    python bench/bench_cpu_attention.py --threads 1 --timer cpu      # robust on a busy machine
    python bench/bench_cpu_attention.py --lengths 1024 --cases none --modes fwd --repeats 3

Shapes: B=1, H=8, D=64 (``--B --H --D``), fp32 (``--dtype``), causal, T in ``--lengths``.

Cases: ``none`` (no intervention), ``headmask`` (per-row head masks ``[B, H, T]`` in [0, 1] with a
patch ``[B, H, T, D]``), ``knockout`` (a compact knockout: random query selector x random key
selector per (b, h); key 0 is never selected, so no row loses every key).
Modes: ``fwd`` (no grad) and ``fwdbwd`` (forward + backward w.r.t. q, k, v and the float interventions).

Implementations (``--impls``):

- ``cpu``: ``headint.attention(..., backend="cpu")``, the fused C++ kernel;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the intervention done the
  way a user would without headint: the blend applied to its output (head masks), a dense
  ``[B, H, T, T]`` bool mask built from the selectors (knockouts: the only way);
- ``sdpa_mask`` (head masks only): SDPA given a dense ``[T, T]`` causal mask, plus the blend -
  SDPA "with a dense mask", the form every intervention that edits the scores takes there;
- ``auto``: ``headint.attention(..., backend="auto")`` (which backend ran is recorded);
- ``reference``: ``backend="reference"`` (pure PyTorch, materialises T x T; only up to
  ``--reference-max-t``).

Timing: each (T, case, mode) runs in one fresh subprocess that builds the inputs of every
implementation, warms each up once, then runs them interleaved (the order rotated every repeat)
``--repeats`` times; the figure is each one's median (``--timer wall``: ``perf_counter`` with the
process's threads; ``--timer cpu``: process CPU time, for ``--threads 1`` on a busy machine).
Ratios are read within one such run. Memory (``--memory``, on by default): each implementation's
peak resident set above its start over one call, in a fresh subprocess of its own (``VmHWM``,
reset through ``/proc/self/clear_refs`` just before the call).

Checks, before any timing: the cpu kernel against the reference on one head of the same shape
(relative error on norms of the output and, for ``fwdbwd``, of the gradients); a failed check
is printed and recorded.

``--results FILE`` writes the run as a Markdown section of ``FILE`` (between the markers
``<!-- bench_cpu_attention:begin -->`` and ``<!-- bench_cpu_attention:end -->``, which are
added at the end when missing); ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from peak_memory import PeakRSS

IMPLS = ("cpu", "sdpa", "sdpa_mask", "auto", "reference")
CASES = ("none", "headmask", "knockout")
MODES = ("fwd", "fwdbwd")
BEGIN, END = "<!-- bench_cpu_attention:begin -->", "<!-- bench_cpu_attention:end -->"


# ----------------------------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------------------------
def make_inputs(T, case, B, H, D, dtype, seed=0, requires_grad=False):
    import torch

    from headint.ops import EdgeKnockout

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3))
    kw = {}
    if case == "headmask":
        kw["head_mask"] = torch.rand(B, H, T, generator=g).requires_grad_(requires_grad)
        kw["head_patch"] = torch.randn(B, H, T, D, generator=g).to(dtype).requires_grad_(requires_grad)
    elif case == "knockout":
        qs = torch.rand(B, H, T, generator=g) < 0.5
        ks = torch.rand(B, H, T, generator=g) < 0.1
        ks[..., 0] = False  # every query keeps key 0, so no row is fully removed (SDPA would give NaN)
        kw["knockout"] = EdgeKnockout(qs, ks)
    return q, k, v, kw


def applies(impl, case):
    return impl != "sdpa_mask" or case == "headmask"


def make_fn(impl, q, k, v, kw):
    import torch
    import torch.nn.functional as F

    import headint.ops as hops

    if impl in ("cpu", "reference", "auto"):
        return lambda: hops.attention(q, k, v, causal=True, backend=impl, **kw)
    T = q.shape[2]
    if "knockout" in kw:
        ko = kw["knockout"]

        def fn():
            keep = torch.ones(T, T, dtype=torch.bool).tril() & ~(ko.queries[..., :, None] & ko.keys[..., None, :])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

        return fn
    if "head_mask" in kw:
        m, p = kw["head_mask"][..., None], kw["head_patch"]
        if impl == "sdpa_mask":
            def fn():
                keep = torch.ones(T, T, dtype=torch.bool).tril()
                return m * F.scaled_dot_product_attention(q, k, v, attn_mask=keep) + (1 - m) * p

            return fn
        return lambda: m * F.scaled_dot_product_attention(q, k, v, is_causal=True) + (1 - m) * p
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _stepper(spec, impl):
    import torch

    dtype = getattr(torch, spec["dtype"])
    grad = spec["mode"] == "fwdbwd"
    q, k, v, kw = make_inputs(spec["T"], spec["case"], spec["B"], spec["H"], spec["D"], dtype, requires_grad=grad)
    fn = make_fn(impl, q, k, v, kw)
    leaves = [x for x in [q, k, v, kw.get("head_mask"), kw.get("head_patch")] if x is not None]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)

    def step():
        if grad:
            for x in leaves:
                x.grad = None
            fn().backward(dout)
        else:
            with torch.no_grad():
                fn()

    return step


def _setup(spec):
    import torch

    from headint.ops import cpu_backend

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cpu_backend.build()  # build/load outside the measurement
    return torch


def time_worker(spec):
    """Every implementation of one (T, case, mode), interleaved: {impl: {median_ms, runs, ...}}."""
    from headint.ops import last_backend

    _setup(spec)
    clock = time.process_time if spec.get("timer") == "cpu" else time.perf_counter
    steps, ran, times = {}, {}, {}
    first = 0.0
    for impl in spec["impls"]:
        steps[impl] = _stepper(spec, impl)
        t0 = clock()
        steps[impl]()  # warm-up (auto: also its one-time measurement, if this machine has none yet)
        first = max(first, clock() - t0)
        ran[impl] = last_backend() if impl == "auto" else impl
        times[impl] = []
    repeats = spec["repeats"] if first < 2.0 else min(spec["repeats"], 3)
    order = list(steps)
    for r in range(repeats):
        for impl in order[r % len(order):] + order[: r % len(order)]:
            t0 = clock()
            steps[impl]()
            times[impl].append(clock() - t0)
    return {impl: {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "runs": len(ts),
                   "all_ms": [round(1e3 * t, 3) for t in ts], "ran": ran[impl]} for impl, ts in times.items()}


def memory_worker(spec):
    """Peak resident set above the start of one call of one implementation, in MB."""
    impl = spec["impl"]
    _setup(spec)
    tiny = _stepper(dict(spec, T=64), impl)  # lazy imports, thread pools, caches: not the case's memory
    tiny()
    tiny()
    del tiny
    gc.collect()
    step = _stepper(spec, impl)
    with PeakRSS() as m:
        step()
    return {"peak_mb": m.peak / 2**20}


def check(spec):
    """Max relative error (on norms) of the cpu kernel vs the reference, one head, same T and case."""
    import torch

    import headint.ops as hops

    dtype = getattr(torch, spec["dtype"])
    grad = spec["mode"] == "fwdbwd"
    res = {}
    for impl in ("cpu", "reference"):
        q, k, v, kw = make_inputs(spec["T"], spec["case"], 1, 1, spec["D"], dtype, seed=7, requires_grad=grad)
        out = hops.attention(q, k, v, causal=True, backend=impl, **kw)
        vals = [out.detach()]
        if grad:
            leaves = [x for x in [q, k, v, kw.get("head_mask"), kw.get("head_patch")] if x is not None]
            vals += list(torch.autograd.grad(out, leaves, torch.ones_like(out)))
        res[impl] = vals
    return max(((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
               for a, b in zip(res["cpu"], res["reference"]))


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def ref_bytes_estimate(T, B, H, mode):
    # measured: the reference peaks at ~15 bytes per score element in the forward, ~31 with autograd
    per = 16 if mode == "fwd" else 32
    return per * B * H * T * T


def run_sub(flag, spec, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), flag, json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["rc %d" % p.returncode])[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def environment(a):
    import torch

    import headint.ops.cpu_backend as cb

    cb.build()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    return dict(date=time.strftime("%Y-%m-%d %H:%M"), cpu=cb.cpu_model_name(), cores=os.cpu_count(), machine=platform.machine(),
                torch=torch.__version__, threads=a.threads or torch.get_num_threads(), timer=a.timer,
                simd_width=cb.vector_width(), git=commit + (" (+ uncommitted changes)" if dirty else ""),
                shape=f"B={a.B} H={a.H} D={a.D} {a.dtype}, causal", repeats=a.repeats, load_start=_load())


def ratios(res, case):
    """The ratios of one (T, case, mode): kernel vs SDPA (>1: the kernel is faster), kernel vs
    dense-mask SDPA, auto over the faster of the two backends auto chooses between."""
    ms = {k: v["median_ms"] for k, v in res.items() if isinstance(v, dict) and "median_ms" in v}
    out = {}
    if "cpu" in ms and "sdpa" in ms:
        out["cpu_vs_sdpa"] = ms["sdpa"] / ms["cpu"]
    dense = ms.get("sdpa_mask") if case == "headmask" else (ms.get("sdpa") if case == "knockout" else None)
    if "cpu" in ms and dense:
        out["cpu_vs_dense_mask"] = dense / ms["cpu"]
    if "auto" in ms and "cpu" in ms:
        best = ms["cpu"] if case == "knockout" or "sdpa" not in ms else min(ms["cpu"], ms["sdpa"])
        out["auto_over_best"] = ms["auto"] / best
    return out


def markdown(env, rows, command):
    def f(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    lines = [
        BEGIN,
        "",
        "```",
        command,
        "```",
        "",
        f"{env['date']}, {env['cpu']} ({env['cores']} cores, {env['machine']}), torch {env['torch']}, {env['threads']} threads, "
        f"timer {env['timer']}, kernel SIMD width {env['simd_width']} floats, git {env['git']}; {env['shape']}; "
        f"load average {env['load_start']:.1f} at start, {env['load_end']:.1f} at end.",
        "",
        "Median ms of interleaved runs in one process per row; ratios within the row. `cpu / sdpa`: how many "
        "times faster the kernel is than SDPA (head masks: SDPA + blend; knockouts: SDPA with the dense mask); "
        "`cpu / dense mask`: against SDPA given a dense `[T, T]` mask; `auto / best`: `auto`'s time over the "
        "faster backend it chooses from (knockouts: the kernel); peak MB: one call's peak memory above its start, "
        "fresh process; check: the kernel's relative error against the reference on one head.",
        "",
        "| T | case | mode | cpu ms | sdpa ms | sdpa dense-mask ms | auto ms (ran) | reference ms | cpu / sdpa | "
        "cpu / dense mask | auto / best | peak MB cpu / sdpa | check |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["times"]

        def ms(impl):
            v = t.get(impl)
            return f(v["median_ms"]) if isinstance(v, dict) and "median_ms" in v else "-"

        dense = ms("sdpa") if r["case"] == "knockout" else ms("sdpa_mask")
        auto = t.get("auto", {})
        auto_s = f"{ms('auto')} ({auto.get('ran')})" if "median_ms" in auto else "-"
        mem = r.get("memory", {})
        mem_s = "/".join(f(mem.get(i, {}).get("peak_mb"), "{:.0f}") for i in ("cpu", "sdpa")) if mem else "-"
        q = r["ratios"]
        lines.append(
            f"| {r['T']} | {r['case']} | {r['mode']} | {ms('cpu')} | {ms('sdpa')} | {dense} | {auto_s} | {ms('reference')} | "
            f"{f(q.get('cpu_vs_sdpa'), '{:.2f}x')} | {f(q.get('cpu_vs_dense_mask'), '{:.2f}x')} | "
            f"{f(q.get('auto_over_best'), '{:.2f}')} | {mem_s} | {f(r.get('check_err'), '{:.1e}')} |")
    lines += ["", END]
    return "\n".join(lines)


def write_results(path, text):
    p = Path(path)
    old = p.read_text() if p.is_file() else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    p.write_text(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--max-t", type=int, default=None, help="drop lengths above this")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    ap.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    ap.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: process CPU time (robust on a shared machine; use with --threads 1)")
    ap.add_argument("--reference-max-t", type=int, default=1024, help="time the reference only up to this T")
    ap.add_argument("--mem-budget-gb", type=float, default=14.0, help="skip reference checks above this estimate")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    ap.add_argument("--out", help="write the rows as JSON")
    ap.add_argument("--results", help="rewrite this Markdown file's bench_cpu_attention section with the run")
    ap.add_argument("--time-worker", help=argparse.SUPPRESS)
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    ap.add_argument("--check-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()

    for flag, fn in (("time_worker", time_worker), ("memory_worker", memory_worker)):
        if getattr(a, flag):
            print(json.dumps(fn(json.loads(getattr(a, flag)))))
            return
    if a.check_worker:
        print(json.dumps({"err": check(json.loads(a.check_worker))}))
        return

    env = environment(a)
    command = "python bench/bench_cpu_attention.py " + " ".join(sys.argv[1:])
    print(f"# {env['cpu']}, torch {env['torch']}, {env['threads']} threads, timer {a.timer}, SIMD width {env['simd_width']}, "
          f"{env['shape']}; load average {env['load_start']:.1f}", flush=True)
    hdr = f"{'T':>5} {'case':>9} {'mode':>7} " + " ".join(f"{i:>11}" for i in a.impls) + "   cpu/sdpa cpu/dense auto/best  check"
    print(hdr)
    print("-" * len(hdr), flush=True)
    rows = []
    lengths = [t for t in a.lengths if a.max_t is None or t <= a.max_t]
    for T in lengths:
        for case in a.cases:
            for mode in a.modes:
                base = {"T": T, "case": case, "mode": mode, "B": a.B, "H": a.H, "D": a.D, "dtype": a.dtype,
                        "repeats": a.repeats, "threads": a.threads, "timer": a.timer}
                err = None
                if not a.no_check and ref_bytes_estimate(T, 1, 1, mode) <= a.mem_budget_gb * 2**30:
                    r = run_sub("--check-worker", base, a.timeout)
                    err = r.get("err")
                    if err is None or err > (1e-4 if a.dtype == "float32" else 2e-2):
                        print(f"!! check failed at T={T} {case} {mode}: {r}", flush=True)
                impls = [i for i in a.impls if applies(i, case) and (i != "reference" or T <= a.reference_max_t)]
                times = run_sub("--time-worker", dict(base, impls=impls), a.timeout)
                memory = {}
                if not a.no_memory and "error" not in times:
                    for impl in impls:
                        if impl in ("cpu", "sdpa"):
                            memory[impl] = run_sub("--memory-worker", dict(base, impl=impl), a.timeout)
                row = dict(base, check_err=err, times=times, memory=memory, ratios=ratios(times, case))
                rows.append(row)
                cells = []
                for impl in a.impls:
                    v = times.get(impl)
                    cells.append(f"{v['median_ms']:>11.1f}" if isinstance(v, dict) and "median_ms" in v else f"{'-':>11}")
                q = row["ratios"]

                def cell(key, width, suffix=""):
                    v = q.get(key)
                    return f"{'-':>{width + len(suffix)}}" if v is None or v != v else f"{v:>{width}.2f}{suffix}"

                print(f"{T:>5} {case:>9} {mode:>7} " + " ".join(cells)
                      + f"   {cell('cpu_vs_sdpa', 7, 'x')} {cell('cpu_vs_dense_mask', 8, 'x')}"
                      + f" {cell('auto_over_best', 8)}  {'-' if err is None else f'{err:.1e}'}"
                      + (f"  !! {times['error']}" if "error" in times else ""), flush=True)
    env["load_end"] = _load()
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(dict(environment=env, command=command, rows=rows), indent=1))
        print(f"# wrote {a.out}")
    if a.results:
        write_results(a.results, markdown(env, rows, command))
        print(f"# rewrote the bench_cpu_attention section of {a.results}")
    print(f"# load average {env['load_start']:.1f} at start, {env['load_end']:.1f} at end")


if __name__ == "__main__":
    main()
