"""Data-parallel scan throughput: one exact ``headint.scan`` in 1 process and split over N processes.

    python bench/scan_distributed.py                      # CPU: GPT-2-small shaped, 1 vs 2 processes (gloo), 1 thread each
    python bench/scan_distributed.py --quick              # tiny model, seconds: a smoke test
    python bench/scan_distributed.py --device cuda --world 1 2 4 --layers all   # GPUs: one per rank (NCCL)

The model is built from a ``transformers.GPT2Config`` (random weights, seeded; no download), the
prompts are seeded random token ids, the metric a logit difference at the last position. Each
world size runs in fresh processes launched like ``torchrun`` (MASTER_ADDR=127.0.0.1, a free
port; world size 1 runs without a process group): every rank builds the model, then the scan
call alone is timed (after a barrier), and the reported time is the slowest rank's. The
per-example values of every world size are checked bit-identical to world size 1 before any
time is reported. The machine's load average is printed with the results (on a shared machine
another job's load shows up as a smaller speed-up). ``--out`` gets a JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(quick: bool):
    import transformers

    torch.manual_seed(0)
    if quick:
        cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
    else:  # GPT-2 small
        cfg = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = 0.0
    return transformers.GPT2LMHeadModel(cfg).eval()


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(args["threads"])
    import torch.distributed as dist

    import headint
    from headint.metrics import LogitDiff

    cuda = args["device"] == "cuda"
    if world > 1:
        if cuda:
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(minutes=30))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    model = _model(args["quick"]).to(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args["n"], args["t"]), generator=g).to(device)
    layers = None if args["layers"] == "all" else [int(x) for x in args["layers"].split(",")]
    kw = dict(layers=layers, batch_size=args["batch_size"], progress=False, backend=args["backend"])
    metric = LogitDiff(1, 2)
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    result = headint.scan(model, ids, metric, **kw)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    torch.save({"seconds": seconds, "values": result.per_example, "cost": result.settings["cost"]}, Path(out) / f"w{world}-r{rank}.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_world(world: int, args: dict, out: Path) -> dict:
    mp.start_processes(_worker, args=(world, _free_port(), args, str(out)), nprocs=world, join=True, start_method="spawn")
    ranks = [torch.load(out / f"w{world}-r{r}.pt", weights_only=False) for r in range(world)]
    return {"seconds": max(r["seconds"] for r in ranks), "values": ranks[0]["values"], "all_values": [r["values"] for r in ranks]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--world", type=int, nargs="+", default=[1, 2], help="world sizes to run (the first is the reference)")
    p.add_argument("--quick", action="store_true", help="tiny model, seconds")
    p.add_argument("--n", type=int, default=None, help="examples (default 4; 2 with --quick)")
    p.add_argument("--t", type=int, default=None, help="tokens per example (default 32; 8 with --quick)")
    p.add_argument("--layers", default=None, help="comma-separated layers to scan, or 'all' (default CPU: 0,6; cuda/quick: all)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward (default 24 CPU, 256 cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--backend", default=None, help="attention backend (default cpu on CPU, triton on cuda)")
    p.add_argument("--out", default="bench/results/scan_distributed.json")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda and max(a.world) > torch.cuda.device_count():
        print(f"--world {max(a.world)} needs that many GPUs; this machine has {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    args = dict(device=a.device, quick=a.quick, threads=a.threads,
                n=a.n or (2 if a.quick else 4), t=a.t or (8 if a.quick else 32),
                layers=a.layers or ("all" if (cuda or a.quick) else "0,6"),
                batch_size=a.batch_size or (256 if cuda else 24),
                backend=a.backend or ("triton" if cuda else "cpu"))
    tmp = Path(a.out).parent / "scan_distributed_ranks"
    tmp.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    runs = {w: run_world(w, args, tmp) for w in a.world}
    load_after = os.getloadavg()
    ref = runs[a.world[0]]["values"]
    for w, r in runs.items():
        for v in r["all_values"]:
            if not torch.equal(v.nan_to_num(7.0), ref.nan_to_num(7.0)):
                print(f"world {w}: values differ from world {a.world[0]} (max diff {(v - ref).abs().nan_to_num().max():.3g})", file=sys.stderr)
                return 1
    base = runs[a.world[0]]["seconds"]
    print(f"headint.scan, {'tiny' if a.quick else 'GPT-2 small'} shaped, N={args['n']} T={args['t']} layers={args['layers']} "
          f"batch={args['batch_size']} backend={args['backend']} device={a.device}, {args['threads']} thread(s) per process")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'processes':>9} {'seconds':>9} {'speed-up':>9}")
    for w, r in runs.items():
        print(f"{w:>9} {r['seconds']:>9.2f} {base / r['seconds']:>9.2f}")
    print("values: bit-identical across world sizes")
    record = dict(args=args, world=a.world, seconds={w: r["seconds"] for w, r in runs.items()},
                  speedup={w: base / r["seconds"] for w, r in runs.items()}, load_before=load_before, load_after=load_after,
                  cpus=os.cpu_count(), machine=platform.platform(), torch=torch.__version__)
    Path(a.out).write_text(json.dumps(record, indent=2))
    for f in tmp.glob("w*-r*.pt"):
        f.unlink()
    tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
