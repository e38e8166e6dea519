"""The GPU check of headint: one run on one CUDA GPU, one JSON (``bash scripts/gpu_check.sh``).

    bash scripts/gpu_check.sh [OUT.json]              # an H100-class GPU: < 8 minutes (default gpu_check.json)
    python scripts/gpu_check.py --out gpu_check.json  # the same, without the wrapper
    python scripts/gpu_check.py --dry-run --out x.json  # CPU: the same code at tiny sizes (Triton interpreter)

Sections, in this order (the JSON is rewritten after each step, so a run cut short keeps what it
finished; a time budget, ``--budget-s`` (420 s), skips the steps that would start after their
section's share of it - correctness 45 %, kernels 85 %, the scan the rest - and says so; most of
the time goes to compiling and autotuning Triton kernels, once per operand combination):

1. ``correctness``: the Triton kernels, forward and backward, against the float64 reference
   backend for every operand - all of them at once in bf16, fp16 and fp32, then one by one: none,
   head mask (per row), head patch, compact knockouts (two, per head and broadcast), score scale,
   soft-capping, sinks, a value head dim of its own, a bool mask with a sliding window - at B=2, Hq=4,
   Hkv=2 (GQA), T=300, D=64. Error of each output / gradient in the Frobenius norm, allowed
   ``3 x`` the reference's own error in the input dtype ``+ eps |ref|`` (eps 1e-2 for 16-bit,
   1e-5 for fp32). These run one fixed tile configuration per kernel (the leanest the autotuner
   has): compiling every autotuned configuration for each operand combination would not fit the
   budget. The autotuned configurations are checked in section 2.
2. ``kernels``: Triton without an intervention, with per-row head masks + patches, with compact
   knockouts, and SDPA's flash backend (no intervention; head masks blended after it), forward
   and forward + backward, causal, B=2, H=16, D=128, bf16, T = 1k, 2k, 4k, 8k, 16k: median ms
   (``triton.testing.do_bench``), TFLOP/s, and the speed ratios the issue's targets name
   (intervened forward >= 0.95x un-intervened, >= 0.9x SDPA flash). At the first length each
   Triton variant (autotuned) is first checked against the reference, forward and backward.
3. ``scan``: all heads of a GPT-2-small-shaped model (12 x 12, random weights; N=16 prompts of
   T=64 tokens, fp32), activation patching with ``LogitDiff``: ``headint.scan`` (backend
   ``auto``: Triton) against the hook loop (one forward per head with a pre-hook on ``c_proj``,
   ``bench/peers.py``), values compared first (max abs diff), then interleaved repeats: wall
   seconds and the speed-up (target >= 20x).

``targets`` sums up the three targets (each value, and whether it is met); ``ok`` is whether
every correctness check passed. Exit status: 0 if they all passed, 1 if one failed, 2 for a
usage error or no CUDA device (without ``--dry-run``). Timings never fail the run.

``--dry-run``: ``TRITON_INTERPRET=1``, CPU tensors, tiny sizes (T=19, D=16, the kernels at
T = 32 and 64 timed with ``time.perf_counter``, a 2-layer model in the scan with backend
``triton``, SDPA's default CPU backend standing in for flash): the same code paths and the same
JSON, for testing the script (``tests/triton/test_gpu_check_script.py``) where there is no GPU;
its timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"intervened_fwd_vs_plain": 0.95, "intervened_fwd_vs_sdpa_flash": 0.9, "scan_vs_hook_loop": 20.0}
DIFFERENTIABLE = ("q", "k", "v", "head_mask", "head_patch", "score_scale", "sinks")

#: name -> the operands of a correctness case (dtype and causality per case; see section 1)
OPERAND_CASES = {
    "everything_bf16": dict(head_mask=True, head_patch=True, knockout=True, score_scale=True, softcap=True, sinks=True,
                            v_dim=True),
    "everything_fp16": dict(head_mask=True, head_patch=True, knockout=True, score_scale=True, softcap=True, sinks=True,
                            v_dim=True, dtype="float16", causal=False),
    "everything_fp32": dict(head_mask=True, head_patch=True, knockout=True, score_scale=True, softcap=True, sinks=True,
                            v_dim=True, dtype="float32"),
    "none": dict(),
    "head_mask": dict(head_mask=True),
    "head_patch": dict(head_mask=True, head_patch=True),
    "knockouts": dict(knockout=True),
    "score_scale": dict(score_scale=True),
    "softcap": dict(softcap=True),
    "sinks": dict(sinks=True),
    "v_dim": dict(v_dim=True),
    "mask_window": dict(mask=True, window=True, causal=False),
}
#: the share of the time budget by which each section must have started its last step
SECTION_BUDGET = {"correctness": 0.45, "kernels": 0.85, "scan": 1.0}
VARIANTS = ("none", "head_mask+patch", "knockout")


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="the JSON to write (default: gpu_check.json)")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes: test the script")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip steps that would start after this many seconds (default 420; dry run 600)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="kernel timing lengths (default 1k..16k)")
    p.add_argument("--batch", type=int, default=None, help="kernel timing batch (default 2)")
    p.add_argument("--heads", type=int, default=None, help="kernel timing heads (default 16)")
    p.add_argument("--head-dim", type=int, default=None, help="kernel timing head dim (default 128)")
    p.add_argument("--check-t", type=int, default=None, help="correctness sequence length (default 300)")
    p.add_argument("--scan-n", type=int, default=None, help="scan prompts (default 16)")
    p.add_argument("--scan-t", type=int, default=None, help="scan prompt length (default 64)")
    p.add_argument("--scan-repeats", type=int, default=3)
    p.add_argument("--sections", nargs="+", default=["correctness", "kernels", "scan"],
                   choices=["correctness", "kernels", "scan"])
    p.add_argument("--cases", nargs="+", default=list(OPERAND_CASES), choices=list(OPERAND_CASES),
                   help="correctness cases (default: all)")
    a = p.parse_args(argv)
    dry = a.dry_run
    a.budget_s = a.budget_s if a.budget_s is not None else (600.0 if dry else 420.0)

    def default(value, dry_value, gpu_value):
        return value if value is not None else (dry_value if dry else gpu_value)

    a.lengths = default(a.lengths, [32, 64], [1024, 2048, 4096, 8192, 16384])
    a.batch = default(a.batch, 1, 2)
    a.heads = default(a.heads, 2, 16)
    a.head_dim = default(a.head_dim, 16, 128)
    a.check_t = default(a.check_t, 19, 300)
    a.check_d = 16 if dry else 64
    a.scan_config = "tiny" if dry else "gpt2-small"
    a.scan_n = default(a.scan_n, 2, 16)
    a.scan_t = default(a.scan_t, 8, 64)
    if any(t < 1 for t in a.lengths):
        p.error(f"--lengths: lengths must be positive, got {a.lengths}")
    for name in ("batch", "heads", "head_dim", "check_t", "scan_n", "scan_t", "scan_repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    return a


class Clock:
    """Elapsed seconds and the time budget."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self, share: float = 1.0) -> bool:
        return self.elapsed() > share * self.budget


