"""A scan is invisible to every other caller of the model (issue #21, item 1).

A scan's speed paths (replayed blocks, the last-query final block, replayed q/k/v projections,
captures stopped at an attention call, the KV-cache prefix of position reuse, eval mode, the
switch to headint's attention) run in a private replica of the model. Here, on the same model
and at the same time:

- one thread scans (every shortcut: depth and position reuse, ``group_positions``, restricted
  logits, the probed callable metric, the last-query final block, clean attention with replayed
  projections, q-target recordings);
- another runs plain forwards, ``intervene()`` forwards and ``generate()`` (plain and intervened),
  checking the model's module tree, parameters and config between them;
- two more run other scans (one of them an attribution scan: gradients, with weights that
  require grad);

for several rounds. Every output equals its single-thread reference bit for bit, no thread
raises, and the model is bit-identical afterwards (module tree, parameter and buffer objects and
contents, ``state_dict`` keys, configs, flags, hooks), also after a scan whose metric raises on
its third chunk while the other threads run. The first scan of a fresh model (its probe) is
invisible too.
"""

from __future__ import annotations

import threading

import pytest
import torch

import headint
from headint import Ablate, Patch, Scale
from headint.integration import session
from headint.metrics import LogitDiff
from scan_oracles import corrupt_of, make_batch, tiny_gpt2, tiny_llama
from thread_helpers import block_held_elsewhere, in_threads

ROUNDS = 3
BACKEND = "auto"
IDS = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(5))


def _callable(logits, batch):  # a user's metric on full logits: probed, then fed the last position only
    return logits[:, -1, 3] - logits[:, -1, 7]


def scans(model) -> dict:
    """Two scans that together take every shortcut."""
    batch = make_batch(3, 7, seed=41, pad="left", lengths=[7, 6, 5])
    corrupt = corrupt_of(batch)
    kw = dict(progress=False, backend=BACKEND)
    return {
        # all heads: depth reuse, clean attention + replayed projections, last-query final block, LogitDiff
        "heads": lambda: headint.scan(model, batch, LogitDiff(), corrupt=corrupt, method="patch", batch_size=5, **kw),
        # per position: position reuse, group_positions, the probed callable, a recorded q source
        "positions": lambda: headint.scan(model, batch, _callable, method="resample", target="q", per_position=True,
                                          heads=[0, 2], positions=[1, 4, 6], group_positions=2, batch_size=4, **kw),
        # gradients with respect to head masks (the weights require grad: nothing may reach them)
        "attribution": lambda: headint.attribution_scan(model, batch, corrupt, LogitDiff(), batch_size=2, backend=BACKEND),
    }


def others(model) -> dict:
    """What another thread does with the model meanwhile."""
    D = model.config.hidden_size // model.config.num_attention_heads
    ivs = [Ablate(layer=0, head=1), Scale(layer=1, head=2, factor=0.5), Patch(layer=2, head=3, source=torch.zeros(1, 6, 4, D))]
    gen_ivs = [Ablate(layer=0, head=1), Scale(layer=2, head=0, factor=0.0)]
    gen = dict(attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False, pad_token_id=0)

    def plain():
        with torch.no_grad():
            return model(input_ids=IDS).logits

    def intervened():
        with torch.no_grad(), headint.intervene(model, ivs, backend=BACKEND):
            return model(input_ids=IDS).logits

    def generate():
        with torch.no_grad():
            return model.generate(input_ids=IDS, **gen)

    def generate_intervened():
        with torch.no_grad(), headint.intervene(model, gen_ivs, backend=BACKEND):
            return model.generate(input_ids=IDS, **gen)

    return {"plain": plain, "intervened": intervened, "generate": generate, "generate intervened": generate_intervened}


