"""What each rank runs in the distributed tests (see launch.py), and the same scans for one process.

Every job returns plain data (tensors, lists, dicts) that the test compares with a
single-process run of the same arguments.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import headint
import headint.scans.exact as exact
import headint.scans.runner as runner_mod
from scan_oracles import corrupt_of, make_batch, tiny_gpt2, tiny_llama

BACKEND = "reference"


def summary(result) -> dict:
    """Everything of a ScanResult that must not depend on how it was computed (settings without
    the work counts and the world size)."""
    settings = {k: v for k, v in result.settings.items() if k not in ("cost", "distributed")}
    return dict(per_example=result.per_example.clone(), base=result.base_per_example.clone(), axes=tuple(result.axes),
                labels=result.labels, metric=result.metric_name, clean=result.clean_baseline, corrupt=result.corrupt_baseline,
                settings=settings, world=result.settings.get("distributed", {}).get("world_size", 1))


# -- data parallel: the scan suite ------------------------------------------------------------------------


def scan_suite(distributed, ckpt_root: str | None = None) -> dict:
    """An exact scan, a per-position scan (left padding, GQA), a checkpointed mean scan, two
    attribution scans and a path patching run, each with chunk counts that do not divide evenly
    over two ranks."""
    gpt2, llama = tiny_gpt2(), tiny_llama()
    batch = make_batch(3, 6, seed=71)
    padded = make_batch(3, 6, seed=72, pad="left", lengths=[6, 4, 5])
    out = {}
    out["exact"] = summary(headint.scan(gpt2, batch, "logit_diff", corrupt=corrupt_of(batch), method="patch", direction="noising",
                                        batch_size=4, progress=False, backend=BACKEND, distributed=distributed))
    out["per_position"] = summary(headint.scan(llama, padded, "logprob", method="zero", per_position=True, batch_size=5,
                                               progress=False, backend=BACKEND, distributed=distributed))
    ckpt = None if ckpt_root is None else Path(ckpt_root) / "mean"
    out["checkpointed"] = summary(headint.scan(gpt2, padded, "logit_diff", method="mean", layers=[1, 2], batch_size=3,
                                               checkpoint=ckpt, progress=False, backend=BACKEND, distributed=distributed))
    out["attribution"] = summary(headint.attribution_scan(gpt2, batch, corrupt_of(batch), "logit_diff", batch_size=2,
                                                          backend=BACKEND, distributed=distributed))
    out["attribution_mask"] = summary(headint.attribution_scan(llama, padded, None, "logprob", method="mask", per_position=True,
                                                               batch_size=1, backend=BACKEND, distributed=distributed))
    out["path"] = summary(headint.path_patch(gpt2, batch, corrupt_of(batch), "logit_diff", receivers=[(2, 1, "q"), (2, 0, "v")],
                                             batch_size=5, backend=BACKEND, distributed=distributed))
    if ckpt is not None:
        out["chunk_files"] = sorted(p.name for p in ckpt.glob("*/chunk-*.pt"))
    return out


def data_parallel(ckpt_root: str) -> dict:
    return scan_suite("auto", ckpt_root)


# -- checkpoints: interrupted and resumed ------------------------------------------------------------------

RESUME_BATCH = dict(N=3, T=6, seed=81)


def resume_scan(ckpt, distributed="auto"):
    batch = make_batch(RESUME_BATCH["N"], RESUME_BATCH["T"], seed=RESUME_BATCH["seed"], pad="left", lengths=[6, 5, 4])
    return headint.scan(tiny_gpt2(), batch, "logit_diff", corrupt=corrupt_of(batch), method="patch", per_position=True,
                        positions=[2, 4, 5], batch_size=4, checkpoint=ckpt, progress=False, backend=BACKEND, distributed=distributed)


class Counting:
    """Replaces ``exact._run_chunk`` inside the block: counts chunks computed, and raises after
    ``fail_after`` of them when given."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after
        self.calls = 0

    def __enter__(self):
        self.orig = exact._run_chunk

        def wrapper(*args, **kwargs):
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise RuntimeError("simulated failure in a chunk")
            self.calls += 1
            return self.orig(*args, **kwargs)

        exact._run_chunk = wrapper
        return self

    def __exit__(self, *exc):
        exact._run_chunk = self.orig


