"""Benchmark the native CPU attention kernel against the reference backend and plain SDPA.

    python bench/bench_cpu_attention.py [--max-t 8192] [--repeats 5] [--out results.json|.csv]
    # on a shared / busy machine, count CPU time of single-threaded workers instead of wall time:
    python bench/bench_cpu_attention.py --threads 1 --timer cpu --repeats 3 --out results.json

For every sequence length T (256 ... 8192, capped by --max-t), case and mode it runs each
implementation in a *fresh subprocess*, so that the peak memory of that case alone can be read:
``peak_mb`` is the growth of the process's maximum resident set (``ru_maxrss``) from just before
the first call (inputs already allocated, modules and the kernel already loaded) to the end of the
timed runs.  Time is the median over ``--repeats`` runs after one warm-up.

Implementations:
  cpu        headint.attention(..., backend="cpu")        the fused C++ kernel
  reference  headint.attention(..., backend="reference")  pure PyTorch, materialises Tq x Tk
  sdpa       torch.nn.functional.scaled_dot_product_attention, with the intervention done the way
             a user would without headint: blend applied to its output (head masks), or a dense
             [B, H, T, T] bool mask built from the knockout selectors (knockouts)

Cases (all causal, B=1, H=8, D=64, fp32 by default):
  none       no intervention
  headmask   per-row head masks: head_mask [B, H, T] in [0, 1] with a head_patch [B, H, T, D]
  knockout   a compact knockout: random query selector x random key selector per (b, h)

Modes: fwd (no grad) and fwdbwd (forward + backward w.r.t. q, k, v and the float interventions).

Before timing, each (T, case, mode) is checked: the cpu kernel against the reference on the same
inputs restricted to one head (so the reference fits in memory at every T), relative error on
norms of the output (and gradients for fwdbwd).  The reference is skipped where its estimated peak
memory exceeds --mem-budget-gb.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

IMPLS = ("cpu", "reference", "sdpa")
CASES = ("none", "headmask", "knockout")
MODES = ("fwd", "fwdbwd")


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


def make_fn(impl, q, k, v, kw):
    import torch
    import torch.nn.functional as F

    import headint.ops as hops

    if impl in ("cpu", "reference"):
        return lambda: hops.attention(q, k, v, causal=True, backend=impl, **kw)
    if "knockout" in kw:
        ko = kw["knockout"]
        T = q.shape[2]

        def fn():
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            keep = causal & ~(ko.queries[..., :, None] & ko.keys[..., None, :])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

        return fn
    if "head_mask" in kw:
        m, p = kw["head_mask"][..., None], kw["head_patch"]
        return lambda: m * F.scaled_dot_product_attention(q, k, v, is_causal=True) + (1 - m) * p
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def worker(spec):
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    clock = time.process_time if spec.get("timer") == "cpu" else time.perf_counter

    if spec["impl"] == "cpu":
        from headint.ops import cpu_backend

        cpu_backend.build()  # build/load outside the measurement
    dtype = getattr(torch, spec["dtype"])
    grad = spec["mode"] == "fwdbwd"

    def stepper(T):
        q, k, v, kw = make_inputs(T, spec["case"], spec["B"], spec["H"], spec["D"], dtype, requires_grad=grad)
        fn = make_fn(spec["impl"], q, k, v, kw)
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

    # a tiny run first: lazy imports, thread pools and the dispatcher's caches are not the case's memory
    tiny = stepper(64)
    tiny()
    tiny()
    del tiny
    gc.collect()
    step = stepper(spec["T"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    t0 = clock()
    step()  # warm-up (also counted in the peak memory)
    first = clock() - t0
    repeats = spec["repeats"] if first < 2.0 else min(spec["repeats"], 3)
    for _ in range(repeats):
        t0 = clock()
        step()
        times.append(clock() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "runs": repeats,
            "peak_mb": (peak - base) / 1024.0}


def check(spec):
    """Max relative error (on norms) of the cpu kernel vs the reference, one head, same T and case."""
    import torch

    import headint.ops as hops

    dtype = getattr(torch, spec["dtype"])
    grad = spec["mode"] == "fwdbwd"
    errs = []
    res = {}
    for impl in ("cpu", "reference"):
        q, k, v, kw = make_inputs(spec["T"], spec["case"], 1, 1, spec["D"], dtype, seed=7, requires_grad=grad)
        out = hops.attention(q, k, v, causal=True, backend=impl, **kw)
        vals = [out.detach()]
        if grad:
            leaves = [x for x in [q, k, v, kw.get("head_mask"), kw.get("head_patch")] if x is not None]
            vals += list(torch.autograd.grad(out, leaves, torch.ones_like(out)))
        res[impl] = vals
    for a, b in zip(res["cpu"], res["reference"]):
        errs.append(((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item())
    return max(errs)


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def ref_bytes_estimate(T, B, H, mode):
    # measured: the reference peaks at ~15 bytes per score element in the forward, ~31 with autograd
    per = 16 if mode == "fwd" else 32
    return per * B * H * T * T


def run_worker(spec, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["rc %d" % p.returncode])[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-t", type=int, default=8192)
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096, 8192])
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
    ap.add_argument("--mem-budget-gb", type=float, default=14.0, help="skip the reference above this estimate")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per subprocess")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", help="write the rows as .json or .csv")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--check-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    if a.check_worker:
        print(json.dumps({"err": check(json.loads(a.check_worker))}))
        return

    import torch

    import headint.ops.cpu_backend as cb

    cb.build()
    threads = a.threads or torch.get_num_threads()
    print(f"# torch {torch.__version__}, threads {threads}, timer {a.timer}, kernel SIMD width {cb.vector_width()} floats, "
          f"B={a.B} H={a.H} D={a.D} {a.dtype}, causal", flush=True)
    rows = []
    hdr = f"{'T':>5} {'case':>9} {'mode':>7} {'impl':>10} {'median ms':>10} {'min ms':>9} {'peak MB':>9} {'vs ref':>7} {'check':>9}"
    print(hdr)
    print("-" * len(hdr), flush=True)
    for T in [t for t in a.lengths if t <= a.max_t]:
        for case in a.cases:
            for mode in a.modes:
                base = {"T": T, "case": case, "mode": mode, "B": a.B, "H": a.H, "D": a.D, "dtype": a.dtype,
                        "repeats": a.repeats, "threads": a.threads, "timer": a.timer}
                err = None
                if not a.no_check:
                    r = run_check(base, a.timeout)
                    err = r.get("err")
                    if err is None or err > (1e-4 if a.dtype == "float32" else 2e-2):
                        print(f"!! check failed at T={T} {case} {mode}: {r}", flush=True)
                ref_ms = None
                for impl in a.impls:
                    spec = dict(base, impl=impl)
                    if impl == "reference" and ref_bytes_estimate(T, a.B, a.H, mode) > a.mem_budget_gb * 2**30:
                        res = {"error": f"skipped: estimated {ref_bytes_estimate(T, a.B, a.H, mode) / 2**30:.0f} GB"}
                    else:
                        res = run_worker(spec, a.timeout)
                    row = dict(spec, check_err=err, **res)
                    if impl == "reference" and "median_ms" in res:
                        ref_ms = res["median_ms"]
                    rows.append(row)
                for row in rows[-len(a.impls):]:
                    if "median_ms" in row:
                        vs = f"{ref_ms / row['median_ms']:.1f}x" if ref_ms else "-"
                        print(f"{T:>5} {case:>9} {mode:>7} {row['impl']:>10} {row['median_ms']:>10.1f} "
                              f"{row['min_ms']:>9.1f} {row['peak_mb']:>9.0f} {vs:>7} {'-' if err is None else f'{err:.1e}':>9}", flush=True)
                    else:
                        print(f"{T:>5} {case:>9} {mode:>7} {row['impl']:>10}   {row['error']}", flush=True)
    if a.out:
        if a.out.endswith(".csv"):
            keys = sorted({k for r in rows for k in r})
            with open(a.out, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
        else:
            with open(a.out, "w") as f:
                json.dump(rows, f, indent=1)
        print(f"# wrote {a.out}")


def run_check(base, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--check-worker", json.dumps(base)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
