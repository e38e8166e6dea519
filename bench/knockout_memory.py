"""Peak memory of an attention-knockout scan at long context vs a plain forward.

A 2-layer, 4-head, d_model 64 GPT-2 (random weights, 4096 positions) on N examples of T = 4096
tokens. Each measurement runs in its own subprocess and reports the growth of the peak resident
set size (``resource.getrusage(...).ru_maxrss``) over what the process held after loading the
model and the inputs:

- ``plain``: one forward of the model as loaded (its default attention, SDPA), no grad;
- ``knockout``: ``headint.knockout_scan`` with ``window=1`` over both layers and 8 source sets
  (blocks of 512 positions), the final query's edges knocked out, so 16 variants x N rows.

Run: ``python bench/knockout_memory.py [--T 4096] [--N 2] [--batch-size 8]``. Numbers are
machine-dependent; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--N", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.T, a.N, a.batch_size)))
        return
    for what in ("plain", "knockout"):
        out = subprocess.run([sys.executable, __file__, "--child", what, "--T", str(a.T), "--N", str(a.N),
                              "--batch-size", str(a.batch_size)], capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
