"""The private replica scans run in (``headint.integration.replica``): new module objects over the
model's own tensors, private dicts, configs and flags; the model itself is only read.

- every module is a new object of the same class; parameters and buffers are the model's
  tensors (the same storage; weights that require grad held detached); dicts (submodules, hooks,
  parameters) are the replica's own, so changing the replica changes nothing of the model;
- configs are private copies with the model's own attention implementation, even while another
  thread's ``intervene`` block has the model switched; headint's session hooks are left out;
- user hooks present at creation run in the replica; instance-level forwards bound to a module
  (as ``accelerate`` installs them) are rebound to its replica, and a scan of such a model is right;
- stand-ins and captures are refused on a user's model; a module whose code still runs the
  model's own attention makes the scan fail loudly, never silently.
"""

from __future__ import annotations

import functools

import pytest
import torch

import headint
from headint import Ablate
from headint.integration import session
from headint.integration.adapter import model_parts
from headint.integration.blocks import replay_blocks
from headint.integration.replica import Replica, is_replica_module
from headint.integration.structure import model_replica, model_structure
from scan_oracles import make_batch, oracle_scan, tiny_gpt2, tiny_llama
from thread_helpers import block_held_elsewhere

BACKEND = "reference"


def test_replica_is_new_objects_over_the_same_tensors():
    model = tiny_llama(seed=1).eval()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    rep = Replica(model, model_structure(model))
    pairs = list(zip(model.modules(), rep.root.modules()))
    assert len(pairs) == len(list(model.modules())) == len(list(rep.root.modules()))
    for m, r in pairs:
        assert type(r) is type(m) and r is not m and is_replica_module(r) and not is_replica_module(m)
        assert rep.original_of(r) is m and rep.replica_of(m) is r
        assert r._modules is not m._modules and r._forward_hooks is not m._forward_hooks
        assert list(m._parameters) == list(r._parameters)
        for n, p in m._parameters.items():
            q = r._parameters[n]
            if p is None:
                assert q is None
                continue
            assert q.data_ptr() == p.data_ptr() and q.shape == p.shape
            assert q is p or (p.requires_grad and not q.requires_grad)  # weights that require grad: a detached view
        assert all(r._buffers[k] is b for k, b in m._buffers.items())
    assert rep.root.config is not model.config and rep.root.model.layers[0].self_attn.config is rep.root.config
    assert not rep.root.training
    with torch.no_grad():
        assert torch.equal(rep.root(input_ids=torch.tensor([[3, 4, 5]])).logits, model(input_ids=torch.tensor([[3, 4, 5]])).logits)
    # changing the replica's tree changes nothing of the model's
    original = list(model.model.layers)
    with replay_blocks(rep.parts, 1, [None]):
        assert type(rep.root.model.layers[0]).__name__ == "_Replay"
        assert list(model.model.layers) == original
    with pytest.raises(RuntimeError, match="never the model itself"):
        with replay_blocks(model_parts(model, rep.parts.shape), 1, [None]):
            pass
    assert list(model.model.layers) == original


def test_replica_holds_the_models_own_attention_while_another_thread_switched_it():
    model = tiny_gpt2(seed=2).eval()
    own = model.config._attn_implementation
    with block_held_elsewhere(model, [Ablate(layer=0, head=0)], BACKEND):
        assert model.config._attn_implementation == "headint"
        rep = model_replica(model)
        assert rep.root.config._attn_implementation == own
        marked = [f for m in rep.root.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for f in d.values()
                  if getattr(f, "_headint_hook", False)]
        assert marked == []  # the other thread's session hooks are not the replica's
        with rep.session(None, BACKEND):
            assert rep.root.config._attn_implementation == "headint"
        assert rep.root.config._attn_implementation == own and model.config._attn_implementation == "headint"
    assert model.config._attn_implementation == own
    assert session.open_sessions() == []


def test_user_hooks_and_instance_forwards_follow_the_replica():
    """A hook on the model when the scan starts runs in its forwards; an instance-level forward
    bound to a module (``accelerate``'s ``functools.partial(new_forward, module)`` and
    ``module._old_forward``) is rebound to the replica, so the scan's stand-ins and sessions apply."""
    model = tiny_gpt2(seed=3).eval()
    batch = make_batch(3, 6, seed=4)
    want = oracle_scan(model, batch, "logit_diff", method="zero")
    calls: list = []

    def new_forward(module, *args, **kwargs):  # what accelerate's add_hook_to_module installs
        calls.append(module)
        return module._old_forward(*args, **kwargs)

    for block in model.transformer.h:
        block._old_forward = block.forward
        block.forward = functools.update_wrapper(functools.partial(new_forward, block), block._old_forward)
    seen: list = []
    handle = model.transformer.h[2].register_forward_pre_hook(lambda m, a: seen.append(is_replica_module(m)))
    try:
        r = headint.scan(model, batch, "logit_diff", method="zero", progress=False, backend=BACKEND)
    finally:
        handle.remove()
    torch.testing.assert_close(r.per_example, want, atol=1e-5, rtol=1e-5)
    assert seen and all(seen)  # the user's hook ran, in the replica
    assert calls and all(is_replica_module(m) for m in calls)
    assert r.settings["final_block"] == "final block for the last query only"


def test_a_forward_of_its_own_is_refused_by_scans_and_probed_in_place():
    """An instance forward that is code of its own (a closure, not a bound method or partial) may
    run the model's own modules: a scan refuses the model, naming the module; ``intervene`` (whose
    probe then runs on the model itself) still works on it."""
    model = tiny_gpt2(seed=5).eval()
    block = model.transformer.h[1]
    own = block.forward
    block.forward = lambda *a, **k: own(*a, **k)
    assert Replica(model).foreign == ["transformer.h.1"]
    with pytest.raises(headint.UnsupportedModelError, match=r"modules \['transformer.h.1'\] carry an instance-level forward"):
        headint.scan(model, make_batch(2, 5, seed=6), "logit_diff", method="zero", progress=False, backend=BACKEND)
    assert sorted(s.layer for s in model_structure(model).sites.values()) == [0, 1, 2]  # probed in place: every layer
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with headint.intervene(model, [Ablate(layer=1, head=2)], backend=BACKEND):
            ablated = model(input_ids=ids).logits
    assert not torch.allclose(plain, ablated)
    assert session.open_sessions() == []


def test_a_leafs_forward_of_its_own_is_fine():
    """A leaf (no submodules) wrapped by code of its own, as ``transformers``' tensor parallelism
    wraps projections, computes from its inputs and the model's tensors: scans run it."""
    model = tiny_gpt2(seed=7).eval()
    batch = make_batch(3, 6, seed=8)
    want = oracle_scan(model, batch, "logit_diff", method="zero")
    calls = []
    for block in model.transformer.h:
        for leaf in (block.attn.c_attn, block.mlp.c_fc):
            own = leaf.forward
            leaf.forward = lambda *a, own=own, **k: calls.append(1) or own(*a, **k)
    assert Replica(model).foreign == []
    r = headint.scan(model, batch, "logit_diff", method="zero", progress=False, backend=BACKEND)
    torch.testing.assert_close(r.per_example, want, atol=1e-5, rtol=1e-5)
    assert calls
