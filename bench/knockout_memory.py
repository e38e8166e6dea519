"""Peak memory of knockouts at long context: the attention op alone, and a whole knockout scan.

``--what op`` (issue #25's measurement): one forward + backward of the attention op at T = 8192
(``--B 1 --H 4 --D 64``, fp32, causal) in a fresh subprocess per case; each reports the peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the call, so the
kernel keeps the peak: no sampling) above the resident set before the call, with the inputs, the
upstream gradient and the loaded kernel already in memory (one tiny warm-up call first):

- ``sdpa``: plain causal ``torch.nn.functional.scaled_dot_product_attention`` (the baseline);
- ``cpu none``: ``headint.attention(backend="cpu")`` without interventions;
- ``cpu knockout``: the same with a compact knockout (random query x key selectors per head);
- ``sdpa dense-mask knockout``: what the same knockout costs through SDPA (a [T, T] bool mask).

``--what scan``: a 2-layer, 4-head, d_model 64 GPT-2 (random weights, 4096 positions) on N
examples of T = 4096 tokens; the growth of the peak resident set (``ru_maxrss``) over what the
process held after loading the model and the inputs, for

- ``plain``: one forward of the model as loaded (its default attention, SDPA), no grad;
- ``knockout``: ``headint.knockout_scan`` with ``window=1`` over both layers and 8 source sets
  (blocks of 512 positions), the final query's edges knocked out, so 16 variants x N rows.

Run: ``python bench/knockout_memory.py --what op [--T 8192]`` or
``python bench/knockout_memory.py [--what scan] [--T 4096] [--N 2] [--batch-size 8]``. Numbers are
machine-dependent; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from peak_memory import PeakRSS

OP_CASES = ("sdpa", "cpu none", "cpu knockout", "sdpa dense-mask knockout")


def _model(T: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=256, n_positions=T, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def child(what: str, T: int, N: int, batch_size: int) -> dict:
    import torch

    import headint

    torch.set_num_threads(2)
    model = _model(T)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (N, T), generator=g)
    batch = {"input_ids": ids, "target": ids[:, 0], "contrast": ids[:, 1]}
    if what == "knockout":  # warm the kernel up on a short input so its build is not measured
        headint.knockout_scan(model, dict(batch, input_ids=ids[:, :8]), "logit_diff", sources=[0], progress=False)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with torch.no_grad():
        if what == "plain":
            model(input_ids=ids)
            rows = N
        else:
            sources = {f"{i * 512}-{(i + 1) * 512 - 1}": list(range(i * 512, min(T, (i + 1) * 512))) for i in range(8)}
            res = headint.knockout_scan(model, batch, "logit_diff", sources=sources, window=1, batch_size=batch_size,
                                        progress=False)
            rows = int(res.per_example.numel())
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(what=what, T=T, N=N, rows=rows, seconds=round(seconds, 2), peak_growth_mib=round((peak - start) / 1024, 1),
                peak_mib=round(peak / 1024, 1))


def op_child(case: str, T: int, B: int, H: int, D: int, threads: int) -> dict:
    """One forward + backward of ``case``; the peak resident set above the start, in MiB."""
    import torch
    import torch.nn.functional as F

    import headint
    from headint.ops import EdgeKnockout

    torch.set_num_threads(threads)

    def inputs(T):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_(True) for _ in range(3))
        ko = EdgeKnockout(torch.rand(B, H, T, generator=g) < 0.5, torch.rand(B, H, T, generator=g) < 0.1)
        return q, k, v, ko, torch.randn(B, H, T, D, generator=g)

    def call(q, k, v, ko):
        if case == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if case == "sdpa dense-mask knockout":
            n = q.shape[2]
            keep = torch.ones(n, n, dtype=torch.bool).tril() & ~(ko.queries[..., :, None] & ko.keys[..., None, :])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return headint.attention(q, k, v, causal=True, backend="cpu", knockout=ko if case == "cpu knockout" else None)

    tiny = inputs(64)
    call(*tiny[:4]).backward(tiny[4])  # load the kernel, warm the allocator and thread pool
    del tiny
    q, k, v, ko, dout = inputs(T)
    t = time.perf_counter()
    with PeakRSS() as m:
        call(q, k, v, ko).backward(dout)
    seconds = time.perf_counter() - t
    return dict(case=case, T=T, B=B, H=H, D=D, seconds=round(seconds, 2), extra_mib=round(m.peak / 2**20, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=("scan", "op"), default="scan")
    ap.add_argument("--T", type=int, default=None, help="default: 4096 (scan), 8192 (op)")
    ap.add_argument("--N", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="*", default=list(OP_CASES), choices=OP_CASES)
    ap.add_argument("--child", default=None)
    ap.add_argument("--op-child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.T, a.N, a.batch_size)))
        return
    if a.op_child:
        print(json.dumps(op_child(a.op_child, a.T, a.B, a.H, a.D, a.threads)))
        return
    if a.what == "op":
        T = a.T or 8192
        rows = []
        for case in a.cases:
            out = subprocess.run([sys.executable, __file__, "--op-child", case, "--T", str(T), "--B", str(a.B), "--H", str(a.H),
                                  "--D", str(a.D), "--threads", str(a.threads)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        base = next((r["extra_mib"] for r in rows if r["case"] == "sdpa"), None)
        if base:
            for r in rows:
                print(f"{r['case']:>26}: {r['extra_mib']:8.1f} MiB  {r['extra_mib'] / base:5.2f}x plain causal SDPA")
        return
    T = a.T or 4096
    for what in ("plain", "knockout"):
        out = subprocess.run([sys.executable, __file__, "--child", what, "--T", str(T), "--N", str(a.N),
                              "--batch-size", str(a.batch_size)], capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
