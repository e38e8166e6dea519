"""Sessions (issue #12 item 4): blocks belong to the thread that enters them, the config switch is
reference-counted (blocks may close in any order), a block object is entered once; the adapter
warns once about an unexpected ``transformers`` major version."""

from __future__ import annotations

import sys
import threading
import warnings

import pytest
import torch

from headint import Ablate, Scale, intervene
from headint.integration import adapter, session

import tiny_models as tm
from test_intervene_safety import IDS, assert_pristine, snapshot
from thread_helpers import block_held_elsewhere, in_threads


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with tm.one_thread():
        yield


def _run(model, ivs):
    with intervene(model, ivs, backend="reference"):
        return tm.logits(model, IDS)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_two_threads_get_their_own_interventions(name):
    tiny = tm.get(name)
    model = tiny.model
    before, base = snapshot(model), tm.logits(model, IDS)
    ivs = {"a": [Ablate(layer=0, head=[0, 1])], "b": [Scale(layer=1, head=2, factor=3.0), Ablate(layer=0, head=3, positions=[2, 5])]}
    want = {k: _run(model, v) for k, v in ivs.items()}
    assert not torch.equal(want["a"], want["b"])
    got: dict = {"a": [], "b": []}
    plain: list = []
    barrier = threading.Barrier(3)

    def worker(key):
        def run():
            barrier.wait()
            for _ in range(40):
                got[key].append(_run(model, ivs[key]))
        return run

    def plain_worker():
        barrier.wait()
        for _ in range(40):
            plain.append(tm.logits(model, IDS))

    in_threads(worker("a"), worker("b"), plain_worker)
    for key in ivs:
        assert len(got[key]) == 40
        for i, out in enumerate(got[key]):
            assert torch.equal(out, want[key]), f"thread {key}, iteration {i}: got another thread's interventions"
    # a thread without a block never sees another thread's interventions
    for out in plain:
        torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)
    assert session.open_sessions() == []
    assert_pristine(model, before, expected_logits=base)


def test_thread_without_block_while_another_holds_one():
    tiny = tm.get("gpt2")
    model = tiny.model
    base = tm.logits(model, IDS)
    with block_held_elsewhere(model, [Ablate(layer=0, head=None), Ablate(layer=1, head=None)],
                              on_enter=lambda m: tm.logits(m, IDS)) as held:
        assert model.config._attn_implementation == "headint"  # switched by the other thread
        torch.testing.assert_close(tm.logits(model, IDS), base, atol=1e-5, rtol=1e-5)  # but not intervened here
    assert not torch.allclose(held["inside"], base, atol=1e-3)
    assert model.config._attn_implementation != "headint"


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_blocks_closed_out_of_order(name):
    tiny = tm.get(name)
    model = tiny.model
    before, base = snapshot(model), tm.logits(model, IDS)
    inner_ivs = [Ablate(layer=1, head=1)]
    only_inner = _run(model, inner_ivs)
    outer, inner = intervene(model, [Ablate(layer=0, head=0)], backend="reference"), intervene(model, inner_ivs, backend="reference")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the outer block closes first
    assert model.config._attn_implementation == "headint"
    assert torch.equal(tm.logits(model, IDS), only_inner)  # the inner block still applies, alone
    inner.__exit__(None, None, None)
    assert session.open_sessions() == []
    assert_pristine(model, before, expected_logits=base)


def test_block_closed_by_another_thread():
    tiny = tm.get("llama")
    model = tiny.model
    before, base = snapshot(model), tm.logits(model, IDS)
    block = intervene(model, [Ablate(layer=0, head=0)], backend="reference")
    block.__enter__()
    in_threads(lambda: block.__exit__(None, None, None))
    assert session.open_sessions() == []
    assert_pristine(model, before, expected_logits=base)


def test_reentering_a_block_is_a_clear_error():
    tiny = tm.get("gpt2")
    model = tiny.model
    before, base = snapshot(model), tm.logits(model, IDS)
    block = intervene(model, [Ablate(layer=0, head=2)], backend="reference")
    with block:
        first = tm.logits(model, IDS)
        with pytest.raises(RuntimeError, match=r"already entered once.*call headint\.intervene\(model, \.\.\.\) again"):
            with block:
                pass
        assert torch.equal(tm.logits(model, IDS), first)  # the open block is unaffected
    with pytest.raises(RuntimeError, match="already entered once"):
        with block:
            pass
    assert_pristine(model, before, expected_logits=base)
    with intervene(model, [Ablate(layer=0, head=2)], backend="reference"):  # a new block works
        assert torch.equal(tm.logits(model, IDS), first)


def test_transformers_version_warning_once(monkeypatch):
    tiny = tm.get("gpt2")
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "7.1.0")
    monkeypatch.setattr(adapter, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"written for transformers 5\.x, but transformers 7\.1\.0 is installed"):
        intervene(tiny.model, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        intervene(tiny.model, [])  # once only


def test_no_warning_for_the_written_for_major(monkeypatch):
    tiny = tm.get("gpt2")
    monkeypatch.setattr(sys.modules["transformers"], "__version__", f"{adapter.WRITTEN_FOR}.99.0")
    monkeypatch.setattr(adapter, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        intervene(tiny.model, [])
