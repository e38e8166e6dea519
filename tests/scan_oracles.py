"""Naive, independent oracles for the scan tests: plain PyTorch hooks, one forward per intervention.

Nothing here imports headint: head outputs ``z`` are read and replaced with forward
pre-hooks on each layer's output projection (GPT-2 ``transformer.h[l].attn.c_proj``,
Llama ``model.layers[l].self_attn.o_proj``), whose input is ``[B, T, H*D]`` with head ``h``
in columns ``h*D:(h+1)*D``; metrics are computed from the model's full logits. This is what a
user writes today without headint, and what every scan must reproduce.

Also: tiny models built from configs, batch builders, and a naive multi-pass path-patching oracle.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Sequence

import torch

VOCAB = 50


# --------------------------------------------------------------------------------------- models


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=3, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=16,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    _scale_weights(model)
    return model


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    _scale_weights(model)
    return model


def _scale_weights(model, factor: float = 4.0) -> None:
    """Larger weights than the 0.02 init, so that heads matter and effects are well above float
    tolerance (tied GPT-2 embeddings are scaled once)."""
    with torch.no_grad():
        for p in model.parameters():  # parameters() yields tied weights once
            if p.dim() == 2:
                p.mul_(factor)


def is_gpt2(model) -> bool:
    return hasattr(model, "transformer")


def n_layers(model) -> int:
    return model.config.num_hidden_layers


def n_heads(model) -> int:
    return model.config.num_attention_heads


def n_kv_heads(model) -> int:
    return getattr(model.config, "num_key_value_heads", None) or n_heads(model)


def head_dim(model) -> int:
    return getattr(model.config, "head_dim", None) or model.config.hidden_size // n_heads(model)


def out_proj(model, layer: int) -> torch.nn.Module:
    if is_gpt2(model):
        return model.transformer.h[layer].attn.c_proj
    if hasattr(model, "bert"):
        return model.bert.encoder.layer[layer].attention.output.dense
    return model.model.layers[layer].self_attn.o_proj


# --------------------------------------------------------------------------------------- batches


def make_batch(N: int = 3, T: int = 7, *, seed: int = 0, pad: str | None = None, lengths: Sequence[int] | None = None) -> dict:
    """``input_ids`` ``[N, T]``, ``attention_mask``, ``target``, ``contrast`` (distinct ids).

    ``pad="left"``/``"right"``: rows have the given real ``lengths`` (default T, T-2, T-3, ...),
    padding id 0.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    if pad is not None:
        if lengths is None:
            lengths = [T] + [max(2, T - 1 - i) for i in range(1, N)]
        for n, length in enumerate(lengths):
            if pad == "left":
                mask[n, : T - length] = 0
            else:
                mask[n, length:] = 0
        ids = ids * mask
    target = torch.randint(1, VOCAB, (N,), generator=g)
    contrast = (target + torch.randint(1, VOCAB - 1, (N,), generator=g) - 1) % (VOCAB - 1) + 1
    contrast = torch.where(contrast == target, contrast % (VOCAB - 1) + 1, contrast)
    return {"input_ids": ids, "attention_mask": mask, "target": target, "contrast": contrast}


def corrupt_of(batch: dict, *, seed: int = 1, n_changes: int = 2) -> dict:
    """The batch with ``n_changes`` real tokens per row replaced (same mask, target, contrast)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in batch.items()}
    ids, mask = out["input_ids"], out["attention_mask"]
    for n in range(ids.shape[0]):
        real = mask[n].nonzero().flatten()
        pick = real[torch.randperm(len(real), generator=g)[:n_changes]]
        for p in pick.tolist():
            ids[n, p] = (ids[n, p] + int(torch.randint(1, VOCAB - 1, (1,), generator=g))) % (VOCAB - 1) + 1
    return out


def positions_alone(mask: torch.Tensor) -> torch.Tensor:
    """``[N, T]``: each token's position in its prompt run alone, i.e. the number of real tokens
    before it (padding before a prompt does not count; padding columns get the running count)."""
    out = torch.zeros(mask.shape, dtype=torch.long)
    for n in range(mask.shape[0]):
        count = 0
        for t in range(mask.shape[1]):
            out[n, t] = count
            count += int(mask[n, t] != 0)
    return out


def model_inputs(batch: dict) -> dict:
    """The model's inputs, with every prompt numbered from 0 whatever its padding (padding
    never changes a result)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "position_ids": positions_alone(batch["attention_mask"])}


# --------------------------------------------------------------------------------------- hooks


