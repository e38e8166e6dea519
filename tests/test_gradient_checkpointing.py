"""Gradient checkpointing inside ``intervene`` (issue 22, item 4): a checkpointed layer recomputed
during ``backward()`` sees the same interventions, also when ``backward`` runs after the block has
exited, with ``use_reentrant=True`` and ``False``.

The oracle shares no code with headint and does not checkpoint: head outputs edited by forward
pre-hooks on the output projection, edges removed and scores scaled by an eager attention
function of our own (``tiny_models``); parameter gradients compared at fp32.
"""

from __future__ import annotations

import pytest
import torch

from headint import Ablate, Knockout, Scale, intervene

import tiny_models as tm

T = 7


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with tm.one_thread():
        yield


def _model(arch):
    t = tm.FACTORIES[arch](seed=3)
    for p in t.model.parameters():
        p.requires_grad_(True)
    t.model.train()  # checkpointing runs in train mode (the tiny models have no dropout)
    return t


def _grads(model):
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


def _loss(model, x):
    return model(x).logits.log_softmax(-1)[..., 5].sum()


def _oracle_grads(t, x):
    q = torch.zeros(1, T, dtype=torch.bool)
    q[:, [5, 6]] = True
    k = torch.zeros(1, T, dtype=torch.bool)
    k[:, [1, 2]] = True
    spec = tm.OracleSpec(score_factor={1: {0: 0.5}}, removed={1: [([2], q, k)]})

    def zero(z):
        z[:, [2, 3], 1] = 0
        return z

    with tm.oracle_attention(t.model, spec), tm.edit_heads(t, {0: zero}):
        _loss(t.model, x).backward()
    return _grads(t.model)


IVS = [Ablate(layer=0, head=1, positions=[2, 3]), Knockout(queries=[5, 6], keys=[1, 2], layer=1, head=2),
       Scale(layer=1, head=0, factor=0.5, target="scores")]


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_backward_after_the_block(arch, reentrant):
    t = _model(arch)
    x = torch.randint(3, tm.VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    want = _oracle_grads(t, x)
    impl = t.model.config._attn_implementation
    if hasattr(t.model, "activation_checkpointing_enable"):  # gradient_checkpointing_enable's new name (transformers 5)
        t.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        t.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    funcs = {n: m.__dict__["_gradient_checkpointing_func"] for n, m in t.model.named_modules() if "_gradient_checkpointing_func" in m.__dict__}
    assert funcs
    for where in ("after", "inside"):
        with intervene(t.model, IVS, backend="reference"):
            loss = _loss(t.model, x)
            if where == "inside":
                loss.backward()
        if where == "after":
            loss.backward()
        got = _grads(t.model)
        assert set(got) == set(want)
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-4, rtol=1e-4, msg=lambda m: f"{where}, {n}: {m}")
    # the model is left as it was: its attention implementation and checkpointing functions
    assert t.model.config._attn_implementation == impl
    assert {n: m.__dict__["_gradient_checkpointing_func"] for n, m in t.model.named_modules()
            if "_gradient_checkpointing_func" in m.__dict__} == funcs
    # and a plain backward afterwards is the model's own
    _loss(t.model, x).backward()
    plain = _grads(t.model)
    (getattr(t.model, "activation_checkpointing_disable", None) or t.model.gradient_checkpointing_disable)()
    _loss(t.model, x).backward()
    for n, g in _grads(t.model).items():
        torch.testing.assert_close(plain[n], g, atol=1e-5, rtol=1e-5)


def test_checkpointing_turned_on_inside_the_block():
    t = _model("llama")
    x = torch.randint(3, tm.VOCAB, (2, T), generator=torch.Generator().manual_seed(2))
    want = _oracle_grads(t, x)
    with intervene(t.model, IVS, backend="reference"):
        t.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        loss = _loss(t.model, x)
    loss.backward()
    got = _grads(t.model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-4, rtol=1e-4)
    assert all(type(m.__dict__["_gradient_checkpointing_func"]).__name__ == "partial"
               for m in t.model.modules() if "_gradient_checkpointing_func" in m.__dict__)
