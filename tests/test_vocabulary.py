"""One typed home per vocabulary (``headint.vocabulary``): the library, the CLI and the metrics
read it, no file spells a copy of it, and a metric carries its own direction (never inferred
from its name)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest
import torch

import headint
from headint import vocabulary as vocab
from headint.metrics import CallableMetric, Metric, as_metric
from headint.scans.metric_logits import LastPositionOf
from scan_oracles import make_batch

PACKAGE = Path(headint.__file__).resolve().parent
VOCABULARIES = {
    "HeadTensor": vocab.HEAD_TENSORS, "Method": vocab.METHODS, "Direction": vocab.DIRECTIONS, "Target": vocab.TARGETS, "Effect": vocab.EFFECTS,
    "AttributionMethod": vocab.ATTRIBUTION_METHODS, "Ablation": vocab.ABLATIONS, "GateKind": vocab.GATE_KINDS,
    "PruneOrder": vocab.PRUNE_ORDERS, "MetricName": vocab.METRIC_NAMES, "MetricPosition": vocab.METRIC_POSITIONS,
}


@pytest.mark.parametrize("alias", sorted(VOCABULARIES))
def test_tuples_are_derived_from_the_literals(alias):
    assert VOCABULARIES[alias] == get_args(getattr(vocab, alias))
    assert len(set(VOCABULARIES[alias])) == len(VOCABULARIES[alias])


def test_metric_names_are_the_builtin_classes_names():
    from headint.metrics import _REGISTRY

    assert tuple(_REGISTRY) == vocab.METRIC_NAMES
    for name, cls in _REGISTRY.items():
        assert cls.name == name and as_metric(name).name == name
        assert isinstance(cls.maximize, bool), f"built-in metric {name} carries no direction"


def _string_collections(tree: ast.AST):
    """Every tuple/list/set literal of >= 2 string constants, and the string keys of every dict
    literal but documentation tables (all values strings, e.g. ``activations.LAYOUTS``; checked below)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            elts = node.elts
        elif isinstance(node, ast.Dict):
            if all(isinstance(v, ast.Constant) and isinstance(v.value, str) for v in node.values):
                continue
            elts = [k for k in node.keys if k is not None]
        else:
            continue
        if len(elts) >= 2 and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elts):
            yield node.lineno, {e.value for e in elts}


def test_no_file_spells_a_copy_of_a_vocabulary():
    """A literal collection equal to a vocabulary (e.g. a name-keyed direction table of the
    metrics, argparse choices typed by hand) is a copy that will drift."""
    copies = []
    for f in sorted(PACKAGE.rglob("*.py")):
        if f.name == "vocabulary.py":
            continue
        for line, words in _string_collections(ast.parse(f.read_text())):
            for alias, words_of in VOCABULARIES.items():
                if len(words_of) >= 2 and words == set(words_of):
                    copies.append(f"{f.relative_to(PACKAGE.parent)}:{line} copies {alias} {sorted(words)}")
    assert not copies, copies


def test_documentation_tables_cover_their_vocabulary():
    from headint.activations import LAYOUTS, RECORDABLE

    assert tuple(LAYOUTS) == RECORDABLE == vocab.HEAD_TENSORS


def test_the_copy_check_can_fail():
    tree = ast.parse("CHOICES = ('zero', 'mean', 'resample', 'patch')\nT = {'logit_diff': 1, 'logprob': 1, 'prob': 1, 'kl': 0, 'loss': 0}")
    found = [w for _, w in _string_collections(tree)]
    assert set(vocab.METHODS) in found and set(vocab.METRIC_NAMES) in found


def test_cli_choices_come_from_the_library():
    from headint.cli import ATTRIBUTION_CHOICES, build_parser

    parser = build_parser()
    scan_parser = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("scan"))
    choices = {a.dest: tuple(a.choices) for a in scan_parser._actions if a.choices}
    assert choices["metric"] == vocab.METRIC_NAMES
    assert choices["direction"] == vocab.DIRECTIONS
    assert choices["method"] == vocab.METHODS + tuple(ATTRIBUTION_CHOICES)
    assert set(ATTRIBUTION_CHOICES.values()) == set(vocab.ATTRIBUTION_METHODS)


def test_every_word_is_accepted_and_others_refused(gpt2):
    batch = make_batch(2, 5, seed=1)
    with pytest.raises(ValueError, match=r"method must be one of \('zero', 'mean', 'resample', 'patch'\), got 'Zero'"):
        headint.scan(gpt2, batch, "logit_diff", method="Zero", progress=False)
    with pytest.raises(ValueError, match="direction must be one of"):
        headint.attribution_scan(gpt2, batch, batch, "logit_diff", direction="forward")
    with pytest.raises(ValueError, match=r"learn_gates: ablation must be one of \('zero', 'mean'\)"):
        headint.learn_gates(gpt2, batch, "logit_diff", ablation="resample", steps=1, progress=False)
    with pytest.raises(ValueError, match="kind must be one of"):
        headint.learn_gates(gpt2, batch, "logit_diff", kind="relu", steps=1, progress=False)
    with pytest.raises(ValueError, match="position must be one of"):
        CallableMetric(lambda x: x, position="first")


# ------------------------------------------------------------------------------------------ directions


def test_a_function_named_loss_has_no_direction(gpt2):
    """A user's callable named ``loss`` (or ``kl``) is not minimised because of its name."""
    batch = make_batch(3, 5, seed=2)

    def loss(logits):
        return logits[:, -1, 0]

    m = as_metric(loss)
    assert m.name == "loss" and m.maximize is None
    with pytest.raises(ValueError, match=r"metric 'loss' \(CallableMetric\) carries no direction; pass maximize="):
        headint.learn_gates(gpt2, batch, loss, steps=1, progress=False)
    with pytest.raises(ValueError, match="carries no direction"):
        headint.prune_curve(gpt2, batch, CallableMetric(loss, name="kl"), order="exact", max_steps=1, progress=False)
    # given, it is used
    g = headint.learn_gates(gpt2, batch, loss, maximize=True, steps=1, progress=False)
    assert g.settings["maximize"] is True
    g = headint.learn_gates(gpt2, batch, CallableMetric(loss, maximize=False), steps=1, progress=False)
    assert g.settings["maximize"] is False


def test_builtin_metrics_carry_their_direction(gpt2):
    batch = make_batch(3, 5, seed=3)
    expect = {"logit_diff": True, "logprob": True, "prob": True, "kl": False, "loss": False}
    assert set(expect) == set(vocab.METRIC_NAMES)
    for name, up in expect.items():
        assert as_metric(name).maximize is up
    assert headint.learn_gates(gpt2, batch, "loss", steps=1, progress=False).settings["maximize"] is False
    assert headint.learn_gates(gpt2, batch, "logit_diff", steps=1, progress=False).settings["maximize"] is True
    # an explicit maximize overrides the metric's own (e.g. to find the heads whose removal hurts most)
    assert headint.learn_gates(gpt2, batch, "loss", maximize=True, steps=1, progress=False).settings["maximize"] is True


def test_direction_travels_with_wrappers_and_subclasses():
    inner = CallableMetric(lambda logits: logits[:, :, 0].mean(1), maximize=False)
    assert LastPositionOf(inner).maximize is False

    class Accuracy(Metric):
        name = "acc"
        maximize = True

        def __call__(self, logits, batch, clean_logits=None):
            return torch.zeros(logits.shape[0])

    from headint.scans.masking import metric_direction

    assert metric_direction(Accuracy(), None, "x") is True
    with pytest.raises(TypeError, match="maximize must be True, False or None"):
        CallableMetric(lambda x: x, maximize="up")