def record_z(model, batch: dict) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Head outputs ``{layer: [N, T, H, D]}`` of one plain forward, and its full logits ``[N, T, V]``."""
    H, D = n_heads(model), head_dim(model)
    zs: dict[int, torch.Tensor] = {}
    handles = []
    for l in range(n_layers(model)):
        def pre(_m, args, l=l):
            x = args[0]
            zs[l] = x.detach().clone().view(*x.shape[:-1], H, D)
        handles.append(out_proj(model, l).register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            logits = model(**model_inputs(batch)).logits
    finally:
        for h in handles:
            h.remove()
    return zs, logits


@contextlib.contextmanager
def replace_heads(model, edits):
    """Replace head outputs inside the block.

    ``edits``: list of ``(layer, head, position, value)``; ``position`` None = every position;
    ``value`` None = zeros, else ``[N or 1, T, D]`` (the replacement at each position).
    """
    H, D = n_heads(model), head_dim(model)
    by_layer: dict[int, list] = {}
    for l, h, p, v in edits:
        by_layer.setdefault(l, []).append((h, p, v))
    handles = []
    for l, items in by_layer.items():
        def pre(_m, args, items=items):
            x = args[0].clone()
            for h, p, v in items:
                sl = slice(h * D, (h + 1) * D)
                pos = slice(None) if p is None else slice(p, p + 1)
                if v is None:
                    x[:, pos, sl] = 0.0
                else:
                    x[:, pos, sl] = v.to(x.dtype).expand(x.shape[0], -1, -1)[:, pos]
            return (x,) + tuple(args[1:])
        handles.append(out_proj(model, l).register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def logits_with(model, batch: dict, edits=()) -> torch.Tensor:
    """Full logits ``[N, T, V]`` of one forward with ``edits`` (see :func:`replace_heads`)."""
    with torch.no_grad(), replace_heads(model, list(edits)):
        return model(**model_inputs(batch)).logits


# --------------------------------------------------------------------------------------- metrics


def last_index(mask: torch.Tensor) -> torch.Tensor:
    T = mask.shape[1]
    return torch.tensor([max(t for t in range(T) if mask[n, t] != 0) for n in range(mask.shape[0])])


def oracle_metric(metric, logits: torch.Tensor, batch: dict, clean_logits: torch.Tensor | None) -> torch.Tensor:
    """Per-example metric ``[N]`` from full logits ``[N, T, V]``, written out by hand.

    ``metric``: ``"logit_diff"``, ``"logprob"``, ``"prob"``, ``"kl"``, ``"loss"`` or a callable
    ``fn(full_logits, batch) -> [N]``.
    """
    if callable(metric):
        return metric(logits, batch).float()
    N = logits.shape[0]
    last = last_index(batch["attention_mask"])
    x = logits[torch.arange(N), last].double()  # [N, V]
    if metric == "logit_diff":
        return torch.stack([x[n, batch["target"][n]] - x[n, batch["contrast"][n]] for n in range(N)]).float()
    if metric in ("logprob", "prob"):
        lp = x - torch.logsumexp(x, dim=-1, keepdim=True)
        v = torch.stack([lp[n, batch["target"][n]] for n in range(N)])
        return (v.exp() if metric == "prob" else v).float()
    if metric == "kl":
        c = clean_logits[torch.arange(N), last].double()
        lp = torch.log_softmax(c, -1)
        lq = torch.log_softmax(x, -1)
        return (lp.exp() * (lp - lq)).sum(-1).float()
    if metric == "loss":
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = batch.get("labels", ids)
        out = []
        for n in range(N):
            terms = []
            for t in range(ids.shape[1] - 1):
                if mask[n, t] and mask[n, t + 1] and labels[n, t + 1] != -100:
                    terms.append(-torch.log_softmax(logits[n, t].double(), -1)[labels[n, t + 1]])
            out.append(torch.stack(terms).mean())
        return torch.stack(out).float()
    raise ValueError(metric)


# --------------------------------------------------------------------------------------- scans


def derangement(n: int, seed: int) -> torch.Tensor:
    """The documented resample permutation: seeded ``randperm`` redrawn until it has no fixed point."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        if not (perm == torch.arange(n)).any():
            return perm


