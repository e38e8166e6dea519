"""Per-layer shapes, attention stacks, layers without attention and refusals, each checked against
an oracle that shares no code with headint (pre-hooks on the output projection)."""

from __future__ import annotations

import pytest
import torch
import transformers

import headint
from headint.integration import structure
from headint.integration.blocks import _Replay
from headint.shape import NonUniformShapeError

from _compat import edit_head, gemma4_with_global_head_dim, ids, llama_with_head_counts, logits, matrix

TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def cm():
    return matrix()


def _zeroed(model, proj, n_heads, head, **inputs):
    h = edit_head(proj, n_heads, head, torch.zeros_like)
    try:
        return logits(model, **inputs)
    finally:
        h.remove()


# -- per-layer shapes -------------------------------------------------------------------------------------


def test_per_layer_head_dims_gemma4_global_head_dim():
    model = gemma4_with_global_head_dim(32)
    shape = headint.integration.structure.model_shape(model)
    assert [shape.layer(l).head_dim for l in range(2)] == [8, 32]
    with pytest.raises(NonUniformShapeError, match="head_dim"):
        shape.head_dim
    x = ids()
    for layer in (0, 1):
        proj = model.model.layers[layer].self_attn.o_proj
        with headint.intervene(model, [headint.Ablate(layer=layer, head=1)]):
            got = logits(model, input_ids=x)
        torch.testing.assert_close(got, _zeroed(model, proj, 4, 1, input_ids=x), **TOL)
    # patching the wide layer from its own recording of other inputs
    other = ids(seed=5)
    cache = headint.record(model, other)
    assert cache["z", 1].shape == (2, 8, 4, 32) and cache["z", 0].shape == (2, 8, 4, 8)
    src = cache["z", 1][:, :, 2]
    h = edit_head(model.model.layers[1].self_attn.o_proj, 4, 2, lambda z: src)
    try:
        want = logits(model, input_ids=x)
    finally:
        h.remove()
    with headint.intervene(model, [headint.Patch(layer=1, head=2, source=cache)]):
        got = logits(model, input_ids=x)
    torch.testing.assert_close(got, want, **TOL)
    # a mean value shaped for the narrow layer is refused at the wide one, naming the shapes
    with pytest.raises(ValueError, match=r"expected \[4, 32\]"):
        headint.intervene(model, [headint.Ablate(layer=1, kind="mean", value=torch.zeros(4, 8))])
    # a scan over a grid of layers x heads needs one shape: a clear error, not a kernel crash
    with pytest.raises(NonUniformShapeError):
        headint.scan(model, {"input_ids": x, "target": torch.tensor([3, 4]), "contrast": torch.tensor([5, 6])},
                     headint.metrics.logit_diff(), progress=False)


def test_per_layer_head_counts():
    model = llama_with_head_counts((4, 8))
    shape = headint.integration.structure.model_shape(model)
    assert [shape.layer(l).n_heads for l in range(2)] == [4, 8]
    x = ids()
    proj = model.model.layers[1].self_attn.o_proj
    with headint.intervene(model, [headint.Ablate(layer=1, head=6)]):
        got = logits(model, input_ids=x)
    torch.testing.assert_close(got, _zeroed(model, proj, 8, 6, input_ids=x), **TOL)
    with headint.intervene(model, [headint.Scale(layer=1, head=[5, 7], factor=0.0)]):
        got2 = logits(model, input_ids=x)
    h = edit_head(proj, 8, 5, torch.zeros_like)
    try:
        want2 = _zeroed(model, proj, 8, 7, input_ids=x)
    finally:
        h.remove()
    torch.testing.assert_close(got2, want2, **TOL)
    with pytest.raises(ValueError, match="query head 6 out of range at layer 0: the model has 4 query heads"):
        headint.intervene(model, [headint.Ablate(layer=0, head=6)])
    with pytest.raises(ValueError, match="key/value head 2 out of range at layer 1"):
        headint.intervene(model, [headint.PatchQKV(layer=1, head=2, which="k", source=torch.zeros(1, 2, 8, 8))])


# -- attention stacks ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bart(cm):
    return cm.tiny_model("bart", "BartForConditionalGeneration")


