"""Models once refused for the wrong reason (issue 22, item 9), now supported and checked against
an oracle that shares no code with headint (the model's own eager/SDPA attention and a pre-hook on
the output projection), and the reason given where an output projection has no weight matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import headint
from headint.integration.structure import model_structure

from _compat import edit_head, ids, logits, matrix

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def cm():
    return matrix()


def test_pegasus_x_decoder_is_causal_with_its_masks_built(cm):
    """PEGASUS-X runs only with eager attention and its decoder self-attention modules say
    ``is_causal=False``: they rely on the causal mask, which SDPA's builder may skip. headint builds
    its masks in full for it, so its attention is the model's own (causal)."""
    model = cm.tiny_model("pegasus_x", "PegasusXForConditionalGeneration")
    x, y = ids(T=8, vocab=128), ids(T=6, seed=3, vocab=128)
    inputs = dict(input_ids=x, decoder_input_ids=y, use_cache=False)
    ref = logits(model, **inputs)
    with headint.intervene(model, [], backend="reference"):
        torch.testing.assert_close(logits(model, **inputs), ref, **TOL)
    assert model_structure(model).full_masks
    proj = model.model.decoder.layers[1].self_attn.out_proj
    h = edit_head(proj, 4, 2, torch.zeros_like)
    try:
        want = logits(model, **inputs)
    finally:
        h.remove()
    with headint.intervene(model, [headint.Ablate(layer=1, head=2)], backend="reference"):
        got = logits(model, **inputs)
    torch.testing.assert_close(got, want, **TOL)
    # causal: the decoder's first position does not depend on later decoder tokens
    y2 = y.clone()
    y2[:, 3:] = (y2[:, 3:] + 1) % 128
    with headint.intervene(model, []):
        a, b = logits(model, **dict(inputs, decoder_input_ids=y)), logits(model, **dict(inputs, decoder_input_ids=y2))
    torch.testing.assert_close(a[:, :3], b[:, :3], **TOL)
    # scans run in a private replica of the model: its config copies build their masks in full too
    from headint.integration import masks
    from headint.integration.adapter import model_configs
    from headint.integration.structure import model_replica

    replica = model_replica(model)
    assert all(masks.is_marked(c) for c in model_configs(replica.root))
    with replica.session(None, "reference"):
        torch.testing.assert_close(logits(replica.root, **inputs), ref, **TOL)


def test_models_whose_masks_may_be_skipped_keep_skipping():
    from tiny_models import get

    assert not model_structure(get("llama").model).full_masks


def _quantized_llama():
    import tiny_models as tm

    model = tm.make_llama(seed=2).model
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def test_dynamic_int8_quantized_linear_layers():
    """``torch.ao.quantization.quantize_dynamic``: the output projection's weight is a ``weight()``
    accessor of a packed int8 matrix, not a tensor; it is recognised, and interventions are right."""
    model = _quantized_llama()
    x = ids(T=7)
    proj = model.model.layers[1].self_attn.o_proj
    assert callable(proj.weight)
    h = edit_head(proj, 4, 3, torch.zeros_like)
    try:
        want = logits(model, input_ids=x)
    finally:
        h.remove()
    with headint.intervene(model, [headint.Ablate(layer=1, head=3)], backend="reference"):
        got = logits(model, input_ids=x)
    torch.testing.assert_close(got, want, **TOL)
    assert (got - logits(model, input_ids=x)).abs().max() > 1e-3


class _NoWeight(nn.Module):
    """An output projection that keeps its matrix under another name."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.matrix = nn.Parameter(linear.weight.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.matrix)


def test_projection_without_a_weight_matrix_is_refused_naming_it():
    import tiny_models as tm

    model = tm.make_llama(seed=4).model
    for layer in model.model.layers:
        layer.self_attn.o_proj = _NoWeight(layer.self_attn.o_proj)
    with pytest.raises(headint.UnsupportedModelError,
                       match=r"the head outputs of model.layers.0.self_attn \(LlamaAttention\) reach model.layers.0.self_attn.o_proj "
                             r"\(.*_NoWeight\) unchanged, but it has no weight matrix headint recognises"):
        headint.intervene(model, [])