def environment(device) -> dict:
    import torch

    import headint

    env = dict(date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), python=platform.python_version(), torch=torch.__version__,
               headint=headint.__version__, host=platform.node(), cpu=platform.processor() or platform.machine())
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # reported, not fatal: the correctness section says what fails
        env["triton"] = f"unavailable: {e}"
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception as e:
        env["transformers"] = f"unavailable: {e}"
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        env["git"] = ""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   sm_count=props.multi_processor_count)
    else:
        env.update(gpu=None, note="dry run: CPU tensors, Triton interpreter, tiny sizes; timings mean nothing")
    return env


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


def sync(device) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, dry) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on a GPU, a few timed calls otherwise."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(2 if dry else 5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def sdpa_flash(device):
    """The context that restricts SDPA to its flash backend (on CPU: nothing; the dry run's stand-in)."""
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


# ----------------------------------------------------------------------------------------------
# 1. correctness
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def one_tile_per_kernel(device, head_dim: int):
    """Pin each autotuned Triton kernel to one configuration: the leanest its autotuner has that
    fits ``head_dim`` on this GPU (under the interpreter there is only one anyway)."""
    import torch
    import triton
    from headint_kernels import attention_bwd, attention_fwd, config

    kernels = {"fwd": attention_fwd.attn_fwd, "dq": attention_bwd.attn_bwd_dq, "dkdv": attention_bwd.attn_bwd_dkdv}
    arch = 10 * torch.cuda.get_device_capability(0)[0] + torch.cuda.get_device_capability(0)[1] if device == "cuda" else 80
    saved = {k: (fn.configs, dict(fn.cache)) for k, fn in kernels.items()}
    pinned = {}
    try:
        for kind, fn in kernels.items():
            tiles = config.usable_tiles(kind, head_dim, interpret=config.INTERPRET, arch=arch, elem=2)
            bm, bn, w, s = min(tiles, key=lambda t: (t[0] * t[1], t[0]))
            fn.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]
            fn.cache.clear()
            pinned[kind] = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
        yield pinned
    finally:
        for kind, fn in kernels.items():
            fn.configs, cache = saved[kind]
            fn.cache.clear()
            fn.cache.update(cache)