def test_encoder_decoder_stacks_are_named(bart):
    shape = headint.integration.structure.model_shape(bart)
    assert set(shape.stacks) == {"encoder.self", "decoder.self", "decoder.cross"}
    assert shape.default_stack == "decoder.self"
    x, y = ids(T=8, vocab=128), ids(T=5, seed=3, vocab=128)
    inputs = dict(input_ids=x, decoder_input_ids=y)
    m = bart.model
    projs = {"decoder.self": m.decoder.layers[0].self_attn.out_proj, "encoder.self": m.encoder.layers[0].self_attn.out_proj,
             "decoder.cross": m.decoder.layers[0].encoder_attn.out_proj}
    results = {}
    for stack, proj in projs.items():
        with headint.intervene(bart, [headint.Ablate(layer=0, head=1, stack=stack)]):
            results[stack] = logits(bart, **inputs)
        torch.testing.assert_close(results[stack], _zeroed(bart, proj, 4, 1, **inputs), **TOL)
    # the default is the decoder's self-attention, and only it
    with headint.intervene(bart, [headint.Ablate(layer=0, head=1)]):
        torch.testing.assert_close(logits(bart, **inputs), results["decoder.self"], atol=0, rtol=0)
    assert not torch.allclose(results["encoder.self"], results["decoder.self"])
    with pytest.raises(ValueError, match=r"Ablate.stack must be one of the model's attention stacks \['decoder.cross', 'decoder.self', 'encoder.self'\]"):
        headint.intervene(bart, [headint.Ablate(layer=0, head=1, stack="cross")])


def test_recording_names_one_stack(bart):
    x, y = ids(T=8, vocab=128), ids(T=5, seed=3, vocab=128)
    dec = headint.record(bart, dict(input_ids=x, decoder_input_ids=y), what=("z", "k"))
    enc = headint.record(bart, dict(input_ids=x, decoder_input_ids=y), what=("z",), stack="encoder.self")
    cross = headint.record(bart, dict(input_ids=x, decoder_input_ids=y), what=("z", "k"), stack="decoder.cross")
    assert dec["z", 0].shape == (2, 5, 4, 16)  # decoder positions only, not concatenated with the encoder's
    assert enc["z", 0].shape == (2, 8, 4, 16)
    assert cross["z", 0].shape == (2, 5, 4, 16) and cross["k", 0].shape[2] == 8
    assert enc.meta["stack"] == "encoder.self"
    with pytest.raises(ValueError, match="recorded on the 'encoder.self' attention stack"):
        headint.intervene(bart, [headint.Patch(layer=0, head=0, source=enc)])
    # patching the encoder from its own recording matches the oracle
    other = ids(T=8, seed=9, vocab=128)
    src = headint.record(bart, dict(input_ids=other, decoder_input_ids=y), stack="encoder.self")
    proj = bart.model.encoder.layers[1].self_attn.out_proj
    h = edit_head(proj, 4, 3, lambda z: src["z", 1][:, :, 3])
    try:
        want = logits(bart, input_ids=x, decoder_input_ids=y)
    finally:
        h.remove()
    with headint.intervene(bart, [headint.Patch(layer=1, head=3, source=src, stack="encoder.self")]):
        got = logits(bart, input_ids=x, decoder_input_ids=y)
    torch.testing.assert_close(got, want, **TOL)


def test_gpt2_cross_attention_is_not_hit_by_a_self_attention_intervention():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, add_cross_attention=True,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.25)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    x = ids()
    enc = torch.randn(2, 6, 32)
    inputs = dict(input_ids=x, encoder_hidden_states=enc)
    with headint.intervene(model, [headint.Ablate(layer=0, head=1)]):
        got = logits(model, **inputs)
    torch.testing.assert_close(got, _zeroed(model, model.transformer.h[0].attn.c_proj, 4, 1, **inputs), **TOL)
    cache = headint.record(model, inputs)
    assert cache["z", 0].shape == (2, 8, 4, 8)  # one module's outputs, not self and cross concatenated


# -- layers without attention -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lfm2():
    """A hybrid LFM2: a convolution layer, then an attention layer."""
    torch.manual_seed(0)
    cfg = transformers.Lfm2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
                                  max_position_embeddings=128)
    model = transformers.Lfm2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25 if "embed" not in n else 1.0)
    return model


@pytest.mark.parametrize("iv", [
    headint.Ablate(layer=0, head=1), headint.Scale(layer=0, head=1, factor=2.0),
    headint.Knockout(queries=[3], keys=[1], layer=0, head=1), headint.Scale(layer=0, target="scores", factor=0.5),
])
def test_intervening_on_a_conv_layer_is_refused(lfm2, iv):
    shape = headint.integration.structure.model_shape(lfm2)
    assert shape.layer(0).kind == "conv" and shape.attention_layers == [1]
    with pytest.raises(ValueError, match=r"layer 0 is a 'conv' layer without attention; the layers with attention are \[1\]"):
        headint.intervene(lfm2, [iv])