def masked_mean_z(zs: dict[int, torch.Tensor], mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per-position mean ``{layer: [1, T, H, D]}`` over examples, padding left out (0 where none)."""
    out = {}
    for l, z in zs.items():
        T = z.shape[1]
        m = torch.zeros(1, *z.shape[1:])
        for t in range(T):
            rows = [n for n in range(z.shape[0]) if mask[n, t] != 0]
            if rows:
                m[0, t] = z[rows, t].double().mean(0).float()
        out[l] = m
    return out


def oracle_scan(model, batch: dict, metric, *, method: str, corrupt: dict | None = None, direction: str = "denoising",
                per_position: bool = False, head_sets=None, layers=None, heads=None, positions=None,
                mean_batch: dict | None = None, seed: int = 0) -> torch.Tensor:
    """The per-example tensor a scan must produce, one forward per intervention.

    Returns ``[L, H, N]`` / ``[L, H, T, N]`` (NaN where not scanned) or ``[S, N]`` for head sets.
    """
    L, H = n_layers(model), n_heads(model)
    N, T = batch["input_ids"].shape
    z_clean, clean_logits = record_z(model, batch)
    if method == "patch" and direction == "denoising":
        base = corrupt
    else:
        base = batch

    # the replacement for head h of layer l: [N or 1, T, D] (None: zeros)
    if method == "zero":
        src = None
    elif method == "mean":
        if mean_batch is None:
            mean_src = masked_mean_z(z_clean, batch["attention_mask"])
        else:
            # model_inputs numbers each reference prompt as if run alone (padding changes no value)
            mean_src = masked_mean_z(record_z(model, mean_batch)[0], mean_batch["attention_mask"])
        src = mean_src
    elif method == "resample":
        perm = derangement(N, seed)
        src = {l: z[perm] for l, z in z_clean.items()}
    elif method == "patch":
        src = z_clean if direction == "denoising" else record_z(model, corrupt)[0]
    else:
        raise ValueError(method)

    def value(l, h):
        return None if src is None else src[l][:, :, h]

    def run(edits):
        return oracle_metric(metric, logits_with(model, base, edits), base, clean_logits)

    if head_sets is not None:
        out = torch.full((len(head_sets), N), float("nan"))
        for s, hs in enumerate(head_sets):
            out[s] = run([(l, h, None, value(l, h)) for l, h in hs])
        return out
    layers = range(L) if layers is None else layers
    heads = range(H) if heads is None else heads
    if per_position:
        positions = range(T) if positions is None else positions
        out = torch.full((L, H, T, N), float("nan"))
        for l, h, p in itertools.product(layers, heads, positions):
            out[l, h, p] = run([(l, h, p, value(l, h))])
        return out
    out = torch.full((L, H, N), float("nan"))
    for l, h in itertools.product(layers, heads):
        out[l, h] = run([(l, h, None, value(l, h))])
    return out


def oracle_baseline(model, batch: dict, metric, clean: dict | None = None) -> torch.Tensor:
    """Metric ``[N]`` of the unintervened run of ``batch`` (KL against ``clean``'s run)."""
    clean_logits = record_z(model, clean if clean is not None else batch)[1]
    return oracle_metric(metric, logits_with(model, batch), batch, clean_logits)


# --------------------------------------------------------------------------------------- attribution


def oracle_attribution(model, base: dict, source: dict | None, metric, *, per_position: bool = False,
                       clean: dict | None = None, z_source: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force attribution by autograd: per example, head (and position), a scalar ``alpha``
    with the head output replaced by ``z + alpha * (z_src - z)`` (``z`` the live value); the
    estimate is ``d metric / d alpha`` at ``alpha = 0``. ``source`` None: ``z_src = 0``, i.e.
    ``(1 - alpha) * z``, the derivative of a multiplicative mask ``m = 1 - alpha`` negated.
    ``z_source``: ``{layer: [N or 1, T, H, D]}`` given baselines instead (e.g. a mean, or
    another example's ``z``).

    Returns (base values ``[N]``, estimates ``[L, H, N]`` or ``[L, H, T, N]``).
    """
    L, H, D = n_layers(model), n_heads(model), head_dim(model)
    N, T = base["input_ids"].shape
    z_src = record_z(model, source)[0] if source is not None else z_source
    clean_logits = record_z(model, clean if clean is not None else base)[1]
    alphas = {l: torch.zeros(N, T if per_position else 1, H, requires_grad=True) for l in range(L)}
    handles = []
    for l in range(L):
        def pre(_m, args, l=l):
            x = args[0]
            z = x.view(N, T, H, D)
            target = torch.zeros_like(z) if z_src is None else z_src[l].expand_as(z)
            z = z + alphas[l][..., None] * (target - z)
            return (z.reshape(x.shape),) + tuple(args[1:])
        handles.append(out_proj(model, l).register_forward_pre_hook(pre))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            logits = model(**model_inputs(base)).logits
            values = oracle_metric(metric, logits, base, clean_logits)
            grads = torch.autograd.grad(values.sum(), [alphas[l] for l in range(L)])
    finally:
        for h in handles:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
    est = torch.stack([g.permute(2, 1, 0) for g in grads])  # [L, H, T or 1, N]
    if not per_position:
        est = est[:, :, 0]
    return values.detach(), est


# --------------------------------------------------------------------------------------- path patching


def _qkv_modules(model, layer: int) -> dict[str, torch.nn.Module]:
    if is_gpt2(model):
        return {"qkv": model.transformer.h[layer].attn.c_attn}
    a = model.model.layers[layer].self_attn
    return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj}


def _qkv_slices(model, which: str, head: int) -> tuple[str, slice]:
    """(module key, columns) of head ``head``'s ``which`` input in the projection output."""
    D = head_dim(model)
    if is_gpt2(model):
        E = n_heads(model) * D
        off = {"q": 0, "k": E, "v": 2 * E}[which]
        return "qkv", slice(off + head * D, off + (head + 1) * D)
    return which, slice(head * D, (head + 1) * D)


def oracle_path_patch(model, clean: dict, corrupt: dict, metric, *, senders, receivers) -> torch.Tensor:
    """Naive multi-pass path patching; returns ``[S, N]``.

    1. record clean and corrupt ``z``;
    2. per sender set: run clean with every head frozen at its clean ``z`` except the senders
       (corrupt ``z``); record the receivers' q/k/v projections (GPT-2: ``c_attn`` output split
       into q, k, v; Llama: ``q_proj``/``k_proj``/``v_proj`` outputs, before RoPE: RoPE is
       linear per position and the positions are the same, so patching before it is the same);
    3. run clean with only those receiver slices replaced; evaluate the metric.
    """
    L, H = n_layers(model), n_heads(model)
    z_clean, clean_logits = record_z(model, clean)
    z_corrupt, _ = record_z(model, corrupt)
    recv = [(int(l), int(h), w) for l, h, which in receivers for w in which]
    N = clean["input_ids"].shape[0]
    out = torch.empty(len(senders), N)
    for s, sset in enumerate(senders):
        sset = {(int(l), int(h)) for l, h in sset}
        edits = [(l, h, None, (z_corrupt if (l, h) in sset else z_clean)[l][:, :, h]) for l in range(L) for h in range(H)]
        recorded: dict[tuple[int, int, str], torch.Tensor] = {}
        handles = []
        for l, h, w in recv:
            key, cols = _qkv_slices(model, w, h)
            mod = _qkv_modules(model, l)[key]

            def fwd(_m, _a, y, l=l, h=h, w=w, cols=cols):
                recorded[(l, h, w)] = y[..., cols].detach().clone()
            handles.append(mod.register_forward_hook(fwd))
        try:
            with torch.no_grad(), replace_heads(model, edits):
                model(**model_inputs(clean))
        finally:
            for hd in handles:
                hd.remove()
        handles = []
        for l, h, w in recv:
            key, cols = _qkv_slices(model, w, h)
            mod = _qkv_modules(model, l)[key]

            def fwd(_m, _a, y, l=l, h=h, w=w, cols=cols):
                y = y.clone()
                y[..., cols] = recorded[(l, h, w)]
                return y
            handles.append(mod.register_forward_hook(fwd))
        try:
            with torch.no_grad():
                logits = model(**model_inputs(clean)).logits
        finally:
            for hd in handles:
                hd.remove()
        out[s] = oracle_metric(metric, logits, clean, clean_logits)
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two flat tensors (average ranks for ties)."""
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic)
    except ImportError:  # pragma: no cover
        def rank(x):
            x = x.flatten().double()
            order = x.argsort()
            r = torch.empty_like(x)
            r[order] = torch.arange(len(x), dtype=torch.float64)
            for v in x.unique():
                sel = x == v
                r[sel] = r[sel].mean()
            return r
        ra, rb = rank(a), rank(b)
        ra, rb = ra - ra.mean(), rb - rb.mean()
        return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def all_head_pairs(L: int, H: int) -> list:
    heads = [(l, h) for l in range(L) for h in range(H)]
    return [(a, b) for i, a in enumerate(heads) for b in heads[i + 1:]]


def call_metric_full(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """A user callable on full logits: mean over real positions of the max log-probability."""
    lp = torch.log_softmax(logits.float(), -1).amax(-1)  # [N, T]
    m = batch["attention_mask"].float()
    return (lp * m).sum(1) / m.sum(1)

