"""Compatibility matrix: every model type of the installed ``transformers`` whose attention goes
through the attention registry, built tiny and compared with an independent oracle.

For each model type (causal LM, else seq2seq LM, else masked LM class) whose modeling module
calls ``ALL_ATTENTION_FUNCTIONS``, a tiny float32 model is built from its default config with
few layers, hidden 64, 4 heads (2 key/value heads), vocab 128 (layer-indexed lists are cut to the
layers kept, one of each layer kind first). Then headint is compared with an oracle that shares
no code with it:

- the model's own ``eager`` attention, with a forward pre-hook on the output projection (found
  by name: ``o_proj``, ``out_proj``, ``c_proj``, ``o``, ``dense``, ... or BERT's
  ``output.dense``) that edits one head's slice of its input, for: no intervention, zero and
  mean ablation, patching from a recording of other inputs, output scaling, a per-head exact
  ``scan`` (logit difference), and greedy ``generate()`` with an ablation (decoders);
- an eager attention function of our own (registered under its own name) that edits the scores,
  for score scaling and edge knockouts; it is used only where, without edits, it reproduces the
  model's eager output.

Each architecture ends as ``supported`` (every check within tolerance; checks that headint
refuses with a clear error are listed), ``refused`` (headint raises a clear error naming the
reason), ``skipped`` (no tiny model or no oracle, with the reason), ``wrong`` (a check differs
from the oracle) or ``crash`` (an unclear exception). ``wrong`` and ``crash`` make the script
exit non-zero.

    python scripts/compat_matrix.py --out docs/compatibility.md --json docs/compatibility.json   # the full walk
    python scripts/compat_matrix.py --only llama,gpt2 --reuse docs/compatibility.json --out ... --json ...  # recheck some
    python scripts/compat_matrix.py --section vlm --reuse docs/compatibility.json --out ... --json ...  # the VLM rows only

A second section (``vlm``, :func:`check_vlm`) scans tiny vision-language models (``VLM_TYPES``) with
pixel inputs: a per-head zero-ablation scan and a denoising patch scan from another image, against
the same oracle with every model input passed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import json
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

TOL = 1e-4  # normalised: max |a - b| / max(1, max |b|)
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 64, 4, 2, 16, 128, 2
B, T, T_DEC = 2, 8, 6
ORACLE = "compat_matrix_oracle"
OUT_PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "o", "wo", "Wo", "dense", "out", "proj", "out_lin", "attn_out", "linear_out")
CLEAR_ERRORS = ("UnsupportedModelError", "NotImplementedError", "NonUniformShapeError", "ValueError", "TypeError")

TINY = {
    **{k: LAYERS for k in ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers", "encoder_layers",
                           "decoder_layers", "num_encoder_layers")},
    **{k: HIDDEN for k in ("hidden_size", "d_model", "n_embd", "dim", "embed_dim")},
    **{k: 2 * HIDDEN for k in ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner",
                               "hidden_dim", "moe_intermediate_size", "shared_expert_intermediate_size")},
    **{k: HEADS for k in ("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
                          "num_heads")},
    **{k: KV_HEADS for k in ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")},
    "head_dim": HEAD_DIM, "d_kv": HEAD_DIM, "vocab_size": VOCAB,
    **{k: 128 for k in ("max_position_embeddings", "n_positions", "n_ctx", "max_target_positions", "max_source_positions")},
    **{k: 4 for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")},
    **{k: 2 for k in ("num_experts_per_tok", "moe_topk", "top_k", "n_group")},
    "topk_group": 1,
    "q_lora_rank": 16,
    # rotary and latent-attention sizes that must fit the tiny head dim (v != qk kept, as in DeepSeek)
    "rotary_dim": HEAD_DIM // 2, "rotary_emb_base": 10000, "qk_rope_head_dim": HEAD_DIM // 2,
    "qk_nope_head_dim": HEAD_DIM // 2, "v_head_dim": HEAD_DIM // 2, "kv_lora_rank": 16,
    # hybrids: an attention layer among the layers kept
    "attn_layer_period": 2, "attn_layer_offset": 1,
}


@dataclass
class Row:
    model_type: str
    cls: str = ""
    status: str = "crash"
    reason: str = ""
    checks: dict = field(default_factory=dict)  # name -> "ok (diff)" / "refused: ..." / "WRONG (diff)"
    seconds: float = 0.0
    section: str = "lm"  # "lm": a text LM class (the main table); "vlm": a vision-language model scanned with pixels


# ------------------------------------------------------------------------------------------------
# which model types, and tiny configs


def candidate_types() -> list[tuple[str, str]]:
    """``(model_type, class name)`` for every model type with a text LM class: its
    sequence-to-sequence LM class (so encoder-decoder models are tested as such), else its causal
    LM class, else its masked LM class."""
    from transformers.models.auto import modeling_auto as ma

    out: dict[str, str] = {}
    for mapping in (ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                    ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        for mt, cls in mapping.items():
            if isinstance(cls, (list, tuple)):
                cls = cls[0]
            out.setdefault(mt, cls)
    return sorted(out.items())


def uses_registry(model_type: str, cls_name: str) -> bool:
    """Whether the class's modeling module calls ``transformers``' attention registry."""
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        return False
    try:
        src = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src


def _shrink(cfg, seen: set) -> None:
    if id(cfg) in seen:
        return
    seen.add(id(cfg))
    L0 = getattr(cfg, "num_hidden_layers", None)
    keep = None
    kinds = getattr(cfg, "layer_types", None)
    if not isinstance(kinds, (list, tuple)):
        kinds = getattr(cfg, "layers_block_type", None)
    pattern = getattr(cfg, "hybrid_override_pattern", None)
    if isinstance(pattern, str) and isinstance(L0, int) and len(pattern) == L0 and not isinstance(kinds, (list, tuple)):
        kinds = list(pattern)
    if isinstance(L0, int) and L0 > LAYERS:
        if isinstance(kinds, (list, tuple)) and len(kinds) == L0:
            first = []
            for i, k in enumerate(kinds):
                if k not in [kinds[j] for j in first]:
                    first.append(i)
            # one softmax-attention layer first, then the other kinds in order
            first.sort(key=lambda i: 0 if "attention" in str(kinds[i]) and "linear" not in str(kinds[i]) else 1)
            keep = sorted((first + [i for i in range(L0) if i not in first])[:LAYERS])
        else:
            keep = list(range(LAYERS))
    hidden0 = next((getattr(cfg, k) for k in ("hidden_size", "d_model", "n_embd") if isinstance(getattr(cfg, k, None), int)), None)
    for k, v in list(vars(cfg).items()):
        if k in TINY and isinstance(v, int) and not isinstance(v, bool):
            setattr(cfg, k, TINY[k])
        elif k.endswith("hidden_size") and isinstance(v, int) and v == hidden0 and v > HIDDEN:  # e.g. cross_attention_hidden_size
            setattr(cfg, k, HIDDEN)
        elif isinstance(v, float) and ("dropout" in k or k.endswith("pdrop")):
            setattr(cfg, k, 0.0)
        elif keep is not None and isinstance(v, (list, tuple)) and len(v) == L0:
            setattr(cfg, k, type(v)(v[i] for i in keep))
        elif keep is not None and k == "hybrid_override_pattern" and isinstance(v, str) and len(v) == L0:
            setattr(cfg, k, "".join(v[i] for i in keep))
    for k in ("layers_block_type",):
        v = getattr(cfg, k, None)
        if keep is not None and isinstance(v, (list, tuple)) and len(v) == L0:
            setattr(cfg, k, type(v)(v[i] for i in keep))
    for k, v in list(vars(cfg).items()):
        if hasattr(v, "to_dict") and hasattr(v, "model_type"):
            _shrink(v, seen)


def tiny_model(model_type: str, cls_name: str):
    import transformers
    from transformers import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[model_type]()
    _shrink(cfg, set())
    for k in ("pad_token_id",):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v >= VOCAB:
            setattr(cfg, k, 0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return _finish(getattr(transformers, cls_name)._from_config(cfg, attn_implementation="eager"))


def _finish(model):
    """``model`` in eval mode, float32, with larger weights than the default init (peaked
    attention, so interventions matter)."""
    model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25 if "embed" not in n else 1.0)
    return model.float()


# ------------------------------------------------------------------------------------------------
# the oracle


def _inputs(model, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    special = set()
    for c in (model.config, model.config.get_text_config()):
        for k, v in vars(c).items():
            if k.endswith(("_token_id", "_token_index")) and isinstance(v, int):
                special.add(v)
    allowed = torch.tensor([i for i in range(3, VOCAB) if i not in special])
    ids = allowed[torch.randint(len(allowed), (B, T), generator=g)]
    inputs = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long)}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = allowed[torch.randint(len(allowed), (B, T_DEC), generator=g)]
    return inputs


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, **({"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}))
    return out.logits if getattr(out, "logits", None) is not None else out[0]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0))


def _is_causal_lm(model) -> bool:
    from transformers.models.auto import modeling_auto as ma

    names = {c for v in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in (v if isinstance(v, (list, tuple)) else [v])}
    return type(model).__name__ in names and hasattr(model, "generate")


def _first_int(path: str) -> int | None:
    for comp in path.split("."):
        if comp.isdigit():
            return int(comp)
    return None


def out_projection(model, attn_path: str):
    """The output projection of the attention module at ``attn_path``, found by name."""
    mods = dict(model.named_modules())
    for n in OUT_PROJ_NAMES:
        m = mods.get(f"{attn_path}.{n}")
        if m is not None and getattr(m, "weight", None) is not None:
            return m
    parent = attn_path.rsplit(".", 1)[0]
    for n in ("output.dense", "output.o_proj", "o_proj", "out_proj"):
        m = mods.get(f"{parent}.{n}")
        if m is not None and getattr(m, "weight", None) is not None:
            return m
    return None


def head_outputs(model, proj, n_heads: int, inputs) -> torch.Tensor:
    """The head outputs ``z [B, T, H, Dv]`` entering ``proj`` when ``model`` runs ``inputs``."""
    store = {}

    def grab(_m, args):
        store["z"] = args[0].reshape(*args[0].shape[:-1], n_heads, -1).clone()

    h = proj.register_forward_pre_hook(grab)
    try:
        _logits(model, inputs)
    finally:
        h.remove()
    return store["z"]


@contextlib.contextmanager
def edit_z(proj, n_heads: int, fn):
    """Within the block, the output projection's input ``[B, T, H*Dv]`` is rewritten as
    ``fn(z [B, T, H, Dv]) -> z``."""
    def hook(_m, args):
        x = args[0]
        z = x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads).clone()
        return (fn(z).reshape(x.shape),) + tuple(args[1:])

    h = proj.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        h.remove()


_SPEC: list[dict] = []


def _oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, softcap=None, **kwargs):
    spec = _SPEC[-1]
    Bq, H, Tq, D = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    k = key.repeat_interleave(H // Hkv, dim=1)
    v = value.repeat_interleave(H // Hkv, dim=1)
    scores = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else D ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if id(module) == spec.get("module"):
        for h, f in spec.get("score_factor", {}).items():
            scores[:, h] = scores[:, h] * f
    keep = torch.ones(Bq, H, Tq, Tk, dtype=torch.bool)
    if attention_mask is not None:
        m = attention_mask[:, :, :, :Tk]
        if m.dtype == torch.bool:
            keep &= m
        else:
            scores = scores + m
            keep &= m > torch.finfo(m.dtype).min / 2
    elif (is_causal if is_causal is not None else getattr(module, "is_causal", False)) and Tq > 1:
        keep &= torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    if id(module) == spec.get("module"):
        for h, qs, ks in spec.get("removed", []):
            qsel = torch.zeros(Tq, dtype=torch.bool)
            qsel[[q for q in qs if q < Tq]] = True  # positions beyond this forward (generation) select nothing yet
            ksel = torch.zeros(Tk, dtype=torch.bool)
            ksel[[k for k in ks if k < Tk]] = True
            keep[:, h] &= ~(qsel[:, None] & ksel[None, :])
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores.float(), dim=-1), nan=0.0).to(v.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def oracle_scores(model, spec: dict):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ORACLE, _oracle_attention)
    AttentionMaskInterface.register(ORACLE, eager_mask)
    _SPEC.append(spec)
    model.set_attn_implementation(ORACLE)
    try:
        yield
    finally:
        model.set_attn_implementation("eager")
        _SPEC.remove(spec)


def scan_oracle(model, st, inputs: dict, tgt: torch.Tensor, con: torch.Tensor, value, like: torch.Tensor,
                run_on: dict | None = None) -> torch.Tensor:
    """What a per-head scan of the default attention stack should give, shaped ``like`` the scan's
    ``per_example`` ``[L, H, N]`` (NaN where a layer has no such head): for each head, the logit difference ``target - contrast`` at the last
    token when ``model`` runs ``run_on`` (default ``inputs``, every model input passed) with that head's
    input to the output projection replaced by ``value(layer, head, z) -> [N, T, Dv]``."""
    shape = st.shape
    exp = torch.full_like(like, float("nan"))
    for l in shape.attention_layers:
        s = next(x for x in st.sites.values() if x.stack == shape.default_stack and x.layer == l)
        p = out_projection(model, s.path)
        n = shape.layer(l).n_heads
        for h in range(n):
            def f(z, l=l, h=h):
                z[:, :, h] = value(l, h, z)
                return z
            with edit_z(p, n, f):
                lg = _logits(model, run_on if run_on is not None else inputs)[:, -1]
            exp[l, h] = lg.gather(1, tgt[:, None])[:, 0] - lg.gather(1, con[:, None])[:, 0]
    return exp


# ------------------------------------------------------------------------------------------------
# the checks


def _clear(e: BaseException) -> bool:
    return type(e).__name__ in CLEAR_ERRORS and len(str(e)) > 20


def check_model(model_type: str, cls_name: str) -> Row:
    import headint
    from headint.integration.structure import model_structure

    row = Row(model_type, cls_name)
    t0 = time.time()
    try:
        model = tiny_model(model_type, cls_name)
    except Exception as e:
        row.status, row.reason = "skipped", f"no tiny model: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    try:
        inputs, other = _inputs(model, 1), _inputs(model, 2)
        ref = _logits(model, inputs)
        if not torch.isfinite(ref).all():
            row.status, row.reason = "skipped", "the tiny eager model gives non-finite logits"
            return row
    except Exception as e:
        row.status, row.reason = "skipped", f"the tiny eager model does not run on token ids: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    try:
        with headint.intervene(model, []):
            got = _logits(model, inputs)
    except Exception as e:
        if _clear(e):
            row.status, row.reason = "refused", f"{type(e).__name__}: {e}"
        else:
            row.status, row.reason = "crash", f"intervene(model, []): {type(e).__name__}: {e}"
        return row
    try:
        _checks(model, model_structure(model), inputs, other, ref, got, row)
    except Exception as e:
        row.status, row.reason = "crash", f"{type(e).__name__}: {e} ({traceback.format_exc().splitlines()[-3].strip()})"
    row.seconds = time.time() - t0
    return row


def _run_check(row: Row, name: str, fn) -> None:
    """``fn() -> (headint value, oracle value)``; records ok / WRONG / refused / CRASH."""
    try:
        a, b = fn()
    except Exception as e:
        if _clear(e):
            row.checks[name] = f"refused: {type(e).__name__}: {str(e)[:200]}"
        else:
            row.checks[name] = f"CRASH: {type(e).__name__}: {str(e)[:200]}"
        return
    if a is None:
        row.checks[name] = f"n/a: {b}"
        return
    d = _diff(a, b) if isinstance(a, torch.Tensor) else (0.0 if a == b else float("inf"))
    row.checks[name] = f"ok ({d:.1e})" if d <= TOL else f"WRONG ({d:.2e})"


def _checks(model, st, inputs, other, ref, got, row: Row) -> None:
    import headint

    shape = st.shape
    d = _diff(got, ref)
    row.checks["none"] = f"ok ({d:.1e})" if d <= TOL else f"WRONG ({d:.2e})"
    default = shape.default_stack
    layer = shape.attention_layers[-1]
    ls = shape.layer(layer)
    head = min(1, ls.n_heads - 1)
    site = next(s for s in st.sites.values() if s.stack == default and s.layer == layer)
    proj = out_projection(model, site.path)
    idx = _first_int(site.path)
    if idx is not None and idx != layer and len(shape.stacks) == 1:
        row.checks["site"] = f"WRONG (headint says layer {layer}, the module path {site.path} says {idx})"
    if proj is None:
        row.checks["oracle"] = f"n/a: no output projection found by name under {site.path}"
    H = ls.n_heads
    dec = getattr(model.config, "is_encoder_decoder", False)

    def z_of(inp):
        return head_outputs(model, proj, H, inp)

    def with_head(fn_z):
        with edit_z(proj, H, fn_z):
            return _logits(model, inputs)

    def zero():
        def f(z):
            z[:, :, head] = 0
            return z
        with headint.intervene(model, [headint.Ablate(layer=layer, head=head)]):
            a = _logits(model, inputs)
        return a, with_head(f)

    def mean():
        cache = headint.record(model, other, stack=None)
        zo = z_of(other)

        def f(z):
            z[:, :, head] = zo[:, :, head].mean(0)
            return z
        with headint.intervene(model, [headint.Ablate(layer=layer, head=head, kind="mean", value=cache)]):
            a = _logits(model, inputs)
        return a, with_head(f)

    def patch():
        cache = headint.record(model, other)
        zo = z_of(other)

        def f(z):
            z[:, :, head] = zo[:, :, head]
            return z
        with headint.intervene(model, [headint.Patch(layer=layer, head=head, source=cache)]):
            a = _logits(model, inputs)
        return a, with_head(f)

    def scale_out():
        def f(z):
            z[:, :, head] = z[:, :, head] * 2.5
            return z
        with headint.intervene(model, [headint.Scale(layer=layer, head=head, factor=2.5)]):
            a = _logits(model, inputs)
        return a, with_head(f)

    # the score oracle is used only where, unedited, it reproduces the model's eager output
    with oracle_scores(model, {}):
        own = _logits(model, inputs)
    scores_ok = _diff(own, ref) <= TOL
    attn_module = dict(model.named_modules())[site.path]

    def scale_scores():
        if not scores_ok:
            return None, "the score oracle does not reproduce this model's eager attention"
        with headint.intervene(model, [headint.Scale(layer=layer, head=head, factor=0.5, target="scores")]):
            a = _logits(model, inputs)
        with oracle_scores(model, {"module": id(attn_module), "score_factor": {head: 0.5}}):
            b = _logits(model, inputs)
        return a, b

    def knockout():
        if not scores_ok:
            return None, "the score oracle does not reproduce this model's eager attention"
        qs, ks = [4, 5] if not dec else [3, 4], [1, 2]
        with headint.intervene(model, [headint.Knockout(queries=qs, keys=ks, layer=layer, head=head)]):
            a = _logits(model, inputs)
        with oracle_scores(model, {"module": id(attn_module), "removed": [(head, qs, ks)]}):
            b = _logits(model, inputs)
        return a, b

    def scan():
        tgt, con = torch.tensor([5, 6]), torch.tensor([7, 8])
        batch = dict(inputs, target=tgt, contrast=con)
        res = headint.scan(model, batch, headint.metrics.logit_diff(), progress=False, batch_size=4)
        vals = res.per_example  # [L, H, N]
        exp = scan_oracle(model, st, inputs, tgt, con, lambda l, h, z: torch.zeros_like(z[:, :, h]), like=vals)
        return torch.nan_to_num(vals, nan=1e9), torch.nan_to_num(exp, nan=1e9)

    def scan_positions():
        """A per-position scan (zero ablation of one head at every position of the scanned sequence: the
        decoder's for an encoder-decoder), one position per chunk so position reuse (a cached prefix) runs
        where the model allows it."""
        tgt, con = torch.tensor([5, 6]), torch.tensor([7, 8])
        batch = dict(inputs, target=tgt, contrast=con)
        res = headint.scan(model, batch, headint.metrics.logit_diff(), per_position=True, layers=[layer], heads=[head],
                           group_positions=1, progress=False, batch_size=4)
        vals = res.per_example[layer, head]  # [T, N]
        exp = torch.empty_like(vals)
        for t in range(vals.shape[0]):
            def f(z, t=t):
                z[:, t, head] = 0
                return z
            with edit_z(proj, H, f):
                lg = _logits(model, inputs)[:, -1]
            exp[t] = lg.gather(1, tgt[:, None])[:, 0] - lg.gather(1, con[:, None])[:, 0]
        return vals, exp

    def generate():
        if dec or not _is_causal_lm(model):
            return None, "decoder-only models only"
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)

        def f(z):
            z[:, :, head] = 0
            return z
        with torch.no_grad(), headint.intervene(model, [headint.Ablate(layer=layer, head=head)]):
            a = model.generate(**inputs, **kw)
        with torch.no_grad(), edit_z(proj, H, f):
            b = model.generate(**inputs, **kw)
        return a.float(), b.float()

    def other_stacks():
        outs = []
        for stack in sorted(shape.stacks):
            if stack == default:
                continue
            l0 = shape.attention_layers_of(stack)[0]
            s = next(x for x in st.sites.values() if x.stack == stack and x.layer == l0)
            p = out_projection(model, s.path)
            if p is None:
                return None, f"no output projection found by name under {s.path}"
            n = shape.layer(l0, stack).n_heads

            def f(z):
                z[:, :, 0] = 0
                return z
            with headint.intervene(model, [headint.Ablate(layer=l0, head=0, stack=stack)]):
                a = _logits(model, inputs)
            with edit_z(p, n, f):
                b = _logits(model, inputs)
            outs.append((a, b))
        if not outs:
            return None, "one attention stack"
        return torch.stack([a for a, _ in outs]), torch.stack([b for _, b in outs])

    def generate_static():
        """Greedy generation with a static KV cache: a head ablated at absolute positions in the prompt
        and in generated tokens, and (where the score oracle holds) edges knocked out between them;
        the oracle generates without a cache, so every step is a full forward and a position is an index."""
        if dec or not _is_causal_lm(model):
            return None, "decoder-only models only"
        kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
                  output_scores=True, return_dict_in_generate=True)
        try:
            with torch.no_grad():
                own = model.generate(**inputs, cache_implementation="static", **kw)
                own_free = model.generate(**inputs, use_cache=False, **kw)
        except Exception as e:  # transformers itself: nothing headint could do
            return None, f"the model's own static-cache generation fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if not torch.equal(own.sequences, own_free.sequences) or _diff(torch.stack(own.scores), torch.stack(own_free.scores)) > TOL:
            return None, ("no oracle: the model's own static-cache generation differs from its generation without a cache "
                          "(e.g. a bidirectional model reading the cache's empty slots)")
        pos, qs, ks = [1, T, T + 2], [T, T + 1, T + 2], [0, 2, T]

        def f(z):
            for p in pos:
                if p < z.shape[1]:
                    z[:, p, head] = 0
            return z
        ivs = [headint.Ablate(layer=layer, head=head, positions=pos)]
        spec = {}
        if scores_ok:
            ivs.append(headint.Knockout(queries=qs, keys=ks, layer=layer, head=(head + 1) % H))
            spec = {"module": id(attn_module), "removed": [((head + 1) % H, qs, ks)]}
        with torch.no_grad(), headint.intervene(model, ivs):
            a = model.generate(**inputs, cache_implementation="static", **kw)
        with torch.no_grad(), edit_z(proj, H, f), (oracle_scores(model, spec) if scores_ok else contextlib.nullcontext()):
            b = model.generate(**inputs, use_cache=False, **kw)
        if not torch.equal(a.sequences, b.sequences):
            return torch.ones(1), torch.zeros(1)
        return torch.stack(a.scores), torch.stack(b.scores)

    def cross_positions():
        """On the decoder's cross-attention: a head ablated at decoder positions, edges from decoder
        queries to encoder keys knocked out, and a head patched from a recording of the stack."""
        cross = [s for s in sorted(shape.stacks) if s.endswith("cross")]
        if not cross:
            return None, "no cross-attention stack"
        stack = cross[0]
        l0 = shape.attention_layers_of(stack)[-1]
        s = next(x for x in st.sites.values() if x.stack == stack and x.layer == l0)
        p = out_projection(model, s.path)
        if p is None:
            return None, f"no output projection found by name under {s.path}"
        n = shape.layer(l0, stack).n_heads
        module = dict(model.named_modules())[s.path]
        qs, ks = [3, 4], [0, 5, 6]
        zo = head_outputs(model, p, n, other)
        cache = headint.record(model, other, stack=stack)

        def f(z):
            z[:, qs, 0] = 0
            z[:, [2, 4], 1 % n] = zo[:, [2, 4], 1 % n]
            return z
        ivs = [headint.Ablate(layer=l0, head=0, positions=qs, stack=stack),
               headint.Patch(layer=l0, head=1 % n, positions=[2, 4], source=cache, stack=stack)]
        if scores_ok:
            ivs.append(headint.Knockout(queries=qs, keys=ks, layer=l0, head=2 % n, stack=stack))
        with headint.intervene(model, ivs):
            a = _logits(model, inputs)
        spec = {"module": id(module), "removed": [(2 % n, qs, ks)]} if scores_ok else {}
        with edit_z(p, n, f), (oracle_scores(model, spec) if scores_ok else contextlib.nullcontext()):
            b = _logits(model, inputs)
        return a, b

    checks = [("zero", zero), ("mean", mean), ("patch", patch), ("scale_output", scale_out),
              ("scale_scores", scale_scores), ("knockout", knockout), ("scan", scan), ("scan_positions", scan_positions),
              ("generate", generate),
              ("other_stacks", other_stacks), ("generate_static", generate_static), ("cross_positions", cross_positions)]
    for name, fn in checks:
        if proj is None and name not in ("scale_scores", "knockout"):
            row.checks[name] = "n/a: no oracle (output projection not found by name)"
            continue
        _run_check(row, name, fn)
    verdicts = list(row.checks.values())
    if any(v.startswith("WRONG") for v in verdicts):
        row.status = "wrong"
    elif any(v.startswith("CRASH") for v in verdicts):
        row.status = "crash"
    elif proj is None:
        row.status, row.reason = "skipped", f"the oracle finds no output projection by name under {site.path}"
    else:
        row.status = "supported"
        refused = [f"{k} ({v.split(': ', 2)[-1][:100]})" for k, v in row.checks.items() if v.startswith("refused")]
        row.reason = ("refuses: " + "; ".join(refused)) if refused else ""


# ------------------------------------------------------------------------------------------------
# vision-language models: scans with pixels

# model type -> class, and overrides of its tiny config (on top of the text sizes above): images of
# IMAGE x IMAGE pixels cut into PATCH x PATCH patches, so each image is a handful of tokens
IMAGE, PATCH = 32, 8
VLM_TYPES = {
    "gemma3": ("Gemma3ForConditionalGeneration", {"mm_tokens_per_image": 4}),
    "llava": ("LlavaForConditionalGeneration", {"image_seq_length": (IMAGE // PATCH) ** 2}),
    "paligemma": ("PaliGemmaForConditionalGeneration", {"projection_dim": HIDDEN}),
    "idefics3": ("Idefics3ForConditionalGeneration", {}),
    "smolvlm": ("SmolVLMForConditionalGeneration", {}),
    "mistral3": ("Mistral3ForConditionalGeneration", {}),
    "aya_vision": ("AyaVisionForConditionalGeneration", {}),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", {}),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", {}),
    "llava_next": ("LlavaNextForConditionalGeneration", {}),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", {}),
    "vipllava": ("VipLlavaForConditionalGeneration", {}),
    "internvl": ("InternVLForConditionalGeneration", {}),
    "lfm2_vl": ("Lfm2VlForConditionalGeneration", {}),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", {}),
    "glm4v": ("Glm4vForConditionalGeneration", {}),
    "cohere2_vision": ("Cohere2VisionForConditionalGeneration", {}),
    "got_ocr2": ("GotOcr2ForConditionalGeneration", {}),
    "fast_vlm": ("FastVlmForConditionalGeneration", {}),
    "lighton_ocr": ("LightOnOcrForConditionalGeneration", {}),
    "perception_lm": ("PerceptionLMForConditionalGeneration", {}),
    "janus": ("JanusForConditionalGeneration", {}),
    "chameleon": ("ChameleonForConditionalGeneration", {}),
    "gemma3n": ("Gemma3nForConditionalGeneration", {}),
    "mllama": ("MllamaForConditionalGeneration", {}),
    "llama4": ("Llama4ForConditionalGeneration", {}),
    "fuyu": ("FuyuForCausalLM", {}),
    "gemma4": ("Gemma4ForConditionalGeneration", {}),
    "video_llava": ("VideoLlavaForConditionalGeneration", {}),
}
VLM_TEXT = 6  # text tokens after the image's


def tiny_vlm(model_type: str, cls_name: str):
    """A tiny float32 vision-language model: the text and vision sizes of :func:`tiny_model`, images
    of ``IMAGE`` pixels in ``PATCH``-pixel patches, special token ids moved into the tiny vocabulary."""
    import transformers
    from transformers import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[model_type]()
    _shrink(cfg, set())
    for k, v in VLM_TYPES[model_type][1].items():
        setattr(cfg, k, v)
    vc = getattr(cfg, "vision_config", None)
    if vc is None:
        raise ValueError(f"its default config has no vision_config ({type(cfg).__name__}): this section sizes a vision tower "
                         "and feeds its image tokens; images encoded otherwise (a VQ tokenizer, raw patches) are not built")
    for k, v in (("image_size", IMAGE), ("patch_size", PATCH)):
        if getattr(vc, k, None) is not None:
            setattr(vc, k, (v, v) if isinstance(getattr(vc, k), (list, tuple)) else v)
    if hasattr(vc, "depth"):  # Qwen2-VL's vision layers
        vc.depth = LAYERS
    if model_type == "paligemma":  # derived from the vision sizes at construction
        cfg.text_config.num_image_tokens = (IMAGE // PATCH) ** 2
        vc.projection_dim = HIDDEN
    rope = getattr(cfg.get_text_config(), "rope_parameters", None)
    if model_type.startswith(("qwen", "glm")) and isinstance(rope, dict):  # multimodal rotary sections: half the tiny head dim
        rope["mrope_section"] = [2, 3, 3]
    if hasattr(vc, "out_hidden_size"):  # the merger's output feeds the language model
        vc.out_hidden_size = cfg.get_text_config().hidden_size
    if hasattr(vc, "deepstack_visual_indexes"):
        vc.deepstack_visual_indexes = [0]
    if isinstance(getattr(cfg, "vision_feature_layers", None), (list, tuple)):  # VipLlava: layers of the 2 kept
        cfg.vision_feature_layers = [-2, -1]
    if getattr(cfg, "image_grid_pinpoints", None):  # LLaVA-NeXT's any-resolution tiles: one tile of one image size
        cfg.image_grid_pinpoints = [[IMAGE, IMAGE]]
    for k in ("vision_output_dim", "projector_input_dim", "projector_output_dim"):  # Llama 4's projector
        if isinstance(getattr(vc, k, None), int):
            setattr(vc, k, HIDDEN)
    if isinstance(getattr(vc, "pixel_shuffle_ratio", None), float):  # its adapter's input: the shuffled patch features
        vc.intermediate_size = int(vc.hidden_size / vc.pixel_shuffle_ratio ** 2)
    free = iter(range(3, 16))
    for c in (cfg, cfg.get_text_config()):
        for k, v in list(vars(c).items()):
            if k.lstrip("_").endswith(("_token_id", "_token_index")) and isinstance(v, int) and v >= VOCAB:
                setattr(c, k.lstrip("_") if k.startswith("_") and hasattr(type(c), k.lstrip("_")) else k, next(free))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return _finish(getattr(transformers, cls_name)._from_config(cfg, attn_implementation="eager"))


def _image_token(model) -> int:
    for c in (model.config, model.config.get_text_config()):
        for k in ("image_token_id", "image_token_index"):
            if isinstance(getattr(c, k, None), int):
                return getattr(c, k)
    raise ValueError(f"{type(model).__name__}: no image token id in its config")


def _pixels(model, seed: int) -> dict:
    """Pixel inputs for ``B`` images of ``IMAGE`` pixels, in the layout the model's forward takes."""
    g = torch.Generator().manual_seed(seed)
    params = inspect.signature(model.forward).parameters
    vc = model.config.vision_config
    C = getattr(vc, "num_channels", 3) or 3
    if "image_grid_thw" in params:  # flattened patches of every image, with each image's (t, h, w) grid
        tps = getattr(vc, "temporal_patch_size", 2)
        n = (IMAGE // PATCH) ** 2
        return {"pixel_values": torch.randn(B * n, C * tps * PATCH * PATCH, generator=g),
                "image_grid_thw": torch.tensor([[1, IMAGE // PATCH, IMAGE // PATCH]] * B)}
    if "pixel_attention_mask" in params:  # [B, images, C, H, W]
        return {"pixel_values": torch.randn(B, 1, C, IMAGE, IMAGE, generator=g),
                "pixel_attention_mask": torch.ones(B, 1, IMAGE, IMAGE, dtype=torch.bool)}
    if getattr(model.config, "image_grid_pinpoints", None):  # [B, tiles, C, H, W]: the whole image and its one tile
        return {"pixel_values": torch.randn(B, 2, C, IMAGE, IMAGE, generator=g), "image_sizes": torch.tensor([[IMAGE, IMAGE]] * B)}
    out = {"pixel_values": torch.randn(B, C, IMAGE, IMAGE, generator=g)}
    if "image_sizes" in params and "image_sizes" in inspect.signature(model.get_image_features).parameters:
        out["image_sizes"] = torch.tensor([[IMAGE, IMAGE]] * B)
    return out


def _image_tokens(model, pixels: dict) -> int:
    """How many image tokens one image becomes (the length of its features)."""
    params = inspect.signature(model.get_image_features).parameters
    with torch.no_grad():
        out = model.get_image_features(**{k: v for k, v in pixels.items() if k in params})
    feats = getattr(out, "pooler_output", None) if not isinstance(out, (torch.Tensor, list, tuple)) else out
    if feats is None:
        feats = out[0]
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1]).shape[0] // B


def vlm_inputs(model, seed: int, n_image: int) -> dict:
    """``B`` rows of one image each: a text token, the image's ``n_image`` tokens, ``VLM_TEXT``
    text tokens, and the pixel inputs (``token_type_ids`` marking the image where the forward takes them)."""
    g = torch.Generator().manual_seed(seed)
    special = set(range(16))
    allowed = torch.tensor([i for i in range(3, VOCAB) if i not in special])
    ids = allowed[torch.randint(len(allowed), (B, 1 + n_image + VLM_TEXT), generator=g)]
    ids[:, 1 : 1 + n_image] = _image_token(model)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **_pixels(model, seed)}
    for k in ("token_type_ids", "mm_token_type_ids"):
        if k in inspect.signature(model.forward).parameters:
            inputs[k] = (ids == _image_token(model)).long()
    return inputs


def check_vlm(model_type: str, cls_name: str) -> Row:
    """A vision-language model scanned with pixel inputs (the default attention stack: its language
    model's), against the eager oracle with every input passed: a per-head zero-ablation ``scan``
    and a denoising ``scan_patch`` (clean run, one head at a time patched from a run on another
    image and other text). Checks ``none`` (no intervention) and ``pixels`` (whether the image
    changes the logits: the oracle would not see pixels dropped otherwise) come first."""
    import headint
    from headint.integration.structure import model_structure

    row = Row(model_type, cls_name, section="vlm")
    t0 = time.time()
    try:
        model = tiny_vlm(model_type, cls_name)
        n_image = _image_tokens(model, _pixels(model, 1))
        inputs, other = vlm_inputs(model, 1, n_image), vlm_inputs(model, 2, n_image)
        ref = _logits(model, inputs)
        other_image = _logits(model, dict(inputs, pixel_values=other["pixel_values"]))
    except Exception as e:
        row.status = "skipped"
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        msg = lines[0][:160] if lines else f"(no message; raised at {traceback.format_exc().splitlines()[-3].strip()})"
        row.reason = f"no tiny model with pixels: {type(e).__name__}: {msg}"
        row.seconds = time.time() - t0
        return row
    row.reason = f"{n_image} image tokens per image; inputs {sorted(k for k in inputs if k != 'input_ids')}"
    try:
        with headint.intervene(model, []):
            got = _logits(model, inputs)
        st = model_structure(model)
    except Exception as e:
        row.status = "refused" if _clear(e) else "crash"
        row.reason = f"{type(e).__name__}: {e}"
        row.seconds = time.time() - t0
        return row
    d = _diff(got, ref)
    row.checks["none"] = f"ok ({d:.1e})" if d <= TOL else f"WRONG ({d:.2e})"
    d = _diff(other_image, ref)
    row.checks["pixels"] = f"ok ({d:.1e})" if d > 1e-3 else f"n/a: another image barely moves the logits ({d:.1e})"
    if d <= 1e-3:
        row.reason += "; the image barely moves the logits: this row does not show that pixels reach the scan"
    tgt, con = torch.tensor([20, 21]), torch.tensor([22, 23])

    def scan():
        res = headint.scan(model, dict(inputs, target=tgt, contrast=con), headint.metrics.logit_diff(), progress=False, batch_size=4)
        exp = scan_oracle(model, st, inputs, tgt, con, lambda l, h, z: torch.zeros_like(z[:, :, h]), like=res.per_example)
        return torch.nan_to_num(res.per_example, nan=1e9), torch.nan_to_num(exp, nan=1e9)

    def scan_patch():
        res = headint.scan(model, dict(inputs, target=tgt, contrast=con), headint.metrics.logit_diff(), method="patch",
                           corrupt=dict(other, target=tgt, contrast=con), progress=False, batch_size=4)
        # denoising: the corrupted run (``other``) with one head's output taken from the clean run
        clean_z = {}
        for l in st.shape.attention_layers:
            s = next(x for x in st.sites.values() if x.stack == st.shape.default_stack and x.layer == l)
            clean_z[l] = head_outputs(model, out_projection(model, s.path), st.shape.layer(l).n_heads, inputs)
        exp = scan_oracle(model, st, inputs, tgt, con, lambda l, h, z: clean_z[l][:, :, h], like=res.per_example, run_on=other)
        return torch.nan_to_num(res.per_example, nan=1e9), torch.nan_to_num(exp, nan=1e9)

    site = next(s for s in st.sites.values() if s.stack == st.shape.default_stack)
    if out_projection(model, site.path) is None:
        row.status, row.reason = "skipped", f"the oracle finds no output projection by name under {site.path}"
    else:
        _run_check(row, "scan", scan)
        _run_check(row, "scan_patch", scan_patch)
        verdicts = list(row.checks.values())
        reasons: dict = {}  # one refusal message -> the checks refused with it
        for k, v in row.checks.items():
            if v.startswith("refused"):
                reasons.setdefault(v.split(": ", 2)[-1][:200], []).append(k)
        refused = [f"{', '.join(ks)}: {msg}" for msg, ks in reasons.items()]
        row.status = ("wrong" if any(v.startswith("WRONG") for v in verdicts) else
                      "crash" if any(v.startswith("CRASH") for v in verdicts) else
                      "refused" if refused and not any(row.checks[k].startswith("ok") for k in ("scan", "scan_patch")) else "supported")
        if refused:
            row.reason = "refuses: " + "; ".join(refused) + f" ({row.reason})"
    row.seconds = time.time() - t0
    return row


# ------------------------------------------------------------------------------------------------
# the table


COUNTED_CHECKS = ("scan", "scan_positions", "generate", "other_stacks", "generate_static", "cross_positions")


def _check_counts(rows: list[Row], check: str) -> dict:
    """How the architectures fared on one check: ok, refused, n/a (not applicable or no oracle),
    wrong, crash, not run (the model was refused or skipped before its checks)."""
    out = {"ok": 0, "refused": 0, "n/a": 0, "wrong": 0, "crash": 0, "not run": 0}
    for r in rows:
        v = r.checks.get(check)
        key = ("not run" if v is None else "ok" if v.startswith("ok") else "refused" if v.startswith("refused")
               else "n/a" if v.startswith("n/a") else "wrong" if v.startswith("WRONG") else "crash")
        out[key] += 1
    return out


def _totals(rows: list[Row]) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in ("supported", "refused", "skipped", "wrong", "crash")}
    return "Totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (of {len(rows)})."


def _note(r: Row) -> str:
    note = r.reason.replace("|", "\\|").replace("\n", " ")
    if r.status in ("wrong", "crash"):
        bad = [f"{k}: {v}" for k, v in r.checks.items() if v.startswith(("WRONG", "CRASH"))]
        note = "; ".join(bad + ([note] if note else [])).replace("|", "\\|")
    return note[:400] + "..." if len(note) > 400 else note


VLM_CHECKS = ("scan", "scan_patch")


def render_vlm(rows: list[Row]) -> list[str]:
    """The vision-language section's lines (``rows``: the ``vlm`` ones)."""
    lines = [
        "## Vision-language models: scans with pixels",
        "",
        f"Generated by `python scripts/compat_matrix.py --section vlm` (part of the full walk). Each model type's "
        "image-text-to-text class, built tiny (the text sizes above, a vision tower of the same sizes, "
        f"{IMAGE}x{IMAGE}-pixel images in {PATCH}-pixel patches, special token ids moved into the vocabulary), scanned "
        f"with {B} rows of one image each: a text token, the image's tokens, {VLM_TEXT} text tokens, and every pixel input "
        "the model's forward takes (`pixel_values`, `image_sizes`, `pixel_attention_mask`, `token_type_ids`, ...). Compared "
        "with the eager oracle (every input passed, a pre-hook on each output projection of the language model) to "
        f"{TOL:g}: `scan` (exact, per head, zero ablation, logit difference at the last token), `scan_patch` (denoising: "
        "a run on another image and other text with one head patched from the clean run). `pixels`: how far another "
        "image moves the logits (where it barely does, n/a: a scan that dropped the pixels would pass unseen).",
        "",
        _totals(rows),
        "",
        *[f"`{c}`: " + ", ".join(f"{v} {n}" for v, n in _check_counts(rows, c).items()) + "." for c in VLM_CHECKS],
        "",
        "| model type | class | status | scan | scan_patch | pixels | reason / notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.checks.get(c, "-").split(":")[0] for c in (*VLM_CHECKS, "pixels")]
        lines.append(f"| {r.model_type} | {r.cls} | {r.status} | {' | '.join(cells)} | {_note(r)} |")
    return lines


def render(rows: list[Row], transformers_version: str) -> str:
    vlm = [r for r in rows if r.section == "vlm"]
    rows = [r for r in rows if r.section != "vlm"]
    lines = [
        "# Compatibility matrix",
        "",
        "Generated by `python scripts/compat_matrix.py` (do not edit by hand) with transformers "
        f"{transformers_version}: every model type whose attention goes through the attention registry, built tiny "
        f"({LAYERS} layers, hidden {HIDDEN}, {HEADS} heads / {KV_HEADS} key/value heads, vocab {VOCAB}, float32) and compared "
        f"with an independent oracle (eager attention + a pre-hook on the output projection; an eager attention function "
        f"of our own for score edits) to a normalised tolerance of {TOL:g}.",
        "",
        "Checks: `none` (no intervention), `zero` / `mean` ablation, `patch` (from a recording of other inputs), "
        "`scale_output`, `scale_scores`, `knockout`, `scan` (exact, per head, logit difference; an encoder-decoder's over its "
        "decoder, with `decoder_input_ids`), `scan_positions` (exact, one head at every position, one position per chunk: "
        "position reuse where the model allows it), `generate` (greedy, with "
        "an ablation), `other_stacks` (an ablation on every non-default attention stack, e.g. `encoder.self`, "
        "`decoder.cross`), `generate_static` (greedy, `cache_implementation=\"static\"`, a head ablated at absolute "
        "positions in the prompt and the generated tokens and edges knocked out between them, against a generation without "
        "a cache), `cross_positions` (on the decoder's cross-attention: an ablation and a knockout at decoder query "
        "positions / encoder key positions, a patch from a recording of that stack). A check headint refuses with a clear "
        "error is listed with the architecture.",
        "",
        "Statuses: **supported**, **refused** (headint raises an error naming the reason), **skipped** (no tiny model or "
        "no oracle; reason given), **wrong** / **crash** (none may remain: the script exits non-zero).",
        "",
        _totals(rows),
        "",
        *[f"`{c}`: " + ", ".join(f"{v} {n}" for v, n in _check_counts(rows, c).items()) + "." for c in COUNTED_CHECKS],
        "",
        "| model type | class | status | reason / notes |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.model_type} | {r.cls} | {r.status} | {_note(r)} |")
    if vlm:
        lines += ["", *render_vlm(vlm)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model types")
    ap.add_argument("--out", default=None, help="write the markdown table here (default: print)")
    ap.add_argument("--json", default=None, help="write per-check results as JSON here")
    ap.add_argument("--reuse", default=None, help="a JSON written by --json: its rows stand for the model types not checked "
                    "(not in --only, or in a section not run)")
    ap.add_argument("--section", choices=("all", "lm", "vlm"), default="all",
                    help="which sections to check: the text LMs (lm), the vision-language scans with pixels (vlm), or both")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    types = candidate_types()
    if args.only:
        wanted = args.only.split(",")
        types = [t for t in types if t[0] in wanted]
    vlm_types = sorted((mt, cls) for mt, (cls, _) in VLM_TYPES.items() if not args.only or mt in args.only.split(","))
    jobs = ([(mt, cls, check_model) for mt, cls in types if uses_registry(mt, cls)] if args.section in ("all", "lm") else [])
    jobs += [(mt, cls, check_vlm) for mt, cls in vlm_types] if args.section in ("all", "vlm") else []
    rows = []
    for mt, cls, check in jobs:
        row = check(mt, cls)
        rows.append(row)
        print(f"{row.section:3s} {mt:28s} {row.status:9s} {row.seconds:5.1f}s {row.reason[:150]}", flush=True)
        bad = {k: v for k, v in row.checks.items() if v.startswith(("WRONG", "CRASH"))}
        if bad:
            print("    ", bad, flush=True)
    if args.reuse:
        checked = {(r.section, r.model_type) for r in rows}
        rows += [row for row in (Row(**r) for r in json.loads(Path(args.reuse).read_text())) if (row.section, row.model_type) not in checked]
    rows.sort(key=lambda r: (r.section, r.model_type))
    text = render(rows, transformers.__version__)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 1 if any(r.status in ("wrong", "crash") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
