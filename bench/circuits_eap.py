"""All-edges EAP and EAP-IG: time and peak memory, headint vs a per-receiver-copy hook implementation.

Two models built from configs with random weights (float32, CPU):

- ``gpt2-small``: GPT-2 small's shape (12 layers, 12 heads, d_model 768, vocabulary 50257);
- ``llama-gqa``: a Llama with grouped-query attention (8 layers, 16 query / 4 key-value heads,
  d_model 1024, MLP 2816, vocabulary 32000).

Each measurement runs in its own subprocess and reports the growth of the peak resident set
size (``ru_maxrss``) over what the process held after loading the model and the inputs (and a
warm-up on 4 tokens, so the one-time structure probe is not counted), and the wall time:

- ``fwd+bwd``: a plain forward and backward of the model (logit difference at the last token),
  parameters requiring grad as loaded (their gradients are allocated);
- ``fwd+bwd frozen``: the same with frozen parameters and the gradient taken at the embeddings;
- ``fwd+bwd frozen xsteps``: the same on ``N * steps`` rows (each example ``steps`` times): the
  plain counterpart of EAP-IG's one batch of ``N * steps`` rows;
- ``headint eap`` / ``headint eap-ig``: :func:`headint.circuits.attribute`, every edge, all
  examples in one batch (EAP-IG: ``--steps`` interpolation steps as rows of that batch);
- ``hook eap`` / ``hook eap-ig``: ``tests/circuit_oracle.py``: the residual stream as an explicit
  sum of sender outputs and a separate copy of it for every receiver (every head's q, k and v
  input, every MLP input, the logits), gradients read from the copies (EAP-IG: one
  forward + backward per step), as TransformerLens-based implementations do.

Run: ``python bench/circuits_eap.py [--N 4] [--T 128] [--steps 5] [--models gpt2-small,llama-gqa]``;
it prints a table and writes ``bench/results/circuits_eap.json``. Numbers are machine-dependent
(and noisy on a shared machine); nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHATS = ("fwd+bwd", "fwd+bwd frozen", "fwd+bwd frozen xsteps", "headint eap", "hook eap", "headint eap-ig", "hook eap-ig")


def _model(name: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if name == "gpt2-small":
        cfg = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, hidden_size=1024,
                                       intermediate_size=2816, vocab_size=32000, max_position_embeddings=1024)
        model = transformers.LlamaForCausalLM(cfg)
    return model.eval()


def child(name: str, what: str, N: int, T: int, steps: int, threads: int = 2) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from headint import circuits

    torch.set_num_threads(threads)
    model = _model(name)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids, cor = torch.randint(0, V, (N, T), generator=g), torch.randint(0, V, (N, T), generator=g)
    tgt, con = ids[:, 0], ids[:, 1]
    clean, corrupt = {"input_ids": ids, "target": tgt, "contrast": con}, {"input_ids": cor}

    def metric(logits):
        last = logits[:, -1]
        return last.gather(1, tgt[:, None])[:, 0] - last.gather(1, con[:, None])[:, 0]

    if what.startswith("headint"):  # warm-up: the structure probe, on 4 tokens
        circuits.attribute(model, {"input_ids": ids[:1, :4], "target": tgt[:1], "contrast": con[:1]},
                           {"input_ids": cor[:1, :4]}, method="eap")
    if what.startswith("hook"):
        from circuit_oracle import Oracle

        oracle = Oracle(model)
        for p in model.parameters():
            p.requires_grad_(False)
    if what == "fwd+bwd frozen xsteps":
        ids, tgt, con = ids.repeat_interleave(steps, 0), tgt.repeat_interleave(steps), con.repeat_interleave(steps)
    if what.startswith("fwd+bwd frozen"):
        for p in model.parameters():
            p.requires_grad_(False)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if what == "fwd+bwd":
        metric(model(ids).logits).sum().backward()
    elif what.startswith("fwd+bwd frozen"):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        metric(model(inputs_embeds=emb).logits).sum().backward()
    elif what == "headint eap":
        circuits.attribute(model, clean, corrupt, method="eap", batch_size=N)
    elif what == "headint eap-ig":
        circuits.attribute(model, clean, corrupt, method="eap-ig", steps=steps, batch_size=N)
    elif what == "hook eap":
        oracle.eap(ids, cor, metric)
    elif what == "hook eap-ig":
        with torch.no_grad():
            _, src, _ = oracle.run(cor)
            _, live, _ = oracle.run(ids)
        orig = oracle.embed
        total: dict = {}
        for k in range(steps):
            emb = src["input"] + (k / steps) * (live["input"] - src["input"])
            oracle.embed = lambda _ids, emb=emb: emb
            with torch.enable_grad():
                logits, _, inputs = oracle.run(ids, grads=True)
                metric(logits).sum().backward()
            for v, (x, ups) in inputs.items():
                for u in ups:
                    total[(u, v)] = total.get((u, v), 0.0) + float(((src[u] - live[u]) * x.grad).sum())
            del logits, inputs
        oracle.embed = orig
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "what": what, "N": N, "T": T, "steps": steps, "threads": threads, "seconds": seconds,
            "peak_growth_mib": (peak - start) / 1024, "params": params}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=4)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", default="gpt2-small,llama-gqa")
    ap.add_argument("--skip", default="", help="comma-separated measurements to skip (e.g. 'hook eap-ig')")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per measurement (1 is steadier on a loaded machine)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "circuits_eap.json"), help="where the JSON goes")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.N, args.T, args.steps, args.threads)))
        return 0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    rows = []
    for name in args.models.split(","):
        for what in WHATS:
            if what in skip:
                continue
            cmd = [sys.executable, __file__, "--child", name, what, "--N", str(args.N), "--T", str(args.T), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"{name} {what}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{name:11s} {what:16s} {row['seconds']:8.2f} s  peak +{row['peak_growth_mib']:8.1f} MiB", flush=True)
    print()
    for name in args.models.split(","):
        r = {x["what"]: x for x in rows if x["model"] == name}
        for what in ("headint eap", "headint eap-ig", "hook eap", "hook eap-ig"):
            if what not in r:
                continue
            base = r.get("fwd+bwd")  # EAP-IG (N * steps rows) against the frozen fwd+bwd of as many rows
            frozen = r.get("fwd+bwd frozen xsteps" if what.endswith("eap-ig") else "fwd+bwd frozen")
            line = f"{name:11s} {what:16s}"
            if base and base["peak_growth_mib"] > 0:
                line += f"  memory / fwd+bwd {r[what]['peak_growth_mib'] / base['peak_growth_mib']:5.2f}"
            if frozen and frozen["peak_growth_mib"] > 0:
                line += f"  / frozen fwd+bwd (same rows) {r[what]['peak_growth_mib'] / frozen['peak_growth_mib']:5.2f}"
            hook = r.get(what.replace("headint", "hook"))
            if what.startswith("headint") and hook and hook["peak_growth_mib"] > 0 and r[what]["seconds"] > 0:
                line += f"  speed-up vs hooks {hook['seconds'] / r[what]['seconds']:6.1f}x  memory vs hooks " \
                        f"{r[what]['peak_growth_mib'] / hook['peak_growth_mib']:5.2f}"
            print(line)
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"N": args.N, "T": args.T, "steps": args.steps, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
