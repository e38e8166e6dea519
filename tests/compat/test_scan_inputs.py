"""Scans pass every input the model's forward takes (issue 22, items 1 and 5).

Encoder-decoder models (BART, mBART, T5Gemma) are scanned over their decoder's self-attention with
``decoder_input_ids`` (and masks), a vision-language model (Gemma 3) with ``pixel_values`` and
``token_type_ids``, and a Gemma 4 whose last layers share the keys/values of earlier ones
(``num_kv_shared_layers``). Every value is checked against an oracle that shares no code with
headint: the model's own eager attention, every input passed, and a pre-hook on the output
projection editing one head's input (fp32, 1e-4). Inputs that cannot be split by rows, and
encoder-decoder inputs without the decoder's, are refused naming them.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import headint
from headint.integration.structure import model_structure

from _compat import _finish, edit_head, matrix

TOL = dict(atol=1e-4, rtol=1e-4)
N = 2


@pytest.fixture(scope="module")
def cm():
    return matrix()


def gemma3_vlm(seed=0):
    """A tiny Gemma 3 vision-language model: 32x32 images, 8x8 patches pooled to 4 image tokens (id 5)."""
    torch.manual_seed(seed)
    text = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                         sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             image_size=32, patch_size=8, num_channels=3)
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                    image_token_index=5, boi_token_index=6, eoi_token_index=7)
    return _finish(transformers.Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="eager"))


def gemma4_shared_kv(seed=0):
    """A tiny Gemma 4 text model whose last 2 of 4 layers reuse the keys/values of earlier layers."""
    torch.manual_seed(seed)
    cfg = transformers.Gemma4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=8,
                                        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=4,
                                        max_position_embeddings=64, hidden_size_per_layer_input=0, vocab_size_per_layer_input=64,
                                        num_kv_shared_layers=2)
    return _finish(transformers.Gemma4ForCausalLM(cfg))


def _ids(shape, seed, lo=8, hi=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g)


def _metric_keys(seed):
    g = torch.Generator().manual_seed(seed + 100)
    t = torch.randint(8, 64, (N,), generator=g)
    return dict(target=t, contrast=(t + 5) % 56 + 8)


def model_and_inputs(name: str, cm, seed: int = 0):
    """``(model, inputs)``: the scan's inputs as a user passes them (the model's own names)."""
    if name == "gemma3_vlm":
        model = gemma3_vlm()
        ids = _ids((N, 10), seed)
        ids[:, 1:5] = 5  # the image's 4 tokens
        g = torch.Generator().manual_seed(seed + 1)
        inputs = dict(input_ids=ids, token_type_ids=(ids == 5).long(), pixel_values=torch.randn(N, 3, 32, 32, generator=g))
    elif name == "gemma4_shared_kv":
        model = gemma4_shared_kv()
        inputs = dict(input_ids=_ids((N, 7), seed, 3))
    else:
        cls = {"bart": "BartForConditionalGeneration", "mbart": "MBartForConditionalGeneration",
               "t5gemma": "T5GemmaForConditionalGeneration"}[name]
        model = cm.tiny_model(name, cls)
        enc = _ids((N, 8), seed, 3, 100)
        dec = _ids((N, 6), seed + 7, 3, 100)
        mask = torch.ones(N, 8, dtype=torch.long)
        mask[1, -2:] = 0  # a right-padded encoder row
        inputs = dict(input_ids=enc, attention_mask=mask, decoder_input_ids=dec)
    return model, {**inputs, **_metric_keys(seed)}


def _sequence(inputs):
    """The scanned sequence's ids and mask (the decoder's for an encoder-decoder)."""
    ids = inputs.get("decoder_input_ids", inputs["input_ids"])
    mask = inputs.get("decoder_attention_mask", inputs.get("attention_mask") if "decoder_input_ids" not in inputs else None)
    return ids, (torch.ones_like(ids) if mask is None else mask)


def oracle(model, inputs, edits=()) -> torch.Tensor:
    """``[N]`` logit differences at each row's last real token, with ``edits`` ``[(proj, H, head,
    position or None, fn)]`` applied to the head outputs entering the output projections."""
    feed = {k: v for k, v in inputs.items() if k not in ("target", "contrast")}
    handles = []
    for proj, H, head, pos, fn in edits:
        def f(z, pos=pos, fn=fn):
            if pos is None:
                return fn(z)
            z = z.clone()
            z[:, pos] = fn(z[:, pos])
            return z
        handles.append(edit_head(proj, H, head, f))
    try:
        with torch.no_grad():
            logits = model(**feed, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    ids, mask = _sequence(inputs)
    last = mask.long().cumsum(1).argmax(1)
    at = logits[torch.arange(N), last]
    return at[torch.arange(N), inputs["target"]] - at[torch.arange(N), inputs["contrast"]]


def projections(model):
    """``{layer: (output projection, n_heads)}`` of the default attention stack (from the probe)."""
    st = model_structure(model)
    mods = dict(model.named_modules())
    return {s.layer: (mods[s.out_proj], s.shape.n_heads) for s in st.sites.values() if s.stack == st.shape.default_stack}


MODELS = ["bart", "mbart", "t5gemma", "gemma3_vlm", "gemma4_shared_kv"]


@pytest.mark.parametrize("name", MODELS)
def test_per_head_scans_match_the_oracle(cm, name):
    model, inputs = model_and_inputs(name, cm)
    projs = projections(model)
    r = headint.scan(model, inputs, "logit_diff", method="zero", progress=False, backend="reference")
    want = torch.stack([torch.stack([oracle(model, inputs, [(proj, H, h, None, torch.zeros_like)]) for h in range(H)])
                        for l, (proj, H) in sorted(projs.items())])
    torch.testing.assert_close(r.per_example, want, **TOL)
    assert (want - oracle(model, inputs)).abs().max() > 1e-2  # the heads matter
    # denoising patch from a corrupted run: its own inputs (another image, other decoder tokens)
    _, corrupt = model_and_inputs(name, cm, seed=3)
    corrupt = {k: corrupt[k] if k not in ("target", "contrast") else inputs[k] for k in inputs}
    p = headint.scan(model, inputs, "logit_diff", corrupt=corrupt, method="patch", progress=False, backend="reference")
    for l, (proj, H) in sorted(projs.items()):
        z = {}
        grab = proj.register_forward_pre_hook(lambda _m, a: z.__setitem__("z", a[0].reshape(*a[0].shape[:-1], H, -1).clone()))
        try:
            oracle(model, inputs)
        finally:
            grab.remove()
        for h in range(H):
            got = p.per_example[l, h]
            torch.testing.assert_close(got, oracle(model, corrupt, [(proj, H, h, None, lambda x, h=h: z["z"][..., h, :])]), **TOL)


@pytest.mark.parametrize("name", MODELS)
def test_per_position_scans_match_the_oracle(cm, name):
    model, inputs = model_and_inputs(name, cm)
    projs = projections(model)
    T = _sequence(inputs)[0].shape[1]
    layers = sorted(projs)[-2:]
    r = headint.scan(model, inputs, "logit_diff", method="zero", per_position=True, layers=layers, heads=[1],
                     group_positions=1, progress=False, backend="reference")
    for l in layers:
        proj, H = projs[l]
        want = torch.stack([oracle(model, inputs, [(proj, H, 1, t, torch.zeros_like)]) for t in range(T)])
        torch.testing.assert_close(r.per_example[l, 1], want, **TOL)


@pytest.mark.parametrize("name", ["bart", "gemma3_vlm"])
def test_gradient_and_curve_methods_get_every_input(cm, name):
    """Attribution patching, pruning curves and learned gates start from the same base runs: their
    clean values are the model's with every input."""
    model, inputs = model_and_inputs(name, cm)
    clean = oracle(model, inputs)
    a = headint.attribution_scan(model, inputs, method="mask", metric="logit_diff", backend="reference")
    torch.testing.assert_close(a.base_per_example.float(), clean, **TOL)
    (l, (proj, H)), = list(sorted(projections(model).items()))[-1:]
    curve = headint.prune_curve(model, inputs, "logit_diff", order=[(l, 0)], progress=False, backend="reference")
    torch.testing.assert_close(curve.per_example[0], clean, **TOL)
    torch.testing.assert_close(curve.per_example[1], oracle(model, inputs, [(proj, H, 0, None, torch.zeros_like)]), **TOL)