def error_of(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def interrupted_and_resumed(root: str) -> dict:
    """(A) rank 1 fails after 2 chunks: every rank raises, naming rank 1 and its error; (B) the
    job resumes from A's checkpoint with two ranks; (C) it resumes a checkpoint that one process
    left unfinished (prepared by the test); (D) rank 1 fails in the base runs, before any chunk."""
    rank, root = dist.get_rank(), Path(root)
    out = {}
    with Counting(fail_after=2 if rank == 1 else None) as c:
        out["A_error"] = error_of(lambda: resume_scan(root / "a"))
        out["A_computed"] = c.calls
    out["A_files"] = sorted(p.name for p in (root / "a").glob("*/chunk-*.pt"))
    dist.barrier()
    if rank == 0:  # for a single-process resume of a checkpoint two ranks left unfinished
        shutil.copytree(root / "a", root / "a-copy")
    dist.barrier()
    with Counting() as c:
        out["B"] = summary(resume_scan(root / "a"))
        out["B_computed"] = c.calls
    with Counting() as c:
        out["C"] = summary(resume_scan(root / "single"))
        out["C_computed"] = c.calls
    orig = runner_mod.clean_pass
    if rank == 1:
        def broken(*args, **kwargs):
            raise ValueError("simulated failure in the clean pass")
        runner_mod.clean_pass = broken
    try:
        out["D_error"] = error_of(lambda: resume_scan(None))
    finally:
        runner_mod.clean_pass = orig
    dist.barrier()
    return out


# -- tensor parallel ---------------------------------------------------------------------------------------


def _interventions(full_z) -> dict:
    """Interventions naming global heads on both ranks' slices (4 query heads, 2 kv heads)."""
    return {
        "none": [],
        "ablate_h3": [headint.Ablate(layer=1, head=3)],
        "ablate_h0_h2": [headint.Ablate(layer=0, head=[0, 2], positions=[1, 3])],
        "patch_h1_h2": [headint.Patch(layer=1, head=[1, 2], source=full_z)],
        "scale_h2": [headint.Scale(layer=2, head=2, factor=0.3)],
        "scale_scores_h1_h3": [headint.Scale(layer=0, head=[1, 3], factor=2.5, target="scores")],
        "knockout_h3": [headint.Knockout(queries=[4, 5], keys=[0, 1], layer=1, head=3)],
        "patch_k_kv1": [headint.PatchQKV(layer=1, head=1, which="k", source=torch.zeros(1, 2, 6, 8))],
    }


def _tp_checks(model, ids, corrupt_ids, batch, distributed) -> dict:
    out = {}
    cache = headint.record(model, ids, what=("z", "q", "k", "v", "pattern"), backend=BACKEND)
    out["record"] = {f"{w}{l}": cache.get(w, l) for w, l in cache.tensors}
    full_z = headint.record(model, corrupt_ids, what=("z",), backend=BACKEND)
    for name, ivs in _interventions(full_z).items():
        with torch.no_grad(), headint.intervene(model, ivs, backend=BACKEND):
            out[name] = model(ids).logits
    out["scan"] = summary(headint.scan(model, batch, "logit_diff", corrupt=corrupt_of(batch), method="patch", batch_size=7,
                                       progress=False, backend=BACKEND, distributed=distributed))
    out["scan_pos"] = summary(headint.scan(model, batch, "logprob", method="zero", per_position=True, batch_size=16,
                                           progress=False, backend=BACKEND, distributed=distributed))
    out["attribution"] = summary(headint.attribution_scan(model, batch, corrupt_of(batch), "logit_diff", backend=BACKEND,
                                                          distributed=distributed))
    return out


def _tp_inputs():
    batch = make_batch(3, 6, seed=91)
    ids = batch["input_ids"]
    return ids, corrupt_of(batch)["input_ids"], batch


def tensor_parallel() -> dict:
    """``transformers``' own tensor parallelism (the plan ``tp_plan="auto"`` applies, through
    ``apply_tensor_parallelism`` on a DTensor mesh over the gloo group): every check on the
    sharded model next to the same check on the unsharded one."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    ids, corrupt_ids, batch = _tp_inputs()
    model = tiny_llama()
    reference = _tp_checks(model, ids, corrupt_ids, batch, distributed=False)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    apply_tensor_parallelism(model, mesh, model._expand_parallel_plan(model.tp_plan))
    attn = model.model.layers[0].self_attn
    local_heads = attn.q_proj.weight.to_local().shape[0] // attn.head_dim
    sharded = _tp_checks(model, ids, corrupt_ids, batch, distributed="auto")
    wrong = error_of(lambda: headint.scan(model, batch, "logprob", batch_size=8, progress=False, backend=BACKEND, distributed=True))
    return dict(reference=reference, sharded=sharded, local_heads=local_heads, distributed_true_error=wrong)


class _SumOverRanks(torch.autograd.Function):
    """Row-parallel output: forward all-reduce (sum of the partial outputs); backward identity
    (every rank computes the same loss downstream)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class _SharedInput(torch.autograd.Function):
    """Column-parallel input: forward identity; backward all-reduce (each rank's heads add
    their share of the input's gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _shared_input(_module, args, kwargs):
    if "hidden_states" in kwargs:
        return args, dict(kwargs, hidden_states=_SharedInput.apply(kwargs["hidden_states"]))
    return (_SharedInput.apply(args[0]), *args[1:]), kwargs


def shard_by_hand(model) -> None:
    """Shard every attention module as tensor parallelism does, without DTensors: rank ``r``
    keeps a contiguous slice of query and key/value heads in q/k/v_proj (column-parallel),
    o_proj becomes row-parallel (its input slice) with an all-reduce of its output."""
    r, W = dist.get_rank(), dist.get_world_size()
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.register_forward_pre_hook(_shared_input, with_kwargs=True)
        for name in ("q_proj", "k_proj", "v_proj"):
            lin = getattr(attn, name)
            n = lin.out_features // W
            new = torch.nn.Linear(lin.in_features, n, bias=lin.bias is not None)
            new.weight.data = lin.weight.data[r * n : (r + 1) * n].clone()
            setattr(attn, name, new)
        o = attn.o_proj
        n = o.in_features // W
        new = torch.nn.Linear(n, o.out_features, bias=False)
        new.weight.data = o.weight.data[:, r * n : (r + 1) * n].clone()
        new.register_forward_hook(lambda _m, _a, y: _SumOverRanks.apply(y))
        attn.o_proj = new


def tensor_parallel_by_hand() -> dict:
    """The head mapping on a model sharded by hand (the default group as its tensor-parallel
    group): the same checks with ``distributed=False``; a data-parallel scan of it is refused."""
    ids, corrupt_ids, batch = _tp_inputs()
    model = tiny_llama()
    reference = _tp_checks(model, ids, corrupt_ids, batch, distributed=False)
    shard_by_hand(model)
    sharded = _tp_checks(model, ids, corrupt_ids, batch, distributed=False)
    refused = error_of(lambda: headint.scan(model, batch, "logprob", batch_size=8, progress=False, backend=BACKEND))
    return dict(reference=reference, sharded=sharded, refused=refused)
