"""Long-context scans: time, peak memory and the share spent in attention, against the hook loop.

A small GPT-2 (default 4 layers, 4 heads, d_model 128, vocabulary 512, seeded random weights)
at T = 1024 and 4096 (``--long-t``): the all-heads exact scan (``headint.scan``, activation
patching, LogitDiff) and the attribution scan (``headint.attribution_scan``, patch) against
the hook loop (one forward per head, ``transformers``' SDPA attention, full logits).

- time: wall and process CPU seconds, median over ``--long-repeats`` interleaved repeats;
- peak memory: on CPU, each method's first call runs in a fresh subprocess (this file with
  ``--peak METHOD T N BACKEND THREADS``) that builds the same model and inputs, resets the
  kernel's peak resident-set mark (``/proc/self/clear_refs``), and reports the peak (``VmHWM``,
  kept by the kernel: no sampling) above the resident set before the call, one-time costs (the
  model's probe, loading the C++ kernel) included; on CUDA
  ``torch.cuda.max_memory_allocated`` above the allocation before the call;
- attention share: one extra run under ``torch.profiler``: the self time of every op whose
  name contains "attention" (``headint::attention_fwd/bwd``, ``aten::_scaled_dot_product_*``)
  over the self time of all ops.
"""

from __future__ import annotations

import os
import threading
import time

import torch
import transformers

import headint
from headint.metrics import LogitDiff

LONG_CONFIG = dict(n_layer=4, n_head=4, n_embd=128, vocab_size=512)


class PeakMemory:
    """Peak memory of the block above its start, in bytes (``.peak``)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = _rss()
        self._top = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._top = max(self._top, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._top, _rss()) - self._base
        return False


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def attention_share(fn, device: str) -> tuple[float, list[str]]:
    """(share of op self time in ops named "*attention*", their names) for one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    key = "self_device_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, key) for e in events)
    att = [e for e in events if "attention" in e.key.lower()]
    return (sum(getattr(e, key) for e in att) / total if total else float("nan")), sorted({e.key for e in att})


def build_long_model(device: str, T: int, dtype=torch.float32):
    cfg = transformers.GPT2Config(**LONG_CONFIG, n_positions=max(T, 1024), bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def long_methods(device: str, T: int, N: int, backend: str) -> tuple:
    """``(model, {method: callable})``: the long-context model and the methods timed on it."""
    import peers

    model = build_long_model(device, T)
    g = torch.Generator().manual_seed(3)
    V = model.config.vocab_size
    clean = torch.randint(0, V, (N, T), generator=g).to(device)
    corrupt = clean.clone()
    corrupt[:, :: max(1, T // 8)] = torch.randint(0, V, corrupt[:, :: max(1, T // 8)].shape, generator=g).to(device)
    tgt, con = 7, 11
    ids = dict(target=torch.full((N,), tgt, device=device), contrast=torch.full((N,), con, device=device))
    hi_clean, hi_corrupt = dict(input_ids=clean, **ids), dict(input_ids=corrupt, **ids)
    fns = {
        "hook loop": lambda: peers.hook_loop(model, clean, corrupt, tgt, con),
        "headint.scan": lambda: headint.scan(model, hi_clean, LogitDiff(), corrupt=hi_corrupt, method="patch",
                                             backend=backend, progress=False),
        "attribution_scan": lambda: headint.attribution_scan(model, hi_clean, hi_corrupt, LogitDiff(), method="patch",
                                                             direction="denoising", backend=backend),
    }
    if backend == "auto" and device == "cpu":  # the kernel auto picks against PyTorch's SDPA
        fns["headint.scan, backend sdpa"] = lambda: headint.scan(model, hi_clean, LogitDiff(), corrupt=hi_corrupt, method="patch",
                                                                 backend="sdpa", progress=False)
        fns["attribution_scan, backend sdpa"] = lambda: headint.attribution_scan(model, hi_clean, hi_corrupt, LogitDiff(),
                                                                                 method="patch", direction="denoising", backend="sdpa")
    return model, fns


def peak_in_subprocess(method: str, T: int, N: int, backend: str, threads: int) -> int:
    """Bytes: growth of a fresh process's peak resident set over one call of ``method``."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, __file__, "--peak", method, str(T), str(N), backend, str(threads)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _peak_main(method: str, T: str, N: str, backend: str, threads: str) -> None:
    torch.set_num_threads(int(threads))
    from peak_memory import PeakRSS

    _, fns = long_methods("cpu", int(T), int(N), backend)
    with PeakRSS() as m:
        fns[method]()
    print(m.peak)


def section_long_context(args, rec, interleaved, med, check_agree, print_table) -> dict:
    """See the module docstring; one table row per (T, method)."""
    rows, per_t = [], []
    for T in args.long_t:
        N = args.long_n
        model, fns = long_methods(args.device, T, N, args.backend)
        L, H = model.config.n_layer, model.config.n_head
        print(f"\n[long context] T={T}, N={N}, {L} layers x {H} heads, d_model {model.config.n_embd}: warm-up and checks ...")
        first, peak, share, share_ops = {}, {}, {}, {}
        for k, f in fns.items():
            if args.device == "cpu":
                first[k] = f()
                peak[k] = peak_in_subprocess(k, T, N, args.backend, args.threads)
            else:
                with PeakMemory(args.device) as pm:
                    first[k] = f()
                peak[k] = pm.peak
            share[k], share_ops[k] = attention_share(f, args.device)
        diff = max(check_agree(f"long context T={T}, {k} vs hook loop", first[k].per_example.reshape(L * H, N), first["hook loop"],
                               args.long_tol) for k in fns if k.startswith("headint.scan"))
        times, cpu, _ = interleaved(fns, args.long_repeats, args.device)
        settings = first["headint.scan"].settings
        for k in fns:
            rows.append(dict(T=T, method=k, median_s=med(times[k]), speedup_vs_hooks=med(times["hook loop"]) / med(times[k]),
                             cpu_s=med(cpu[k]), peak_mem_mib=peak[k] / 2**20, attention_share=share[k]))
        per_t.append(dict(T=T, N=N, times=times, cpu_times=cpu, peak_bytes=peak, attention_share=share, attention_ops=share_ops,
                          max_abs_diff=diff, headint_cost=settings["cost"], batch_rows=settings["batch_rows"],
                          final_block=settings["final_block"]))
        del model
    print_table(f"long context (median of {args.long_repeats}); peak memory above the start of each call", rows,
                ["T", "method", "median_s", "speedup_vs_hooks", "cpu_s", "peak_mem_mib", "attention_share"])
    out = dict(section="long_context", config=LONG_CONFIG, N=args.long_n, runs=per_t, rows=rows)
    rec.append(out)
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 7 and sys.argv[1] == "--peak":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        _peak_main(*sys.argv[2:])
    else:
        raise SystemExit("run bench/scan_vs_hooks.py (this module is its long-context section)")