def case_inputs(spec: dict, B, Hq, Hkv, T, D, device, seed=0) -> tuple[dict, dict]:
    """(differentiable leaves in float32, other keyword arguments) of one correctness case."""
    import torch

    from headint.ops import EdgeKnockout

    g = torch.Generator(device="cpu").manual_seed(seed)
    Dv = 2 * D if spec.get("v_dim") else D

    def rn(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(device)

    leaves = {"q": rn(B, Hq, T, D), "k": rn(B, Hkv, T, D), "v": rn(B, Hkv, T, Dv)}
    kw = {"causal": spec.get("causal", True)}
    if spec.get("head_mask"):
        leaves["head_mask"] = (torch.rand(B, Hq, T, generator=g) * 1.5 - 0.25).to(device)
    if spec.get("head_patch"):
        leaves["head_patch"] = rn(B, Hq, T, Dv)
    if spec.get("score_scale"):
        leaves["score_scale"] = (torch.rand(B, Hq, generator=g) * 2).to(device)
    if spec.get("sinks"):
        leaves["sinks"] = rn(Hq)
    if spec.get("softcap"):
        kw["softcap"] = 20.0
    if spec.get("knockout"):
        qs = torch.rand(B, Hq, T, generator=g) < 0.5
        ks = torch.rand(B, 1, T, generator=g) < 0.3
        qs2 = torch.zeros(T, dtype=torch.bool)
        qs2[T // 2:] = True
        ks2 = torch.zeros(T, dtype=torch.bool)
        ks2[: max(1, T // 8)] = True
        kw["knockout"] = [EdgeKnockout(qs.to(device), ks.to(device)), EdgeKnockout(qs2.to(device), ks2.to(device))]
    if spec.get("mask"):
        keep = torch.rand(B, 1, T, T, generator=g) < 0.8
        keep[..., 0] = True
        kw["attn_mask"] = keep.to(device)
    if spec.get("window"):
        kw["window"] = max(2, T // 3)
    return leaves, kw


def run_attention(backend, leaves, kw, dtype, grad_out):
    """Output and gradients of every leaf, the leaves cast to ``dtype`` (head masks, score scales
    and sinks stay float32, float64 for a float64 run: the op's own types)."""
    import torch

    from headint.ops import attention

    cast = {}
    for n, t in leaves.items():
        keep32 = n in ("head_mask", "score_scale", "sinks") and dtype != torch.float64
        cast[n] = t.detach().to(torch.float32 if keep32 else dtype).requires_grad_(True)
    out = attention(cast["q"], cast["k"], cast["v"], backend=backend, **{n: t for n, t in cast.items() if n not in ("q", "k", "v")},
                    **kw)
    grads = torch.autograd.grad(out, list(cast.values()), grad_out.to(out.dtype))
    return out.detach(), dict(zip(cast, grads))


def compare(out, grads, ref, ref_grads, lowp, lowp_grads, dtype) -> dict:
    """Per output / gradient: error, the low-precision reference's error, the tolerance, ok."""
    import torch

    eps = 1e-5 if dtype == torch.float32 else 1e-2
    errors = {}
    for name, a, r, lp in [("out", out, ref, lowp)] + [(f"d{n}", grads[n], ref_grads[n], lowp_grads[n]) for n in ref_grads]:
        e = (a.double() - r.double()).norm().item()
        e_lp = (lp.double() - r.double()).norm().item()
        tol = 3.0 * e_lp + eps * r.double().norm().item() + 1e-6
        finite = bool(torch.isfinite(a).all())
        errors[name] = {"err": e, "ref_lowp_err": e_lp, "tol": tol, "ok": finite and e <= tol}
    return errors


def check_call(name, spec, leaves, kw, dtype, device, extra=None) -> dict:
    import torch

    B, Hq, T = leaves["q"].shape[:3]
    g = torch.Generator(device="cpu").manual_seed(1)
    grad_out = torch.randn(B, Hq, T, leaves["v"].shape[-1], generator=g).to(device)
    row = dict(name=name, operands=sorted(k for k, v in spec.items() if v is True), dtype=str(dtype).replace("torch.", ""),
               shape=dict(B=B, Hq=Hq, Hkv=leaves["k"].shape[1], T=T, D=leaves["q"].shape[-1], Dv=leaves["v"].shape[-1]),
               causal=kw.get("causal"), **(extra or {}))
    t0 = time.perf_counter()
    try:
        out, grads = run_attention("triton", leaves, kw, dtype, grad_out)
        ref, ref_grads = run_attention("reference", leaves, kw, torch.float64, grad_out)
        lowp, lowp_grads = run_attention("reference", leaves, kw, dtype, grad_out)
        row["errors"] = compare(out, grads, ref, ref_grads, lowp, lowp_grads, dtype)
        row["ok"] = all(e["ok"] for e in row["errors"].values())
    except Exception as e:  # a crash is a failed check, reported with its message
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def section_correctness(args, device, clock) -> list[dict]:
    import torch

    rows = []
    D = args.check_d
    with one_tile_per_kernel(device, head_dim=2 * D) as pinned:
        for name in args.cases:
            spec = OPERAND_CASES[name]
            if clock.over(SECTION_BUDGET["correctness"]):
                rows.append(dict(name=name, ok=None, skipped="time budget"))
                continue
            dtype = getattr(torch, spec.get("dtype", "bfloat16"))
            leaves, kw = case_inputs(spec, 2, 4, 2, args.check_t, D, device, seed=len(rows))
            rows.append(check_call(name, spec, leaves, kw, dtype, device, extra={"tiles": pinned}))
            r = rows[-1]
            worst = "" if "errors" not in r else max(r["errors"].items(), key=lambda kv: kv[1]["err"] / kv[1]["tol"])
            print(f"  correctness {name:16s} {r['dtype']:9s} {'ok' if r['ok'] else 'FAILED'}"
                  + (f"  (worst {worst[0]}: {worst[1]['err']:.2e} <= {worst[1]['tol']:.2e})" if worst else "")
                  + (f"  {r['error']}" if "error" in r else "") + f"  [{r['seconds']} s]", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# 2. kernels
# ----------------------------------------------------------------------------------------------
def flops(B, H, T, D, mode) -> float:
    """Causal attention: forward ``4 B H T^2 D / 2``, backward 2.5x the forward."""
    f = 2.0 * B * H * T * T * D
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def variant_inputs(variant, B, H, T, D, dtype, device, grad, seed=0):
    import torch

    from headint.ops import EdgeKnockout

    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3))
    kw = {}
    if variant == "head_mask+patch":
        kw["head_mask"] = torch.rand(B, H, T, generator=g).to(device).requires_grad_(grad)
        kw["head_patch"] = torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_(grad)
    elif variant == "knockout":
        qs = torch.rand(B, H, T, generator=g) < 0.5
        ks = torch.rand(B, H, T, generator=g) < 0.1
        kw["knockout"] = EdgeKnockout(qs.to(device), ks.to(device))
    return q, k, v, kw


def section_kernels(args, device, clock, result, save=lambda: None) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from headint.ops import attention

    dtype = torch.bfloat16
    B, H, D = args.batch, args.heads, args.head_dim
    rows = []
    for ti, T in enumerate(args.lengths):
        for mode in ("fwd", "fwd+bwd"):
            if clock.over(SECTION_BUDGET["kernels"]):
                rows.append(dict(T=T, mode=mode, skipped="time budget"))
                continue
            grad = mode == "fwd+bwd"
            row = dict(T=T, mode=mode, B=B, H=H, D=D, dtype=str(dtype).replace("torch.", ""), causal=True, ms={}, tflops={})
            fns = {}
            for variant in VARIANTS:
                q, k, v, kw = variant_inputs(variant, B, H, T, D, dtype, device, grad)
                if ti == 0 and mode == "fwd+bwd":  # the autotuned kernels against the reference, once per variant
                    spec = {"head_mask": "head_mask" in kw, "head_patch": "head_patch" in kw}
                    leaves = {"q": q.detach().float(), "k": k.detach().float(), "v": v.detach().float(),
                              **{n: kw[n].detach().float() for n in ("head_mask", "head_patch") if n in kw}}
                    extra_kw = {"causal": True, **({"knockout": kw["knockout"]} if "knockout" in kw else {})}
                    chk = check_call(f"autotuned {variant} T={T}", spec, leaves, extra_kw, dtype, device)
                    result["correctness"].append(chk)
                    print(f"  correctness {chk['name']:30s} {'ok' if chk['ok'] else 'FAILED'}", flush=True)
                fns[f"triton {variant}"] = (lambda q=q, k=k, v=v, kw=kw: attention(q, k, v, causal=True, backend="triton", **kw), (q, k, v, kw))
            q, k, v, _ = variant_inputs("none", B, H, T, D, dtype, device, grad)

            def flash(q=q, k=k, v=v):
                with sdpa_flash(device):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            fns["sdpa flash"] = (flash, (q, k, v, {}))
            for name, (fn, (q_, k_, v_, kw_)) in fns.items():
                leaves = [x for x in (q_, k_, v_, kw_.get("head_mask"), kw_.get("head_patch")) if x is not None]
                go = torch.randn_like(q_)

                def step(fn=fn, leaves=leaves, go=go):
                    if grad:
                        for x in leaves:
                            x.grad = None
                        fn().backward(go)
                    else:
                        with torch.no_grad():
                            fn()

                try:
                    step()  # compile / autotune outside the timing
                    sync(device)
                    ms = time_ms(step, device, args.dry_run)
                    row["ms"][name] = ms
                    row["tflops"][name] = flops(B, H, T, D, mode) / (ms * 1e-3) / 1e12
                except Exception as e:  # one failing method must not stop the table
                    row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:300]
                if device == "cuda":
                    torch.cuda.empty_cache()
            ms = row["ms"]
            plain = ms.get("triton none")
            row["speed_vs_plain"] = {v: plain / ms[f"triton {v}"] for v in VARIANTS[1:] if plain and f"triton {v}" in ms}
            row["speed_vs_sdpa_flash"] = {v: ms["sdpa flash"] / ms[f"triton {v}"] for v in VARIANTS
                                          if "sdpa flash" in ms and f"triton {v}" in ms}
            rows.append(row)
            result["kernels"] = rows
            save()
            print(f"  kernels T={T:6d} {mode:8s} " + "  ".join(f"{n} {x:.3f} ms" for n, x in ms.items())
                  + "  vs plain " + ", ".join(f"{v} {x:.2f}x" for v, x in row["speed_vs_plain"].items()), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# 3. scan
# ----------------------------------------------------------------------------------------------
def section_scan(args, device, clock) -> dict:
    import torch

    import headint
    from headint.metrics import LogitDiff

    sys.path.insert(0, str(ROOT / "bench"))
    import peers
    from scan_vs_hooks import build_model, make_batch

    if clock.over():
        return dict(skipped="time budget")
    model = build_model(args.scan_config, device=device)
    batch = make_batch(model, args.scan_n, args.scan_t, device=device)
    L, H = model.config.n_layer, model.config.n_head
    clean, corrupt = batch["input_ids"], batch["corrupt_ids"]
    tgt, con = int(batch["target"][0]), int(batch["contrast"][0])
    hi_clean = {"input_ids": clean, "target": batch["target"], "contrast": batch["contrast"]}
    hi_corrupt = {"input_ids": corrupt, "target": batch["target"], "contrast": batch["contrast"]}
    backend = "triton" if args.dry_run else "auto"
    fns = {
        "hook loop": lambda: peers.hook_loop(model, clean, corrupt, tgt, con),
        "headint.scan": lambda: headint.scan(model, hi_clean, LogitDiff(), corrupt=hi_corrupt, method="patch",
                                             direction="denoising", backend=backend, progress=False).per_example,
    }
    first = {}
    for name, fn in fns.items():  # warm-up (kernels compile) and the values
        first[name] = fn()
        sync(device)
    ran = headint.last_backend()
    diff = (first["headint.scan"].reshape(L * H, -1).float() - first["hook loop"].float()).abs().max().item()
    times = {name: [] for name in fns}
    for r in range(args.scan_repeats):
        if clock.over():
            break
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items() if t}
    speedup = med["hook loop"] / med["headint.scan"] if len(med) == 2 else None
    out = dict(config=args.scan_config, layers=L, heads=H, N=args.scan_n, T=args.scan_t, dtype="float32",
               method="activation patching, denoising, LogitDiff", backend_requested=backend, backend_ran=ran,
               max_abs_diff=diff, values_agree=diff <= 1e-3, seconds=times, median_s=med, speedup=speedup)
    print(f"  scan {args.scan_config} N={args.scan_n} T={args.scan_t}: max abs diff {diff:.2e}; "
          + ", ".join(f"{n} {s:.3f} s" for n, s in med.items()) + (f"; speed-up {speedup:.1f}x" if speedup else ""), flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def targets(result) -> dict:
    out = {}
    fwd = [r for r in result.get("kernels", []) if r.get("mode") == "fwd" and "ms" in r]
    for key, field in (("intervened_fwd_vs_plain", "speed_vs_plain"), ("intervened_fwd_vs_sdpa_flash", "speed_vs_sdpa_flash")):
        vals = {f"T={r['T']} {v}": x for r in fwd for v, x in r.get(field, {}).items() if v != "none"}
        out[key] = dict(target=TARGETS[key], values=vals, min=min(vals.values()) if vals else None,
                        met=bool(vals) and min(vals.values()) >= TARGETS[key])
    scan = result.get("scan", {})
    sp = scan.get("speedup")
    out["scan_vs_hook_loop"] = dict(target=TARGETS["scan_vs_hook_loop"], value=sp,
                                    met=sp is not None and sp >= TARGETS["scan_vs_hook_loop"] and bool(scan.get("values_agree")))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports the kernels
    sys.path.insert(0, str(ROOT / "kernels"))
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device for this Python ({sys.executable}, torch {torch.__version__}): run it on a GPU "
              "machine with a CUDA torch (bash scripts/gpu_check.sh takes PYTHON=...), or pass --dry-run to test the "
              "script on CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    clock = Clock(args.budget_s)
    out = Path(args.out)
    result = {"environment": environment(device), "args": {k: v for k, v in vars(args).items()}, "dry_run": args.dry_run,
              "correctness": [], "kernels": [], "scan": {}, "skipped": []}
    print(f"gpu_check: {result['environment'].get('gpu') or 'CPU (dry run)'}, torch {torch.__version__}, "
          f"triton {result['environment']['triton']}; budget {args.budget_s:.0f} s", flush=True)
    write(out, result)
    if "correctness" in args.sections:
        result["correctness"] = section_correctness(args, device, clock)
        result["elapsed_s"] = round(clock.elapsed(), 1)
        write(out, result)
    if "kernels" in args.sections:
        result["kernels"] = section_kernels(args, device, clock, result, save=lambda: write(out, result))
        result["elapsed_s"] = round(clock.elapsed(), 1)
        write(out, result)
    if "scan" in args.sections:
        try:
            result["scan"] = section_scan(args, device, clock)
        except Exception as e:
            result["scan"] = dict(error=f"{type(e).__name__}: {e}"[:500])
            print(f"  scan failed: {result['scan']['error']}", flush=True)
    result["skipped"] = ([f"correctness {r['name']}" for r in result["correctness"] if r.get("skipped")]
                         + [f"kernels T={r['T']} {r['mode']}" for r in result["kernels"] if r.get("skipped")]
                         + (["scan"] if result["scan"].get("skipped") else []))
    checks = [r for r in result["correctness"] if r.get("ok") is not None]
    result["ok"] = bool(checks) and all(r["ok"] for r in checks) and not result["scan"].get("error") and (
        result["scan"].get("values_agree", True))
    result["targets"] = targets(result)
    result["elapsed_s"] = round(clock.elapsed(), 1)
    write(out, result)
    failed = [r["name"] for r in checks if not r["ok"]]
    print(f"gpu_check: {'ok' if result['ok'] else 'FAILED'} in {result['elapsed_s']} s"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; skipped (time budget): {', '.join(result['skipped'])}" if result["skipped"] else "")
          + "; targets: " + ", ".join(f"{k} {'met' if v['met'] else 'not met'}" for k, v in result["targets"].items())
          + f"; wrote {out}", flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
