"""The shared tiny-model fixtures (``tests/shared_models.py``): a test that leaves its model changed
fails, naming the change, and the next test gets a fresh model."""

from __future__ import annotations

import pytest
import torch

from shared_models import SharedModels


def _lend_and_return(shared, name, change=None):
    lending = shared.lend(name)
    model = next(lending)
    if change is not None:
        change(model)
    return model, lending


CHANGES = {
    "training flag": (lambda m: m.train(), "training of ''"),
    "a weight": (lambda m: m.lm_head.weight.data.add_(1.0) if hasattr(m, "lm_head") else None, "tensor 'lm_head.weight'"),
    "requires_grad": (lambda m: next(m.parameters()).requires_grad_(not next(m.parameters()).requires_grad), "requires_grad of"),
    "a hook left behind": (lambda m: m.get_submodule("lm_head").register_forward_pre_hook(lambda *a: None), "hooks of 'lm_head'"),
    "attention implementation": (lambda m: m.set_attn_implementation("eager"), "attn_implementation"),
}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("what", list(CHANGES))
def test_a_changed_model_fails_the_test_and_is_built_afresh(name, what):
    change, expected = CHANGES[what]
    shared = SharedModels()
    model, lending = _lend_and_return(shared, name, change)
    with pytest.raises(pytest.fail.Exception, match=f"left the shared tiny {name} model changed: .*{expected}"):
        next(lending)
    fresh, lending = _lend_and_return(shared, name)
    assert fresh is not model
    assert next(lending, "no failure") == "no failure"


def test_an_unchanged_model_is_shared_and_passes():
    shared = SharedModels()
    model, lending = _lend_and_return(shared, "gpt2", lambda m: m(torch.zeros(1, 3, dtype=torch.long)))
    assert next(lending, "no failure") == "no failure"
    again, lending = _lend_and_return(shared, "gpt2")
    assert again is model
    model.lm_head.weight.data[0, 0] = float("nan")  # a NaN left behind is a change
    with pytest.raises(pytest.fail.Exception, match="tensor 'lm_head.weight'"):
        next(lending)