def test_pixels_reach_the_scan(cm):
    """The Gemma 3 scan is not the text-only one (pixel values are passed, not dropped)."""
    model, inputs = model_and_inputs("gemma3_vlm", cm)
    text_only = {k: v for k, v in inputs.items() if k != "pixel_values"}
    a = headint.scan(model, inputs, "logit_diff", method="zero", progress=False, backend="reference")
    b = headint.scan(model, text_only, "logit_diff", method="zero", progress=False, backend="reference")
    assert (a.per_example - b.per_example).abs().max() > 1e-2


def test_encoder_decoder_needs_the_decoders_inputs(cm):
    model, inputs = model_and_inputs("bart", cm)
    with pytest.raises(TypeError, match="encoder-decoder.*'decoder_input_ids'"):
        headint.scan(model, {k: v for k, v in inputs.items() if k != "decoder_input_ids"}, "logit_diff", progress=False)
    bad = inputs["decoder_input_ids"].clone()
    bad[1, 2] = model.get_input_embeddings().num_embeddings  # one past the vocabulary
    with pytest.raises(ValueError, match=r"inputs\['decoder_input_ids'\]"):
        headint.scan(model, dict(inputs, decoder_input_ids=bad), "logit_diff", progress=False)
    bad = inputs["input_ids"].clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match=r"inputs\['input_ids'\]"):
        headint.scan(model, dict(inputs, input_ids=bad), "logit_diff", progress=False)
    left = dict(inputs, decoder_attention_mask=torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"left-padded \(decoder_attention_mask\).*takes no decoder_position_ids"):
        headint.scan(model, left, "logit_diff", progress=False)


