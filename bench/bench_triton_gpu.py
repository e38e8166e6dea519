"""GPU benchmark of headint's Triton attention kernels.

First checks the kernels against the PyTorch reference (forward and gradients), then times with
``triton.testing.do_bench`` (median) the forward and forward+backward throughput (TFLOP/s) at
B=4, H=32, T in 1k..8k, D=64/128, bf16, causal and not, for three workloads:

- ``none``:     no intervention,
- ``hm+patch``: a per-row head mask [B,H,T] and a patch [B,H,T,D] (blend in the epilogue),
- ``knockout``: two compact knockouts (per-row query/key selectors, int32 bit words),

against ``torch.nn.functional.scaled_dot_product_attention`` on the flash backend
(``torch.nn.attention.sdpa_kernel``; interventions done unfused around it: the blend in PyTorch,
knockouts impossible with flash so not timed) and FlexAttention (``torch.nn.attention.flex_attention``,
compiled; knockouts as a ``mask_mod`` over the same bit words, blend in PyTorch; block-mask
construction is done once outside the timed region).

FLOPs: forward ``4 B H Tq Tk D`` (halved when causal), backward 2.5x the forward.

    python bench/bench_triton_gpu.py --out results.json
    python bench/bench_triton_gpu.py --tiny       # correctness only, tiny shapes, CPU interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _flops(B, H, Tq, Tk, D, causal, mode):
    f = 4.0 * B * H * Tq * Tk * D
    if causal:
        f *= 0.5
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def make_inputs(B, H, T, D, dtype, device, variant, seed=0, requires_grad=False):
    import torch

    from headint.ops import EdgeKnockout

    g = torch.Generator(device=device)
    g.manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)

    q, k, v = rn(B, H, T, D), rn(B, H, T, D), rn(B, H, T, D)
    kw = {}
    if variant == "hm+patch":
        kw["head_mask"] = torch.rand(B, H, T, generator=g, device=device)
        kw["head_patch"] = rn(B, H, T, D)
    elif variant == "knockout":
        qs = torch.rand(B, H, T, generator=g, device=device) < 0.5
        ks = torch.rand(B, 1, T, generator=g, device=device) < 0.3
        qs2 = torch.rand(B, 1, T, generator=g, device=device) < 0.2
        ks2 = torch.zeros(T, dtype=torch.bool, device=device)
        ks2[: max(1, T // 8)] = True
        kw["knockout"] = [EdgeKnockout(qs, ks), EdgeKnockout(qs2, ks2)]
    if requires_grad:
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        for n in ("head_mask", "head_patch"):
            if n in kw:
                kw[n].requires_grad_(True)
    return q, k, v, kw


# ------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------


def check_case(B, H, T, D, dtype, device, variant, causal, seed=0) -> dict:
    """Kernel vs reference: forward and grads of q, k, v (+ head mask/patch). Returns a result row."""
    import torch

    from headint.ops import attention

    q, k, v, kw = make_inputs(B, H, T, D, dtype, device, variant, seed)
    leaves = {"q": q, "k": k, "v": v, **{n: kw[n] for n in ("head_mask", "head_patch") if n in kw}}
    g = torch.Generator(device=device)
    g.manual_seed(seed + 1)
    go = torch.randn(B, H, T, D, generator=g, device=device)

    def run(backend, cast):
        ls = {n: t.detach().to(cast if t.is_floating_point() else t.dtype).requires_grad_(True) for n, t in leaves.items()}
        extra = {n: ls[n] for n in ("head_mask", "head_patch") if n in ls}
        if "knockout" in kw:
            extra["knockout"] = kw["knockout"]
        out = attention(ls["q"], ls["k"], ls["v"], causal=causal, backend=backend, **extra)
        out.backward(go.to(out.dtype))
        return out.detach(), {n: t.grad for n, t in ls.items()}

    out, grads = run("triton", dtype)
    ref64, g64 = run("reference", torch.float64)
    reflp, glp = run("reference", dtype)
    row = {"variant": variant, "causal": causal, "B": B, "H": H, "T": T, "D": D, "dtype": str(dtype), "ok": True,
           "errors": {}}
    for name, a, r64, rlp in [("out", out, ref64, reflp)] + [(f"d{n}", grads[n], g64[n], glp[n]) for n in g64]:
        e = (a.double() - r64.double()).norm().item()
        e_ref = (rlp.double() - r64.double()).norm().item()
        scale = r64.double().norm().item()
        tol = 3.0 * e_ref + (1e-5 if dtype == torch.float32 else 1e-2) * scale + 1e-6
        ok = bool(torch.isfinite(a).all()) and e <= tol
        row["errors"][name] = {"err": e, "ref_lowp_err": e_ref, "tol": tol, "ok": ok}
        row["ok"] &= ok
    return row


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


def _bits_to_mask_mod(q_bits, k_bits, causal):
    def mask_mod(b, h, qi, kj):
        keep = (q_bits[b, h, qi] & k_bits[b, h, kj]) == 0
        if causal:
            keep = keep & (kj <= qi)
        return keep

    return mask_mod


def bench_one(B, H, T, D, dtype, causal, variant, method, mode, warmup, rep):
    """Median milliseconds of one (method, workload) or None when the method cannot express it."""
    import torch
    import triton.testing

    from headint.ops import attention
    from headint.ops.arguments import prepare

    device = "cuda"
    grad = mode == "fwd+bwd"
    q, k, v, kw = make_inputs(B, H, T, D, dtype, device, variant, seed=1, requires_grad=grad)
    go = torch.randn_like(q)

    def blend(o):
        if variant != "hm+patch":
            return o
        m = kw["head_mask"][..., None].to(o.dtype)
        return m * o + (1 - m) * kw["head_patch"]

    if method == "headint":
        def fn():
            return attention(q, k, v, causal=causal, backend="triton", **kw)
    elif method == "sdpa-flash":
        if variant == "knockout":
            return None  # flash attention takes no mask
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return blend(o)
    elif method == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = _compiled_flex(flex_attention)
        block_mask = None
        if variant == "knockout":
            a = prepare(q, k, v, knockout=kw["knockout"])
            qb, kb = a.q_bits.contiguous(), a.k_bits.contiguous()
            block_mask = create_block_mask(_bits_to_mask_mod(qb, kb, causal), B, H, T, T, device=device)
        elif causal:
            block_mask = create_block_mask(lambda b, h, qi, kj: kj <= qi, None, None, T, T, device=device)

        def fn():
            return blend(compiled(q, k, v, block_mask=block_mask))
    else:
        raise ValueError(method)

    if grad:
        def step():
            o = fn()
            o.backward(go)
    else:
        def step():
            with torch.no_grad():
                fn()
    step()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    return triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median")


_FLEX = {}


def _compiled_flex(flex_attention):
    import torch

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def format_table(rows) -> str:
    head = f"{'T':>5} {'D':>4} {'causal':>6} {'variant':9} {'mode':8} {'headint':>9} {'sdpa-flash':>10} {'flex':>9}  (TFLOP/s)"
    lines = [head, "-" * len(head)]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["T"], r["D"], r["causal"], r["variant"], r["mode"]), {})[r["method"]] = r["tflops"]
    for (T, D, c, var, mode), m in keyed.items():
        def f(x):
            return "-" if x is None else f"{x:.1f}"
        lines.append(f"{T:>5} {D:>4} {str(c):>6} {var:9} {mode:8} {f(m.get('headint')):>9} "
                     f"{f(m.get('sdpa-flash')):>10} {f(m.get('flex')):>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Benchmark headint's Triton attention kernels on a GPU")
    p.add_argument("--tiny", action="store_true",
                   help="correctness checks only, at tiny shapes, on CPU under the Triton interpreter")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--variants", nargs="+", default=["none", "hm+patch", "knockout"])
    p.add_argument("--methods", nargs="+", default=["headint", "sdpa-flash", "flex"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    args = p.parse_args(argv)

    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports the kernels
    import torch

    result = {"device": None, "checks": [], "timings": [], "args": vars(args)}
    if args.tiny:
        device, dtype = "cpu", torch.float32
        result["device"] = "cpu (triton interpreter)"
        cases = [(1, 2, 19, 16, "none", True, torch.float32), (2, 2, 17, 32, "hm+patch", False, torch.float32),
                 (1, 2, 21, 16, "knockout", True, torch.float32), (1, 2, 18, 16, "hm+patch", True, torch.bfloat16)]
        for B, H, T, D, var, causal, dt in cases:
            result["checks"].append(check_case(B, H, T, D, dt, device, var, causal))
    else:
        if not torch.cuda.is_available():
            print("bench_triton_gpu: no CUDA device (use --tiny for the CPU correctness checks)", file=sys.stderr)
            return 2
        device, dtype = "cuda", torch.bfloat16
        result["device"] = torch.cuda.get_device_name()
        for var in args.variants:
            for causal in (False, True):
                for D in args.dims:
                    result["checks"].append(check_case(2, 4, 300, D, dtype, device, var, causal))
    for c in result["checks"]:
        status = "ok" if c["ok"] else "FAILED"
        worst = max(c["errors"].items(), key=lambda kv: kv[1]["err"] / max(kv[1]["tol"], 1e-30))
        print(f"check {c['variant']:9} causal={c['causal']!s:5} T={c['T']} D={c['D']} {c['dtype']}: {status} "
              f"(worst {worst[0]}: err {worst[1]['err']:.2e} <= tol {worst[1]['tol']:.2e})")
    ok = all(c["ok"] for c in result["checks"])

    if not args.tiny and ok:
        for T in args.seqs:
            for D in args.dims:
                for causal in (False, True):
                    for var in args.variants:
                        for mode in args.modes:
                            for method in args.methods:
                                t0 = time.time()
                                try:
                                    ms = bench_one(args.batch, args.heads, T, D, dtype, causal, var, method, mode,
                                                   args.warmup, args.rep)
                                    err = None
                                except Exception as e:  # one failing method must not stop the table
                                    ms, err = None, f"{type(e).__name__}: {e}"[:300]
                                tf = None if ms is None else _flops(args.batch, args.heads, T, T, D, causal, mode) / (
                                    ms * 1e-3) / 1e12
                                result["timings"].append(dict(T=T, D=D, causal=causal, variant=var, mode=mode,
                                                              method=method, ms=ms, tflops=tf, error=err,
                                                              wall_s=round(time.time() - t0, 1)))
                                torch.cuda.empty_cache()
        print(format_table(result["timings"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
