"""The tiny scan-test models shared by the tests of one process (the ``gpt2`` / ``llama`` fixtures
of ``tests/conftest.py``), and the check that each test leaves them as it found them. A plain
module, so that a test can import it (``conftest`` names several modules under pytest)."""

from __future__ import annotations

import pytest
import torch


class SharedModels:
    """The tiny scan-test models, built once per test process (``scope="session"``) and handed to
    every test that asks for them, each test checked afterwards to leave its model exactly as it
    found it: parameters and buffers, their ``requires_grad``, every module's training flag, the
    attention implementation, and no hooks left behind - what headint promises after any exit. A
    test that changes its model fails in teardown, naming what changed, and the model is built
    afresh, so no later test sees the change."""

    def __init__(self):
        self.models: dict[str, object] = {}
        self.states: dict[str, dict] = {}

    @staticmethod
    def _build(name):
        from scan_oracles import tiny_gpt2, tiny_llama

        return {"gpt2": tiny_gpt2, "llama": tiny_llama}[name]()

    @staticmethod
    def state(model) -> dict:
        return {
            "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
            "training": {k: m.training for k, m in model.named_modules()},
            "attn_implementation": model.config._attn_implementation,
            "hooks": {k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                          len(getattr(m, "_backward_pre_hooks", {}))) for k, m in model.named_modules()},
        }

    @staticmethod
    def changes(before: dict, after: dict) -> list[str]:
        found = [f"{key} {before[key]!r} -> {after[key]!r}" for key in ("attn_implementation",) if before[key] != after[key]]
        for key in ("requires_grad", "training", "hooks"):
            found += [f"{key} of {k!r}: {before[key].get(k)!r} -> {v!r}" for k, v in after[key].items()
                      if before[key].get(k) != v]
        a, b = before["tensors"], after["tensors"]
        if set(a) != set(b):
            found.append(f"state_dict keys {sorted(set(a) ^ set(b))}")
        found += [f"tensor {k!r}" for k in a.keys() & b.keys()
                  if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or not torch_equal(a[k], b[k])]
        return found

    def lend(self, name):
        if name not in self.models:
            self.models[name] = self._build(name)
            self.states[name] = self.state(self.models[name])
        model = self.models[name]
        yield model
        changed = self.changes(self.states[name], self.state(model))
        if changed:
            del self.models[name]  # the next test gets a fresh one
            pytest.fail(f"the test left the shared tiny {name} model changed: " + "; ".join(changed[:8]), pytrace=False)


def torch_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal elements, NaN equal to NaN."""
    return bool(torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                      and torch.equal(a.nan_to_num(), b.nan_to_num())))


