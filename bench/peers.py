"""The all-heads activation-patching scan, written the way each peer library is used.

Every function here takes a GPT-2 ``transformers`` model, ``clean`` and ``corrupt`` token ids
``[N, T]`` and two token ids ``target``/``contrast``, patches each head's clean output ``z``
(the input of ``transformer.h[l].attn.c_proj``, head ``h`` in columns ``h*D:(h+1)*D``) into the
corrupted run, one head at a time, and returns the logit difference at the last position,
``[L*H, N]`` in ``(layer, head)`` order. Each includes its own clean run (to get ``z``).

- :func:`hook_loop`: plain PyTorch forward pre-hooks, one forward per head;
- :func:`transformer_lens`: ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos``
  (TransformerLens 4: a ``TransformerBridge`` around a copy of the same model);
- :func:`nnsight_per_head`: ``nnsight`` (``NNsight``), one trace per head;
- :func:`nnsight_batched`: ``nnsight`` ``LanguageModel`` traces with one invoke per head, the
  heads of one layer batched into one forward.

TransformerLens and nnsight are optional (a separate venv, see ``bench/README.md``);
:func:`available` says which import.
"""

from __future__ import annotations

import contextlib
import copy

import torch


def available() -> dict[str, str | None]:
    """``{peer: version or None when it does not import}``."""
    from importlib.metadata import version

    out = {}
    for name, dist in (("transformer_lens", "transformer-lens"), ("nnsight", "nnsight")):
        try:
            __import__(name)
            out[name] = version(dist)
        except Exception:
            out[name] = None
    return out


def logit_diff_last(logits: torch.Tensor, target: int, contrast: int) -> torch.Tensor:
    """``logits[:, -1, target] - logits[:, -1, contrast]`` in float32: ``[N]``."""
    last = logits[:, -1].float()
    return last[:, target] - last[:, contrast]


def _heads(model) -> tuple[int, int, int]:
    c = model.config
    return c.n_layer, c.n_head, c.n_embd // c.n_head


# ------------------------------------------------------------------------------------- hook loop


@torch.no_grad()
def clean_z(model, clean: torch.Tensor) -> list[torch.Tensor]:
    """Head outputs ``[N, T, H*D]`` of every layer (the input of each ``c_proj``)."""
    L, _, _ = _heads(model)
    zs: list = [None] * L
    handles = [model.transformer.h[l].attn.c_proj.register_forward_pre_hook(
        lambda _m, args, l=l: zs.__setitem__(l, args[0].detach().clone())) for l in range(L)]
    try:
        model(clean)
    finally:
        for h in handles:
            h.remove()
    return zs


@torch.no_grad()
def hook_loop(model, clean, corrupt, target: int, contrast: int) -> torch.Tensor:
    """One forward of the corrupted inputs per head, that head's clean ``z`` patched in."""
    L, H, D = _heads(model)
    zs = clean_z(model, clean)
    out = []
    for l in range(L):
        for h in range(H):
            cols = slice(h * D, (h + 1) * D)

            def patch(_m, args, cols=cols, z=zs[l]):
                x = args[0].clone()
                x[..., cols] = z[..., cols]
                return (x,)

            handle = model.transformer.h[l].attn.c_proj.register_forward_pre_hook(patch)
            try:
                out.append(logit_diff_last(model(corrupt).logits, target, contrast))
            finally:
                handle.remove()
    return torch.stack(out)


# ------------------------------------------------------------------------------------- TransformerLens


def build_transformer_lens(model):
    """The same weights in TransformerLens 4 (a ``TransformerBridge`` around a deep copy; no hub access)."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    return build_bridge_from_module(copy.deepcopy(model), "GPT2LMHeadModel", hf_config=model.config).eval()


@contextlib.contextmanager
def _quiet_tqdm():
    """TransformerLens' patching draws a tqdm bar per call; a pass-through while timing."""
    import transformer_lens.patching as tlp

    old = getattr(tlp, "tqdm", None)
    tlp.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        tlp.tqdm = old


@torch.no_grad()
def transformer_lens(tl, clean, corrupt, target: int, contrast: int) -> torch.Tensor:
    """``get_act_patch_attn_head_out_all_pos(tl, corrupt, clean_cache, metric, reduce="none")``."""
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    _, cache = tl.run_with_cache(clean)
    with _quiet_tqdm():
        res = get_act_patch_attn_head_out_all_pos(tl, corrupt, cache, lambda lg: logit_diff_last(lg, target, contrast), reduce="none")
    values = res.values if hasattr(res, "values") else res  # [L, H, N]
    return values.float().reshape(-1, values.shape[-1])


# ------------------------------------------------------------------------------------- nnsight


def wrap_nnsight(model):
    """``nnsight.NNsight`` around a deep copy of ``model`` (nnsight replaces the forwards of the
    modules it wraps; the copy leaves the model the other methods run untouched)."""
    from nnsight import NNsight

    return NNsight(copy.deepcopy(model))


def nnsight_per_head(nn_model, clean, corrupt, target: int, contrast: int) -> torch.Tensor:
    """One ``trace`` of the corrupted inputs per head (and one clean trace saving every ``z``)."""
    L, H, D = _heads(nn_model._module)
    with torch.no_grad():
        zs = []
        with nn_model.trace(clean):
            for l in range(L):
                zs.append(nn_model.transformer.h[l].attn.c_proj.input.save())
        out = []
        for l in range(L):
            for h in range(H):
                with nn_model.trace(corrupt):
                    x = nn_model.transformer.h[l].attn.c_proj.input
                    x[:, :, h * D:(h + 1) * D] = zs[l][:, :, h * D:(h + 1) * D]
                    logits = nn_model.lm_head.output.save()
                out.append(logit_diff_last(logits, target, contrast))
    return torch.stack(out)


def wrap_nnsight_language_model(model):
    """``nnsight.LanguageModel`` around a deep copy of ``model`` with a local word-level tokenizer
    (token ids in, no download): batching several invokes into one forward needs ``LanguageModel``."""
    import warnings

    from nnsight import LanguageModel
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    V = model.config.vocab_size
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0")),
                                  pad_token="t0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LanguageModel(copy.deepcopy(model), tokenizer=tok)


def nnsight_batched(lm, clean, corrupt, target: int, contrast: int) -> torch.Tensor:
    """One ``trace`` per layer with one ``invoke`` per head: the layer's heads in one batch."""
    L, H, D = _heads(lm._module)
    mask = torch.ones_like(corrupt)
    with torch.no_grad():
        zs = []
        with lm.trace({"input_ids": clean, "attention_mask": torch.ones_like(clean)}):
            for l in range(L):
                zs.append(lm.transformer.h[l].attn.c_proj.input.save())
        out = []
        for l in range(L):
            saved = []
            with lm.trace() as tracer:
                for h in range(H):
                    with tracer.invoke({"input_ids": corrupt, "attention_mask": mask}):
                        x = lm.transformer.h[l].attn.c_proj.input
                        x[:, :, h * D:(h + 1) * D] = zs[l][:, :, h * D:(h + 1) * D]
                        saved.append(lm.lm_head.output.save())
            out += [logit_diff_last(s, target, contrast) for s in saved]
    return torch.stack(out)