def snapshot(model) -> dict:
    """Everything of the model another caller could see."""
    return {
        "tree": [(name, id(m), type(m), tuple(m._modules)) for name, m in model.named_modules(remove_duplicate=False)],
        "params": [(name, id(p), p.detach().clone(), p.requires_grad) for name, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(name, id(b), b.clone()) for name, b in model.named_buffers(remove_duplicate=False)],
        "state_dict": list(model.state_dict().keys()),
        "training": [m.training for m in model.modules()],
        "attn": [(id(c), dict(c.__dict__).get("_attn_implementation_internal")) for c in _configs(model)],
        "hooks": [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()],
        "dicts": [(name, sorted(k for k, v in m.__dict__.items() if not isinstance(v, (dict, list, set)))) for name, m in model.named_modules()],
    }


def _configs(model) -> list:
    from headint.integration.adapter import model_configs

    return model_configs(model)


def assert_same(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key in ("params", "buffers"):
            assert [x[:2] + x[3:] for x in a[key]] == [x[:2] + x[3:] for x in b[key]], f"{where}: {key} objects"
            assert all(torch.equal(x[2], y[2]) for x, y in zip(a[key], b[key])), f"{where}: {key} contents"
        else:
            assert a[key] == b[key], f"{where}: {key}"


def light_snapshot(model) -> tuple:
    """What the other thread checks between its calls (cheap): module objects, parameter objects and contents, config."""
    return ([(n, id(m)) for n, m in model.named_modules()], [(n, id(p), p.requires_grad, p.grad is None) for n, p in model.named_parameters()],
            model.config._attn_implementation, [m.training for m in model.modules()])


def equal_results(got, want) -> bool:
    return (torch.equal(torch.isnan(got.per_example), torch.isnan(want.per_example))
            and torch.equal(torch.nan_to_num(got.per_example), torch.nan_to_num(want.per_example)))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setting(request):
    model = tiny_gpt2(seed=3) if request.param == "gpt2" else tiny_llama(seed=3)
    model.lm_head.weight.requires_grad_(False)  # some weights require grad, some not: both must stay so
    model.train()  # a model in training mode (dropout 0): the scans' eval mode must not show
    work, other = scans(model), others(model)
    refs = {k: f() for k, f in work.items()}  # single-thread references (the model is probed here)
    other_refs = {k: f() for k, f in other.items()}
    for k, r in refs.items():  # scanned cells are finite (a per-position grid has NaN where nothing was scanned)
        scanned = r.per_example[~torch.isnan(r.per_example)]
        assert scanned.numel() and torch.isfinite(scanned).all(), k
    return model, work, refs, other, other_refs


def test_scans_meanwhile_plain_forwards_intervene_generate_and_another_scan(setting):
    model, work, refs, other, other_refs = setting
    before = snapshot(model)
    light = light_snapshot(model)
    for round_ in range(ROUNDS):
        got: dict = {}
        seen: list = []
        barrier = threading.Barrier(len(work) + 1)
        stop = threading.Event()

        def scanner(name):
            def run():
                barrier.wait()
                try:
                    got[name] = work[name]()
                finally:
                    stop.set() if len(got) == len(work) else None
            return run

        def caller():
            barrier.wait()
            i = 0
            while i < 8 or not stop.is_set():
                key = list(other)[i % len(other)]
                out = other[key]()
                seen.append((key, torch.equal(out, other_refs[key])))
                assert light_snapshot(model) == light, f"round {round_}: the model changed while scans ran"
                i += 1
                if i > 400:
                    break

        in_threads(*(scanner(name) for name in work), caller)
        for name, want in refs.items():
            assert equal_results(got[name], want), f"round {round_}: scan {name!r} differs from its single-thread result"
            assert got[name].settings.get("cost") == want.settings.get("cost")
        wrong = [k for k, ok in seen if not ok]
        assert not wrong, f"round {round_}: {len(wrong)} of {len(seen)} of the other thread's outputs differ: {wrong[:5]}"
        assert {k for k, _ in seen} == set(other)
    assert_same(snapshot(model), before, "after the rounds")
    assert session.open_sessions() == []
    # the shortcuts really ran in these scans
    heads, positions = refs["heads"].settings, refs["positions"].settings
    assert heads["final_block"] == "final block for the last query only" and heads["clean_attention"]
    assert heads["cost"]["replayed_projection_rows"] > 0 and heads["cost"]["last_query_rows"] > 0
    assert positions["position_reuse"] and positions["group_positions"] == 2
    assert positions["metric_logits"] == "last position, form single, columns 2 of 50", positions["metric_logits"]


class _RaisesOnThirdChunk(LogitDiff):
    """LogitDiff whose variant runs raise from the third chunk on (base values are computed first)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, logits, batch, clean_logits=None):
        with self.lock:
            self.calls += 1
            n = self.calls
        if n > 2 + 2:  # the clean and corrupt base values, then two chunks
            raise KeyError("metric failed on the third chunk")
        return super().__call__(logits, batch, clean_logits)


def test_scan_that_raises_midway_leaves_the_model_as_it_was(setting):
    model, work, refs, other, other_refs = setting
    before = snapshot(model)
    light = light_snapshot(model)
    batch = make_batch(3, 7, seed=41, pad="left", lengths=[7, 6, 5])
    for round_ in range(ROUNDS):
        barrier = threading.Barrier(2)
        done = threading.Event()
        raised: list = []
        seen: list = []

        def failing():
            barrier.wait()
            try:
                headint.scan(model, batch, _RaisesOnThirdChunk(), corrupt=corrupt_of(batch), method="patch", batch_size=3,
                             progress=False, backend=BACKEND)
            except KeyError as e:
                raised.append(e)
            finally:
                done.set()

        def caller():
            barrier.wait()
            i = 0
            while i < 4 or not done.is_set():
                key = list(other)[i % len(other)]
                seen.append((key, torch.equal(other[key](), other_refs[key])))
                assert light_snapshot(model) == light
                i += 1
                if i > 400:
                    break

        in_threads(failing, caller)
        assert len(raised) == 1 and "third chunk" in str(raised[0]), f"round {round_}"
        assert all(ok for _, ok in seen), f"round {round_}: {[k for k, ok in seen if not ok]}"
        assert_same(snapshot(model), before, f"after the failed scan of round {round_}")
    assert session.open_sessions() == []
    # and the model still scans exactly as before
    assert equal_results(work["heads"](), refs["heads"])
    for key, f in other.items():
        assert torch.equal(f(), other_refs[key]), key


def test_first_scan_of_a_fresh_model_probes_it_invisibly():
    """The first scan of a model probes it (two small forwards) in a replica: plain forwards of
    another thread meanwhile are their references bit for bit."""
    model = tiny_llama(seed=9).eval()
    with torch.no_grad():
        ref = model(input_ids=IDS).logits
    before = snapshot(model)
    started, done = threading.Event(), threading.Event()
    seen: list = []

    def plain():
        started.set()
        while not done.is_set() or len(seen) < 4:
            with torch.no_grad():
                seen.append(torch.equal(model(input_ids=IDS).logits, ref))

    t = threading.Thread(target=plain)
    t.start()
    try:
        assert started.wait(60)
        result = headint.scan(model, make_batch(2, 5, seed=3), "logit_diff", method="zero", progress=False, backend=BACKEND)
    finally:
        done.set()
        t.join(120)
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} plain forwards differ"
    assert torch.isfinite(result.per_example).all()
    assert_same(snapshot(model), before, "after the first scan")


def test_probe_while_another_thread_has_the_model_switched():
    """The probe's reference run uses the model's own attention even while another thread's
    ``intervene`` block has the model's config switched to headint's; the sites it finds are the
    model's own modules."""
    from headint.integration.structure import probe

    model = tiny_gpt2(seed=10).eval()
    with block_held_elsewhere(model, [Ablate(layer=0, head=0)], BACKEND):
        assert model.config._attn_implementation == "headint"
        st = probe(model)
    assert st.supported, st.problems
    ids = {id(m) for m in model.modules()}
    assert st.sites and set(st.sites) <= ids
    assert sorted(s.layer for s in st.sites.values()) == [0, 1, 2]
    assert session.open_sessions() == []