def test_scan_covers_attention_layers_only(lfm2):
    x = ids(vocab=128)
    batch = {"input_ids": x, "target": torch.tensor([5, 6]), "contrast": torch.tensor([7, 8])}
    res = headint.scan(lfm2, batch, headint.metrics.logit_diff(), progress=False, per_position=True)
    assert res.settings["attention_layers"] == [1]
    assert torch.isnan(res.per_example[0]).all() and not torch.isnan(res.per_example[1]).any()
    with pytest.raises(ValueError, match="'conv' layer without attention"):
        headint.scan(lfm2, batch, headint.metrics.logit_diff(), progress=False, layers=[0])
    attr = headint.attribution_scan(lfm2, batch, metric=headint.metrics.logit_diff(), method="mask")
    assert torch.isnan(attr.per_example[0]).all() and not torch.isnan(attr.per_example[1]).any()


# -- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type, cls, needle", [
    ("bitnet", "BitNetForCausalLM", "model.layers.0.self_attn (BitNetAttention) do not reach its output projection unchanged"),
    ("bitnet", "BitNetForCausalLM", "attn_sub_norm"),
    ("diffllama", "DiffLlamaForCausalLM", "model.layers.0.self_attn (DiffLlamaAttention) calls attention 2 times in one forward"),
    ("t5", "T5ForConditionalGeneration", "its attention calls also pass ['position_bias']"),
    ("t5gemma2", "T5Gemma2ForConditionalGeneration", "neither its own positions (self-attention) nor the encoder's"),
])
def test_refused_with_the_reason(cm, model_type, cls, needle):
    model = cm.tiny_model(model_type, cls)
    with pytest.raises(headint.UnsupportedModelError, match="cannot intervene in " + cls) as e:
        headint.intervene(model, [])
    assert needle in str(e.value)
    with pytest.raises(headint.UnsupportedModelError):
        headint.record(model, {"input_ids": ids(vocab=128)})


def test_laguna_output_gate_refused(cm):
    model = cm.tiny_model("laguna", "LagunaForCausalLM")
    with pytest.raises(headint.UnsupportedModelError, match=r"LagunaAttention\) do not reach its output projection unchanged.*g_proj"):
        headint.intervene(model, [])


# -- the probe leaves the model as it was, once --------------------------------------------------------------


def test_probe_leaves_the_model_as_it_was(monkeypatch):
    model = llama_with_head_counts((4, 4), seed=3)
    model.train()
    model.model.layers[0].eval()  # a mixture of flags, kept as it is
    flags = {n: m.training for n, m in model.named_modules()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    impl = model.config._attn_implementation
    calls = []
    real = structure.probe
    monkeypatch.setattr(structure, "probe", lambda m: calls.append(1) or real(m))
    headint.intervene(model, [headint.Ablate(layer=0, head=1)])
    headint.intervene(model, [headint.Ablate(layer=1, head=2)])
    structure.model_shape(model)
    assert len(calls) == 1  # probed once, then cached
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert model.config._attn_implementation == impl
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_probe_of_an_unsupported_model_is_not_a_crash():
    class NotAttention(transformers.PreTrainedModel):
        config_class = transformers.LlamaConfig

        def __init__(self, config):
            super().__init__(config)
            self.emb = torch.nn.Embedding(config.vocab_size, 8)

        def forward(self, input_ids=None, attention_mask=None, **kw):
            return (self.emb(input_ids),)

    model = NotAttention(transformers.LlamaConfig(vocab_size=32, hidden_size=8, num_attention_heads=2, num_hidden_layers=1))
    with pytest.raises(headint.UnsupportedModelError, match="AttentionInterface"):
        headint.intervene(model, [])


def test_replay_stand_in_reads_the_blocks_attributes():
    block = torch.nn.Linear(2, 2)
    block.attention_type = "sliding"
    r = _Replay("out", block)
    assert r.attention_type == "sliding" and r() == "out"
    assert list(r.parameters()) == []  # the replaced block's parameters are not the stand-in's


def test_image_model_is_probed_with_pixels():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.ViTForImageClassification(cfg).eval()
    assert structure.model_shape(model).n_heads == 4
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), headint.intervene(model, [headint.Ablate(layer=1, head=2)]):
        got = model(pixel_values=x).logits
    proj = model.vit.layers[1].attention.o_proj
    h = edit_head(proj, 4, 2, torch.zeros_like)
    try:
        with torch.no_grad():
            want = model(pixel_values=x).logits
    finally:
        h.remove()
    torch.testing.assert_close(got, want, **TOL)
