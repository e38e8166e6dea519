"""Train the embedded ``induction-2l`` model on the synthetic in-context copying task.

Usage::

    python -m headint.tasks.train_induction [--out DIR] [--steps N] [--seed S]

Model: a 2-layer GPT-2 decoder (``GPT2LMHeadModel``) with 4 heads per layer, d_model 64,
vocabulary 128 and 64 positions, trained from scratch.  It is *attention-only*: the MLP
weights are zero and frozen, so every MLP outputs exactly zero (as in the 2-layer
attention-only models of Elhage et al. 2021).  With trainable MLPs the model tends to
solve the task with positional pair-binding shortcuts instead of the canonical circuit.

Task: sequences of distinct random tokens in which one segment of random length (4..16)
reappears at a random offset (:func:`headint.tasks.induction.copy_task_batch`).
The loss is the next-token cross-entropy on the positions whose next token is
predictable, i.e. inside the second occurrence of the segment.  (``--background-weight``
adds the other positions after the circuit has formed; from the start, any noticeable
weight there keeps the model on the plateau or sends it to shortcuts, because copying
tokens already seen is wrong on those positions.)
The continuation can only be found in context, so the model has to build an induction
circuit: a previous-token head in layer 0 whose output is read (K-composition) by an
induction head in layer 1.

Optimisation: AdamW (betas 0.9/0.98, weight decay 0.01 on matrices), peak LR 1e-3 with
200 linear warmup steps and cosine decay to 0.1x, batch 32, 2500 steps, gradient clip
1.0.  The loss sits on the plateau for a few hundred steps before the induction circuit
forms (copy accuracy jumps from ~0.05 to > 0.95 around steps 600-1000).  Once it has
formed (smoothed loss < ``--formed-loss``), a group-lasso penalty
``--head-l1 * sum_heads ||(W_Q, W_K, W_V, W_O)_head||_F`` is ramped in over
``--ramp-steps`` steps; it prunes some heads to bystanders whose weights are ~0
(near-uniform attention, no output). Without it all four heads of a layer end up as
redundant copies. The default strength (0.005) keeps part of the redundancy, as found in
real models: with the default seed the model has two previous-token heads (L0H0, and L0H1
which only matters once L0H0 is gone), three induction heads of graded importance, and
three bystanders. A stronger penalty (e.g. 0.02) leaves a single head per role.

Training is deterministic for a given seed (seeded generators, deterministic
algorithms, a fixed number of CPU threads, 1 by default; the result depends on the thread
count).  About 1-2 minutes on 2 CPU cores.  At the end the script prints the
in-context copy accuracy versus chance and the previous-token / induction score tables,
and writes ``config.json`` + ``model.safetensors`` (``save_pretrained``) and
``training.json`` into ``--out`` (default: the package directory
``headint/models/induction-2l``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from headint.tasks.induction import (
    DEFAULT_MAX_SEG,
    DEFAULT_MIN_SEG,
    DEFAULT_SEQ_LEN,
    DEFAULT_VOCAB,
    copy_accuracy,
    copy_task_batch,
    make_generator,
    repeated_random_tokens,
)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "models" / "induction-2l"  # the shipped checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2500, help="optimizer steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="training sequence length")
    p.add_argument("--n-positions", type=int, default=64, help="model context size")
    p.add_argument(
        "--formed-loss",
        type=float,
        default=1.0,
        help="the circuit counts as formed once the smoothed loss on the predictable positions drops below "
        "this; phase 2 (background loss, head penalty) then ramps in (default: %(default)s)",
    )
    p.add_argument("--ramp-steps", type=int, default=750, help="length of the phase-2 ramp (default: %(default)s)")
    p.add_argument(
        "--background-weight",
        type=float,
        default=0.0,
        help="phase-2 loss weight of the positions whose next token is NOT predictable (default: %(default)s)",
    )
    p.add_argument(
        "--head-l1",
        type=float,
        default=0.005,
        help="phase-2 group-lasso penalty: sum over heads of ||(W_Q, W_K, W_V, W_O) of the head||_F "
        "(default: %(default)s)",
    )
    p.add_argument("--mlp", type=int, default=0, help="0: attention-only (MLPs frozen at zero, default); 1: train the MLPs")
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the result depends on it; default: %(default)s)")
    return p.parse_args(argv)


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def build_model(args: argparse.Namespace):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.n_positions,
        n_embd=args.d_model,
        n_layer=2,
        n_head=args.n_head,
        # attention-only: the (zero, frozen) MLPs are kept tiny so they cost almost nothing
        n_inner=4 * args.d_model if args.mlp else 16,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(config)
    if not args.mlp:
        # attention-only: all MLP weights and biases are zero and frozen, so every MLP outputs exactly
        # zero and the residual stream is built from the embeddings and the attention heads only
        for block in model.transformer.h:
            for param in block.mlp.parameters():
                with torch.no_grad():
                    param.zero_()
                param.requires_grad_(False)
    return model


def head_group_norms(model) -> torch.Tensor:
    """[n_layers, n_heads] Frobenius norm of all parameters that belong to one head.

    A head's group is its query/key/value columns of ``c_attn`` (weights and biases) and its
    rows of the output projection ``c_proj``.
    """
    norms = []
    for block in model.transformer.h:
        attn = block.attn
        n_head, d = attn.num_heads, attn.embed_dim
        hd = d // n_head
        w_qkv = attn.c_attn.weight.view(d, 3, n_head, hd)  # Conv1D weight: [in, out]
        b_qkv = attn.c_attn.bias.view(3, n_head, hd)
        w_o = attn.c_proj.weight.view(n_head, hd, d)
        sq = w_qkv.pow(2).sum(dim=(0, 1, 3)) + b_qkv.pow(2).sum(dim=(0, 2)) + w_o.pow(2).sum(dim=(1, 2))
        norms.append(sq.sqrt())
    return torch.stack(norms)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


PREV_TOKEN_THRESHOLD = 0.4
INDUCTION_THRESHOLD = 0.3


def head_roles(prev: torch.Tensor, ind: torch.Tensor) -> dict:
    """``{(layer, head): "previous-token" | "induction" | "bystander"}`` from the two score tables."""
    roles = {}
    for layer in range(prev.shape[0]):
        for head in range(prev.shape[1]):
            r = []
            if prev[layer, head] >= PREV_TOKEN_THRESHOLD:
                r.append("previous-token")
            if ind[layer, head] >= INDUCTION_THRESHOLD:
                r.append("induction")
            roles[(layer, head)] = "+".join(r) or "bystander"
    return roles


def format_table(scores: torch.Tensor, title: str) -> str:
    n_layers, n_heads = scores.shape
    lines = [title, "        " + "".join(f"  head {h}" for h in range(n_heads))]
    for layer in range(n_layers):
        lines.append(f"layer {layer} " + "".join(f"  {scores[layer, h].item():6.3f}" for h in range(n_heads)))
    return "\n".join(lines)


def train(args: argparse.Namespace) -> dict:
    seed_everything(args.seed, args.threads)
    from headint.patterns import induction_scores, previous_token_scores

    model = build_model(args)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and "wpe" not in name and "wte" not in name else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup, args.steps))
    data_gen = make_generator(args.seed)

    print(
        f"induction-2l: {n_params} parameters, 2 layers x {args.n_head} heads, d_model {args.d_model}, "
        f"vocab {args.vocab}, seq_len {args.seq_len}, {args.steps} steps, batch {args.batch_size}, seed {args.seed}",
        flush=True,
    )
    t0 = time.perf_counter()
    running, running_rep = None, None
    formed_at = None  # step at which the circuit formed (smoothed repeat loss below --formed-loss)
    loss_val = rep_val = float("nan")
    for step in range(args.steps):
        batch = copy_task_batch(
            args.batch_size, args.seq_len, args.vocab, DEFAULT_MIN_SEG, DEFAULT_MAX_SEG, generator=data_gen
        )
        logits = model(input_ids=batch.input_ids).logits[:, :-1]
        targets = batch.input_ids[:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, args.vocab), targets.reshape(-1), reduction="none"
        ).view_as(targets)
        # phase 2 (after the circuit formed): ramp in the background loss and the head penalty
        ramp = 0.0 if formed_at is None else min(1.0, (step - formed_at + 1) / max(1, args.ramp_steps))
        weights = torch.where(batch.repeat_mask[:, :-1], 1.0, args.background_weight * ramp)
        loss = (token_loss * weights).sum() / weights.sum()
        objective = loss
        if args.head_l1 > 0 and ramp > 0:
            objective = loss + args.head_l1 * ramp * head_group_norms(model).sum()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()

        loss_val = loss.item()
        rep_val = token_loss.detach()[batch.repeat_mask[:, :-1]].mean().item()
        running = loss_val if running is None else 0.95 * running + 0.05 * loss_val
        running_rep = rep_val if running_rep is None else 0.95 * running_rep + 0.05 * rep_val
        if formed_at is None and step >= args.warmup and running_rep < args.formed_loss:
            formed_at = step + 1
            print(
                f"step {step + 1:5d}  repeat-loss {running_rep:.3f} < {args.formed_loss}: circuit formed, "
                "ramping in the head penalty and the background loss",
                flush=True,
            )
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            acc, _ = copy_accuracy(model, batch=128, seed=10_000 + args.seed)
            model.train()
            print(
                f"step {step + 1:5d}  lr {scheduler.get_last_lr()[0]:.2e}  loss {running:.3f}  "
                f"repeat-loss {running_rep:.3f}  copy-acc {acc:.3f}  ({time.perf_counter() - t0:.0f}s)"
                + ("  head-norms " + str(head_group_norms(model).detach().numpy().round(2).tolist()) if args.head_l1 else ""),
                flush=True,
            )
    train_seconds = time.perf_counter() - t0
    model.eval()

    accuracy, chance = copy_accuracy(model, batch=512, seed=999_983)
    rrt = repeated_random_tokens(64, 20, args.vocab, seed=4242)
    prev = previous_token_scores(model, rrt)
    ind = induction_scores(model, rrt)
    print(f"\ntraining took {train_seconds:.1f}s")
    print(f"in-context copy accuracy on repeated positions: {accuracy:.4f}  (chance 1/{args.vocab} = {chance:.4f})")
    print(format_table(prev, "\nprevious-token scores (attention i -> i-1):"))
    print(format_table(ind, "\ninduction scores (attention i -> i-h+1 on repeated random tokens, h=20):"))
    norms = head_group_norms(model).detach()
    print(format_table(norms, "\nparameter norm of each head (Q, K, V, O):"))
    roles = head_roles(prev, ind)
    print("\nroles: " + ", ".join(f"L{l}H{h} {r}" for (l, h), r in roles.items()))
    circuit_found = any(r == "previous-token" for (l, _), r in roles.items() if l == 0) and any(
        r == "induction" for (l, _), r in roles.items() if l == 1
    )
    if not circuit_found:
        print("WARNING: no previous-token head in layer 0 and induction head in layer 1 (too few steps?)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    argv = sys.argv[1:] if args._argv is None else args._argv
    info = {
        "model": "induction-2l",
        "command": " ".join(["python -m headint.tasks.train_induction", *(shlex.quote(a) for a in argv)]),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "schedule": "linear warmup, cosine decay to 0.1x",
        "weight_decay": args.weight_decay,
        "background_weight": args.background_weight,
        "mlp": bool(args.mlp),
        "head_l1": args.head_l1,
        "formed_loss": args.formed_loss,
        "ramp_steps": args.ramp_steps,
        "circuit_formed_at_step": formed_at,
        "optimizer": "AdamW(betas=(0.9, 0.98)), grad clip 1.0",
        "task": {
            "vocab": args.vocab,
            "seq_len": args.seq_len,
            "min_seg": DEFAULT_MIN_SEG,
            "max_seg": DEFAULT_MAX_SEG,
            "generator": "headint.tasks.induction.copy_task_batch",
        },
        "n_params": n_params,
        "final_loss": loss_val,
        "final_loss_smoothed": running,
        "final_repeat_loss_smoothed": running_rep,
        "copy_accuracy": accuracy,
        "chance": chance,
        "previous_token_scores": [[round(v, 4) for v in row] for row in prev.tolist()],
        "induction_scores": [[round(v, 4) for v in row] for row in ind.tolist()],
        "head_norms": [[round(v, 4) for v in row] for row in norms.tolist()],
        "roles": {f"L{l}H{h}": r for (l, h), r in roles.items()},
        "circuit_found": circuit_found,
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"\nsaved to {out}")
    return info


def main(argv=None) -> dict:
    args = parse_args(argv)
    args._argv = None if argv is None else list(argv)
    return train(args)


def _reexec_with_passive_omp() -> None:
    """Re-run this script with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is already set.

    OpenMP reads the variable when torch is first imported, which has already happened by the
    time this module runs.  With the default (spinning) policy, 2 OpenMP threads on a machine
    whose cores are busy with other processes can be 10x slower than with passive waiting; the
    numbers computed are the same either way.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    argv = [sys.executable, "-m", "headint.tasks.train_induction", *sys.argv[1:]]
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    _reexec_with_passive_omp()
    main()