def test_an_input_that_is_not_per_row_is_refused_naming_it(cm):
    model, inputs = model_and_inputs("gemma3_vlm", cm)
    flat = dict(inputs, pixel_values=inputs["pixel_values"][:1])
    with pytest.raises(ValueError, match=r"inputs\['pixel_values'\] has shape \[1, 3, 32, 32\], but input_ids has 2 rows"):
        headint.scan(model, flat, "logit_diff", progress=False)


def test_shared_kv_models_run_whole_forwards(cm):
    """Gemma 4's shared layers read keys/values a source layer put in this forward's dict: scans
    neither replay the source block nor feed a cached prefix (they crashed with KeyError before)."""
    model, inputs = model_and_inputs("gemma4_shared_kv", cm)
    r = headint.scan(model, inputs, "logit_diff", method="zero", per_position=True, layers=[3], heads=[0],
                     group_positions=1, progress=False, backend="reference")
    assert r.settings["position_reuse"] is False
    assert r.settings["cost"]["layer_forwards"] >= 4 * (1 + 7)  # every variant runs every layer


def test_mla_per_position_head_scans_feed_back_the_models_own_cache():
    """DeepSeek-V3 (MLA) caches compressed latents: per-position scans of head outputs with one
    position per chunk feed back what the model put in its cache (item 6; they crashed with
    "Sizes of tensors must match" when the prefix was the per-head keys/values)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "backends"))
    from test_backend_models_softcap_sinks_vdim import make_deepseek_v3

    model = make_deepseek_v3()
    V = model.config.vocab_size
    inputs = dict(input_ids=_ids((N, 7), 5, 3, V), target=torch.tensor([1, 2]) % V, contrast=torch.tensor([3, 4]) % V)
    projs = projections(model)
    l = sorted(projs)[-1]
    r = headint.scan(model, inputs, "logit_diff", method="zero", per_position=True, layers=[l], heads=[0],
                     group_positions=1, progress=False, backend="reference")
    assert r.settings["position_reuse"] is True
    proj, H = projs[l]
    want = torch.stack([oracle(model, inputs, [(proj, H, 0, t, torch.zeros_like)]) for t in range(7)])
    torch.testing.assert_close(r.per_example[l, 0], want, **TOL)
    assert (want - oracle(model, inputs)).abs().max() > 1e-3


def test_right_padded_decoder_rows_read_their_last_real_token(cm):
    """An encoder-decoder batch with right-padded decoder rows: each row's metric is at its last
    real decoder token, and padding changes nothing (the oracle runs each row alone)."""
    model, inputs = model_and_inputs("bart", cm)
    dmask = torch.ones(N, 6, dtype=torch.long)
    dmask[0, -2:] = 0
    inputs = dict(inputs, decoder_attention_mask=dmask)
    projs = projections(model)
    r = headint.scan(model, inputs, "logit_diff", method="zero", progress=False, backend="reference")
    for i in range(N):
        alone = {k: v[i : i + 1] for k, v in inputs.items()}
        n = int(dmask[i].sum())
        alone = dict(alone, decoder_input_ids=alone["decoder_input_ids"][:, :n], decoder_attention_mask=alone["decoder_attention_mask"][:, :n])
        for l, (proj, H) in projs.items():
            for h in range(H):
                want = _oracle_one(model, alone, [(proj, H, h, None, torch.zeros_like)])
                torch.testing.assert_close(r.per_example[l, h, i], want, **TOL)


def _oracle_one(model, inputs, edits):
    feed = {k: v for k, v in inputs.items() if k not in ("target", "contrast")}
    hs = [edit_head(proj, H, h, fn) for proj, H, h, _, fn in edits]
    try:
        with torch.no_grad():
            logits = model(**feed, use_cache=False).logits[0, -1]
    finally:
        for x in hs:
            x.remove()
    return logits[inputs["target"][0]] - logits[inputs["contrast"][0]]


def test_a_forward_input_that_is_not_a_tensor_is_refused_naming_it(cm):
    model, inputs = model_and_inputs("gemma3_vlm", cm)
    with pytest.raises(TypeError, match=r"\['pixel_values'\] \(list\) are inputs of Gemma3ForConditionalGeneration.forward"):
        headint.scan(model, dict(inputs, pixel_values=list(inputs["pixel_values"])), "logit_diff", progress=False)
