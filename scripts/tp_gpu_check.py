"""GPU checks of headint on more than one device (what the CPU test suite cannot run):

    pip install accelerate                                  # from_pretrained(tp_plan=..., device_map=...) needs it
    torchrun --nproc-per-node 2 scripts/tp_gpu_check.py     # 2+ GPUs, NCCL

1. tensor parallel: ``from_pretrained(path, tp_plan="auto")`` (each rank holds H/W query heads
   and Hkv/W key/value heads) against the same weights unsharded on each rank's GPU: recordings
   (full ``[B, T, H, D]`` on every rank), interventions naming heads of every rank (Ablate, Patch
   from a full recording, Scale of scores, Knockout, PatchQKV), an exact scan, a per-position scan
   and an attribution scan; equal up to the all-reduce's round-off (``--atol``);
2. data parallel: an exact scan split over the ranks (NCCL) bit-identical to ``distributed=False``;
3. split across devices (rank 0, 2 GPUs): ``device_map`` with the layers alternating between
   cuda:0 and cuda:1, scans equal to the model on one GPU.

The model is a small Llama built from its config (seeded, saved to ``--dir`` by rank 0).
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import headint

BACKEND = "auto"


def build(path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, hidden_size=256,
                                   intermediate_size=512, vocab_size=512, max_position_embeddings=128,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # peaked attention, so interventions matter
    model.save_pretrained(path)


def batch(device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (4, 16), generator=g)
    corrupt = ids.clone()
    corrupt[:, 3] = (corrupt[:, 3] + 7) % 511 + 1
    target, contrast = torch.randint(1, 512, (4,), generator=g), torch.randint(1, 512, (4,), generator=g)
    mk = lambda x: {"input_ids": x.to(device), "attention_mask": torch.ones_like(x).to(device), "target": target.to(device), "contrast": contrast.to(device)}  # noqa: E731
    return mk(ids), mk(corrupt)


def checks(model, clean, corrupt, distributed) -> dict:
    out = {}
    ids = clean["input_ids"]
    cache = headint.record(model, ids, what=("z", "k", "pattern"), backend=BACKEND)
    out.update({f"record {w}{l}": t.float().cpu() for (w, l), t in cache.tensors.items()})
    full = headint.record(model, corrupt["input_ids"], what=("z",), backend=BACKEND)
    ivs = {"ablate": [headint.Ablate(layer=1, head=[1, 6])], "patch": [headint.Patch(layer=2, head=[0, 5, 7], source=full)],
           "scale scores": [headint.Scale(layer=0, head=[2, 4], factor=2.0, target="scores")],
           "knockout": [headint.Knockout(queries=[10, 12], keys=[0, 1, 2], layer=3, head=7)],
           "patch k": [headint.PatchQKV(layer=1, head=3, which="k", source=full.get("z", 1)[:, :, :4].transpose(1, 2) * 0)]}
    for name, iv in ivs.items():
        with torch.no_grad(), headint.intervene(model, iv, backend=BACKEND):
            out[name] = model(ids).logits.float().cpu()
    out["scan"] = headint.scan(model, clean, "logit_diff", corrupt=corrupt, method="patch", progress=False, backend=BACKEND,
                               distributed=distributed).per_example
    out["scan per position"] = headint.scan(model, clean, "logprob", per_position=True, positions=[3, 9, 15], progress=False,
                                            backend=BACKEND, distributed=distributed).per_example
    out["attribution"] = headint.attribution_scan(model, clean, corrupt, "logit_diff", backend=BACKEND, distributed=distributed).per_example
    return out


def compare(name: str, ref: dict, got: dict, atol: float, exact: bool = False) -> bool:
    ok = True
    for k in ref:
        a, b = ref[k].float(), got[k].float()
        same = torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) if exact else torch.allclose(a, b, atol=atol, rtol=1e-4, equal_nan=True)
        if not same:
            ok = False
            print(f"FAIL {name}: {k} max diff {(a - b).abs().nan_to_num().max():.3g}", flush=True)
    print(f"{'ok  ' if ok else 'FAIL'} {name} ({len(ref)} checks) on rank {dist.get_rank()}", flush=True)
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description="headint multi-GPU checks (run under torchrun)")
    p.add_argument("--dir", default="/tmp/headint-tp-check")
    p.add_argument("--atol", type=float, default=2e-3)
    a = p.parse_args()
    import transformers

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    path = Path(a.dir)
    if rank == 0:
        build(path)
    dist.barrier()
    device = torch.device("cuda", local)
    clean, corrupt = batch(device)
    ok = True

    plain = transformers.AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    ref = checks(plain, clean, corrupt, distributed=False)
    tp = transformers.AutoModelForCausalLM.from_pretrained(path, tp_plan="auto").eval()
    ok &= compare(f"tensor parallel over {world} ranks", ref, checks(tp, clean, corrupt, distributed="auto"), a.atol)
    del tp

    single = headint.scan(plain, clean, "logit_diff", corrupt=corrupt, method="patch", per_position=True, batch_size=64,
                          progress=False, backend=BACKEND, distributed=False).per_example
    split = headint.scan(plain, clean, "logit_diff", corrupt=corrupt, method="patch", per_position=True, batch_size=64,
                         progress=False, backend=BACKEND).per_example
    ok &= compare(f"data parallel over {world} ranks", {"scan": single}, {"scan": split}, 0.0, exact=True)

    if rank == 0 and torch.cuda.device_count() >= 2:
        n = plain.config.num_hidden_layers
        device_map = {"model.embed_tokens": 0, "model.norm": 1, "model.rotary_emb": 0, "lm_head": 1,
                      **{f"model.layers.{i}": i % 2 for i in range(n)}}
        split_model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map=device_map).eval()
        got = checks(split_model, *batch(torch.device("cuda", 0)), distributed=False)
        ok &= compare("layers split over cuda:0 and cuda:1", ref, got, 1e-4)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
