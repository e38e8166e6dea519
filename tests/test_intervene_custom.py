"""A user-defined intervention kind (the README's ``Steer``: a steering vector added to one head's
output) against independent hook oracles at the output projection's input (eager attention),
in ``intervene`` and in ``generate()``; how additive edits compose with the built-in kinds;
errors for objects that are not model-level interventions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import headint
from headint import Ablate, EdgeKnockout, Intervention, Scale, intervene

import tiny_models as tm
from test_intervene_generate import _compare, _generate, _prompt, hook_steering

README = Path(__file__).resolve().parents[1] / "README.md"
B, T = 3, 8
IDS = torch.randint(3, tm.VOCAB, (B, T), generator=torch.Generator().manual_seed(21))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with tm.one_thread():
        yield


def _readme_block(title: str) -> str:
    text = README.read_text()
    section = text[text.index(f"## {title}"):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


@pytest.fixture(scope="module")
def readme_ns():
    """The README's "Your own intervention" example, run as written (it defines ``Steer``)."""
    ns: dict = {}
    exec(compile(_readme_block("Your own intervention"), "README: Your own intervention", "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def Steer(readme_ns):
    return readme_ns["Steer"]


def test_readme_example_ran_and_steered(readme_ns):
    model, ids = readme_ns["model"], readme_ns["ids"]
    with torch.no_grad():
        plain = model(ids).logits
    steered = readme_ns["steered"]
    assert steered.shape == plain.shape
    # positions 4 and 5 are steered; earlier positions cannot see them
    torch.testing.assert_close(steered[:, :4], plain[:, :4], atol=1e-5, rtol=1e-5)
    assert (steered[:, 4:] - plain[:, 4:]).abs().max() > 1e-3


def _eager(name: str):
    tiny = tm.get(name)
    before = tiny.model.config._attn_implementation
    tiny.model.set_attn_implementation("eager")
    return tiny, before


@pytest.fixture(params=["gpt2", "llama", "bert"])
def eager_tiny(request):
    tiny, before = _eager(request.param)
    yield tiny
    tiny.model.set_attn_implementation(before)


def _vec(seed: int, d: int = 8) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _oracle(tiny, edits: dict, ids=IDS, mask=None):
    with tm.edit_heads(tiny, edits):
        return tm.logits(tiny.model, ids, mask)


def test_steer_matches_hook(eager_tiny, Steer):
    tiny = eager_tiny
    v0, v1 = _vec(1), _vec(2)

    def e0(z):
        z[:, [2, 5], 1] += v0
        return z

    def e1(z):
        z[:, :, 3] += v1
        return z

    want = _oracle(tiny, {0: e0, 1: e1})
    with intervene(tiny.model, [Steer(layer=0, head=1, vector=v0, positions=[2, 5]), Steer(layer=1, head=3, vector=v1)], backend="reference"):
        got = tm.logits(tiny.model, IDS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - tm.logits(tiny.model, IDS)).abs().max() > 1e-3  # not vacuous


def _add(z, pos, h, v):
    z[:, pos, h] += v


def _mul(z, pos, h, f):
    z[:, pos, h] *= f


@pytest.mark.parametrize("order", ["add_then_replace", "replace_then_add", "add_then_scale", "add_then_add", "scale_then_add"])
def test_additive_composition_in_order(eager_tiny, Steer, order):
    """A later replace overrides an earlier add; a later add adds on top; a later scale scales it."""
    tiny = eager_tiny
    v, w = _vec(3), _vec(4)
    steer_v = Steer(layer=1, head=2, vector=v, positions=[1, 6])
    steer_w = Steer(layer=1, head=2, vector=w, positions=[6, 7])
    if order == "add_then_replace":
        ivs = [steer_v, Ablate(layer=1, head=2, positions=[6])]
        steps = [lambda z: _add(z, [1], 2, v), lambda z: _mul(z, [6], 2, 0.0)]
    elif order == "replace_then_add":
        ivs = [Ablate(layer=1, head=2, positions=[1, 6]), steer_v]
        steps = [lambda z: _mul(z, [1, 6], 2, 0.0), lambda z: _add(z, [1, 6], 2, v)]
    elif order == "add_then_scale":
        ivs = [steer_v, Scale(layer=1, head=2, positions=[6, 7], factor=-0.5)]
        steps = [lambda z: _add(z, [1, 6], 2, v), lambda z: _mul(z, [6, 7], 2, -0.5)]
    elif order == "add_then_add":
        ivs = [steer_v, steer_w]
        steps = [lambda z: _add(z, [1, 6], 2, v), lambda z: _add(z, [6, 7], 2, w)]
    else:
        ivs = [Scale(layer=1, head=2, factor=3.0), steer_v]
        steps = [lambda z: _mul(z, list(range(T)), 2, 3.0), lambda z: _add(z, [1, 6], 2, v)]

    def edit(z):
        for step in steps:
            step(z)
        return z

    want = _oracle(tiny, {1: edit})
    with intervene(tiny.model, ivs, backend="reference"):
        got = tm.logits(tiny.model, IDS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_steer_per_row_equals_separate_runs(Steer):
    tiny = tm.get("llama")
    rows = [[Steer(layer=0, head=0, vector=_vec(5), positions=[3])], [], [Steer(layer=1, head=[1, 2], vector=_vec(6)), Ablate(layer=0, head=3)]]
    with intervene(tiny.model, rows, backend="reference"):
        got = tm.logits(tiny.model, IDS)
    for i, ivs in enumerate(rows):
        with intervene(tiny.model, ivs, backend="reference"):
            want = tm.logits(tiny.model, IDS[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], want, atol=1e-5, rtol=1e-5)


def test_steer_recorded_z_includes_the_vector(Steer):
    tiny = tm.get("gpt2")
    v = _vec(7)
    plain = headint.record(tiny.model, IDS, backend="reference")
    steered = headint.record(tiny.model, IDS, interventions=[Steer(layer=0, head=1, vector=v, positions=[0])], backend="reference")
    torch.testing.assert_close(steered["z", 0][:, 0, 1], plain["z", 0][:, 0, 1] + v)
    torch.testing.assert_close(steered["z", 0][:, 1:], plain["z", 0][:, 1:])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_steer_in_generate_matches_hooks(name, Steer):
    tiny = tm.get(name)
    v = _vec(8) * 3
    ids = _prompt()
    positions = [2, 6, 9]  # one in the prompt, two in generated tokens
    plain = _generate(tiny.model, ids)
    with hook_steering(tiny, [(1, [0], positions, lambda z: z + v)]):
        want = _generate(tiny.model, ids)
    with intervene(tiny.model, [Steer(layer=1, head=0, vector=v, positions=positions)], backend="reference"):
        got = _generate(tiny.model, ids)
    _compare(got, want)
    assert max(float((a - b).abs().max()) for a, b in zip(got.scores, plain.scores)) > 1e-3


def test_steer_validation_before_model_is_touched(Steer):
    tiny = tm.get("gpt2")
    impl = tiny.model.config._attn_implementation
    for bad, exc, pat in [
        (Steer(layer=0, head=0, vector=torch.zeros(7)), ValueError, r"Steer\.vector has shape \[7\]; expected \[8\]"),
        (Steer(layer=2, head=0, vector=torch.zeros(8)), ValueError, r"Steer: layer 2 out of range"),
        (Steer(layer=0, head=4, vector=torch.zeros(8)), ValueError, r"head 4 out of range"),
        (Steer(layer=0, head=0, vector=torch.zeros(8), positions=[-1]), ValueError, r"Steer\.positions"),
    ]:
        with pytest.raises(exc, match=pat):
            intervene(tiny.model, [bad])
        assert tiny.model.config._attn_implementation == impl


def test_add_output_checks_vector_shape():
    tiny = tm.get("gpt2")

    class BadSteer(Intervention):
        layer = 0

        def lower(self, call):
            call.add_output(call.select(0), torch.zeros(3, 5))

    with pytest.raises(ValueError, match=r"add_output vector has shape \[3, 5\]; expected a tensor broadcastable to \[Bs, 4, 8, 8\]"):
        with intervene(tiny.model, [BadSteer()], backend="reference"):
            tm.logits(tiny.model, IDS)
    assert tiny.model.config._attn_implementation != "headint"


def test_subclass_without_lower_is_refused_clearly():
    tiny = tm.get("gpt2")

    class NoLower(Intervention):
        layer = 1

    with pytest.raises(NotImplementedError, match=r"NoLower must implement lower\(call\)"):
        with intervene(tiny.model, [NoLower()], backend="reference"):
            tm.logits(tiny.model, IDS)


def test_edge_knockout_is_not_a_model_intervention():
    tiny = tm.get("gpt2")
    ko = EdgeKnockout(torch.ones(T, dtype=torch.bool), torch.ones(T, dtype=torch.bool))
    for ivs in (ko, [ko], [[ko]] * B):
        with pytest.raises(TypeError, match=r"EdgeKnockout is the op-level selector.*headint\.Knockout\(queries, keys, layer"):
            intervene(tiny.model, ivs)
    with pytest.raises(TypeError, match=r"interventions must be headint\.Intervention objects.*got str"):
        intervene(tiny.model, ["ablate"])
