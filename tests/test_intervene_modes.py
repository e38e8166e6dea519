"""Modes a model runs in (issue 22, items 7, 8, 10): gradient methods under inference mode,
``output_attentions=True`` inside a block, train mode (dropout, each module's own flag).

Attention probabilities are compared with an eager attention function of our own
(``tiny_models.oracle_attention``, no headint code) that removes edges and scales scores
explicitly and captures its probabilities. fp32, 1e-4.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import headint
from headint import Ablate, Knockout, Scale, intervene

import scan_oracles as so
import tiny_models as tm

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with tm.one_thread():
        yield


def _ids(T=7, B=2, seed=0):
    return torch.randint(3, tm.VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# item 7: gradient methods under torch.inference_mode()


def _batch():
    b = so.make_batch(N=3, T=6)
    return b


@pytest.mark.parametrize("method", ["attribution_scan", "learn_gates", "prune_curve"])
def test_gradient_methods_refuse_inference_mode(method):
    model = so.tiny_gpt2()
    batch = _batch()
    call = {
        "attribution_scan": lambda: headint.attribution_scan(model, batch, so.corrupt_of(batch), "logit_diff"),
        "learn_gates": lambda: headint.learn_gates(model, batch, "logit_diff", steps=2, progress=False),
        "prune_curve": lambda: headint.prune_curve(model, batch, "logit_diff", order="importance", max_steps=1, progress=False),
    }[method]
    with torch.inference_mode(), pytest.raises(RuntimeError, match=rf"headint.{method}.* computes gradients, which cannot run under torch.inference_mode\(\)"):
        call()
    with torch.no_grad():  # fine: gradients are enabled where needed
        call()


def test_attribution_under_no_grad_matches():
    model = so.tiny_gpt2()
    batch = _batch()
    corrupt = so.corrupt_of(batch)
    a = headint.attribution_scan(model, batch, corrupt, "logit_diff")
    with torch.no_grad():
        b = headint.attribution_scan(model, batch, corrupt, "logit_diff")
    torch.testing.assert_close(a.per_example, b.per_example)


# ------------------------------------------------------------------------------------------------
# item 8: output_attentions=True inside a block


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_attentions_are_the_intervened_probabilities(arch):
    tiny = tm.get(arch)
    x = _ids()
    T = x.shape[1]
    q = torch.zeros(1, T, dtype=torch.bool)
    q[:, [4, 6]] = True
    k = torch.zeros(1, T, dtype=torch.bool)
    k[:, [0, 2]] = True
    ivs = [Knockout(queries=[4, 6], keys=[0, 2], layer=1, head=2), Scale(layer=0, head=3, factor=0.5, target="scores"),
           Ablate(layer=0, head=1)]  # an output edit: the head's pattern is unchanged
    spec = tm.OracleSpec(score_factor={0: {3: 0.5}}, removed={1: [([2], q, k)]})

    def zero(z):
        z[:, :, 1] = 0
        return z

    with tm.oracle_attention(tiny.model, spec), tm.edit_heads(tiny, {0: zero}), torch.no_grad():
        want = tiny.model(x)
    with intervene(tiny.model, ivs, backend="reference"), torch.no_grad():
        got = tiny.model(x, output_attentions=True)
    assert len(got.attentions) == tm.N_LAYERS
    for layer in range(tm.N_LAYERS):
        assert got.attentions[layer].shape == (2, tm.N_HEADS, T, T)
        torch.testing.assert_close(got.attentions[layer], spec.capture[(layer, "probs")], **TOL)
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    assert float(got.attentions[1][:, 2, 4, [0, 2]].abs().max()) == 0.0


def test_output_attentions_in_generate_with_a_cache():
    """Each decoding step returns ``[B, H, 1, Tk]`` probabilities over the keys seen so far."""
    tiny = tm.get("llama")
    x = _ids(T=5)
    with intervene(tiny.model, [Knockout(queries=[6], keys=[1], layer=0, head=0)], backend="reference"), torch.no_grad():
        out = tiny.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False, pad_token_id=0,
                                  output_attentions=True, return_dict_in_generate=True, cache_implementation="static")
    steps = out.attentions
    assert [a[0].shape[-2:] for a in steps] == [(5, 5), (1, 6), (1, 7)]
    assert float(steps[2][0][:, 0, 0, 1].abs().max()) == 0.0  # position 6 reads nothing from position 1 at head 0
    for step in steps:
        torch.testing.assert_close(step[0].sum(-1), torch.ones_like(step[0].sum(-1)), **TOL)


# ------------------------------------------------------------------------------------------------
# item 10: train mode


def _flags(model):
    return {n: m.training for n, m in model.named_modules()}


def test_scans_restore_each_modules_own_flag():
    model = so.tiny_gpt2()
    batch = _batch()
    corrupt = so.corrupt_of(batch)
    model.eval()
    model.transformer.h[0].train()  # a mixed state: some submodules training
    model.transformer.h[2].mlp.train()
    before = _flags(model)
    assert len(set(before.values())) == 2
    headint.scan(model, batch, "logit_diff", corrupt=corrupt, method="patch", progress=False)
    assert _flags(model) == before
    headint.attribution_scan(model, batch, corrupt, "logit_diff")
    assert _flags(model) == before
    model.train()
    model.transformer.h[1].eval()
    before = _flags(model)
    headint.scan(model, batch, "logit_diff", progress=False)
    assert _flags(model) == before


def _gpt2_dropout(p):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tm.VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=p, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def test_train_mode_with_dropout_warns():
    from headint.integration.modes import DropoutWarning

    model = _gpt2_dropout(0.1).train()
    x = _ids()
    with pytest.warns(DropoutWarning, match=r"GPT2LMHeadModel is in train mode with dropout active \(transformer.h.0.attn.resid_dropout \(p=0.1\)"):
        with intervene(model, [Ablate(layer=0, head=1)]), torch.no_grad():
            model(x)
    with pytest.warns(DropoutWarning):
        headint.record(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropoutWarning)
        model.eval()
        with intervene(model, [Ablate(layer=0, head=1)]), torch.no_grad():
            model(x)
        quiet = _gpt2_dropout(0.0).train()  # train mode without dropout (e.g. gradient checkpointing): no warning
        with intervene(quiet, [Ablate(layer=0, head=1)]), torch.no_grad():
            quiet(x)
        # scans run in eval mode themselves: no warning, deterministic results
        model.train()
        batch = dict(_batch(), input_ids=_ids(T=6, B=3) % so.VOCAB)
        a = headint.scan(model, batch, "logit_diff", progress=False)
        b = headint.scan(model, batch, "logit_diff", progress=False)
        torch.testing.assert_close(a.per_example, b.per_example)
        assert model.training


def test_functional_dropout_warns():
    """BART drops out with ``F.dropout(x, p=self.dropout, training=self.training)``."""
    cfg = transformers.BartConfig(vocab_size=tm.VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=0.2,
                                  attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=32)
    model = transformers.BartForConditionalGeneration(cfg).train()
    from headint.integration.modes import DropoutWarning

    with pytest.warns(DropoutWarning, match=r"dropout \(p=0.2\)"):
        with intervene(model, []):
            pass
