"""Python API mistakes that once surfaced as raw torch errors or silent truncation (issue 20,
item 9), and labels that matplotlib's mathtext would parse (item 8): each is an error naming the
argument, or a plot that shows the text as given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import headint
from headint.results import ScanResult
from scan_oracles import tiny_gpt2

BAD_IDS = {
    "ids >= vocab": (lambda V: torch.full((2, 5), V), ValueError, r"\[0, 0\] = 50 is not a token id of this model \(expected 0 <= id < 50"),
    "negative ids": (lambda V: torch.full((2, 5), -1), ValueError, r"\[0, 0\] = -1 is not a token id"),
    "N = 0": (lambda V: torch.zeros(0, 5, dtype=torch.long), ValueError, r"has shape \[0, 5\]: no examples"),
    "T = 0": (lambda V: torch.zeros(2, 0, dtype=torch.long), ValueError, r"has shape \[2, 0\]: no tokens"),
    "float ids": (lambda V: torch.rand(2, 5), TypeError, r"must hold integer token ids, got a torch.float32 tensor"),
    "bool ids": (lambda V: torch.ones(2, 5, dtype=torch.bool), TypeError, r"must hold integer token ids"),
}


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2()


@pytest.mark.parametrize("case", list(BAD_IDS))
def test_bad_token_ids_name_the_argument(model, case):
    make, error, message = BAD_IDS[case]
    ids = make(model.config.vocab_size)
    with pytest.raises(error, match=r"inputs\['input_ids'\].*" + message):
        headint.scan(model, ids, "loss", progress=False, backend="reference")
    with pytest.raises(error, match=r"clean\['input_ids'\]"):
        headint.attribution_scan(model, ids, None, "loss", method="mask", backend="reference")
    good = torch.randint(0, model.config.vocab_size, (2, 5))
    if ids.shape == good.shape:  # the corrupt inputs are checked too, by their own name
        with pytest.raises(error, match=r"corrupt\['input_ids'\]"):
            headint.scan(model, good, "loss", corrupt=ids, method="patch", progress=False, backend="reference")
    with pytest.raises(error, match=r"record: input_ids"):
        headint.record(model, ids, what=("z",))


def test_answers_beyond_the_vocabulary(model):
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 5))
    batch = {"input_ids": ids, "target": torch.tensor([V + 3, 1]), "contrast": torch.tensor([1, 2])}
    with pytest.raises(ValueError, match=rf"inputs\['target'\]\[0, 0\] = {V + 3} is not a token id"):
        headint.scan(model, batch, "logit_diff", progress=False, backend="reference")
    batch = {"input_ids": ids, "target": torch.tensor([1, 1]), "contrast": torch.tensor([1.0, 2.0])}
    with pytest.raises(TypeError, match=r"inputs\['contrast'\] must hold integer token ids"):
        headint.scan(model, batch, "logit_diff", progress=False, backend="reference")


@pytest.mark.parametrize("positions,error,message", [
    ([1.5], TypeError, r"each of positions \(token positions\) must be an int .*got 1.5"),
    ([True], TypeError, r"each of positions \(token positions\) must be an int .*got True"),
    ([2**64], ValueError, r"positions: 18446744073709551616 out of range for inputs of length 5"),
    ([-1], ValueError, r"positions: -1 out of range"),
])
def test_scan_positions(model, positions, error, message):
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with pytest.raises(error, match=message):
        headint.scan(model, ids, "loss", per_position=True, positions=positions, progress=False, backend="reference")


def test_scan_positions_of_numpy_and_tensor_ints(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    a = headint.scan(model, ids, "loss", per_position=True, positions=[np.int64(1), torch.tensor(3)], layers=[np.int64(0)],
                     heads=[torch.tensor(0)], progress=False, backend="reference")
    assert a.settings["positions"] == [1, 3] and a.settings["layers"] == [0] and a.settings["heads"] == [0]
    b = headint.scan(model, ids, "loss", per_position=True, positions=[1, 3], layers=[0], heads=[0], progress=False,
                     backend="reference")
    torch.testing.assert_close(a.per_example, b.per_example, equal_nan=True)


@pytest.mark.parametrize("positions", [[2**64], [2**63]])
def test_intervention_positions_beyond_int64(model, positions):
    """Was ``ValueError: Overflow when unpacking long long`` from torch."""
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with pytest.raises(ValueError, match=rf"Ablate\.positions: position {positions[0]} is beyond any sequence"):
        with headint.intervene(model, [headint.Ablate(layer=0, head=0, positions=positions)]):
            model(ids)


# ------------------------------------------------------------------------ item 8: labels are user data


DOLLARS = ["$x^$", "a$b", "\\$", "$\\frac{1}{0}$", "$$"]


def _draw(fig, tmp_path, name):
    path = tmp_path / f"{name}.png"
    fig.savefig(path)  # mathtext would be parsed (and fail) when drawing
    assert path.stat().st_size > 0
    texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    return texts


def test_every_scan_plot_shows_dollar_signs_literally(tmp_path):
    from matplotlib.text import Text

    bad = "$x^$"
    per_pos = ScanResult(torch.randn(2, 2, 5, 4), ("layer", "head", "position"), metric_name=bad, clean_baseline=0.0)
    grid = ScanResult(torch.randn(2, 2, 4), metric_name=bad, clean_baseline=0.0)
    sets = ScanResult(torch.randn(2, 4), ("head_set",), labels=[[(0, 0)], [(0, 1)]], metric_name=bad, clean_baseline=0.0)
    figs = {
        "position": per_pos.heatmap(title=bad, tokens=DOLLARS),
        "grid": grid.heatmap(title=bad),
        "sets": sets.heatmap(title=bad),
        "pairs": ScanResult(torch.randn(1, 4), ("head_set",), labels=[[(0, 0), (0, 1)]], metric_name=bad,
                            clean_baseline=0.0).heatmap(title=bad, singles=grid),
        "pattern": headint.results.plots.pattern_image(torch.rand(5, 5), DOLLARS, title=bad),
    }
    for name, fig in figs.items():
        _draw(fig, tmp_path, name)
        for text in fig.findobj(Text):
            if "$" in text.get_text():
                assert not text._preprocess_math(text.get_text())[1], (name, text.get_text())  # not parsed as math
    html = per_pos.to_html(tmp_path / "r.html", title=bad, tokens=DOLLARS, patterns={(0, 0): torch.rand(5, 5)},
                           pattern_tokens=DOLLARS)
    assert html.stat().st_size > 0


def test_gate_prune_and_knockout_plots_show_dollar_signs_literally(tmp_path):
    import pandas as pd

    from headint.results.gates import GateResult
    from headint.results.knockout import KnockoutResult
    from headint.results.prune import PruneCurve

    bad = "$x^$"
    curve = pd.DataFrame({"step": [0, 1], "objective": [1.0, 0.5], "penalty": [0.1, 0.2], "open_heads": [4, 3]})
    gates = GateResult(kind="sigmoid", gates=torch.rand(2, 2), params=torch.randn(2, 2), p_open=torch.rand(2, 2),
                       threshold=0.5, curve=curve, metric_name=bad, intact=1.0, final=0.5)
    _draw(gates.heatmap(title=bad), tmp_path, "gates")
    _draw(gates.plot_curve(), tmp_path, "gate-curve")
    prune = PruneCurve(removed=[(0, 0)], per_example=torch.randn(2, 4), scores=[None], n_heads=4, metric_name=bad,
                       maximize=True, order="given")
    _draw(prune.plot(title=bad), tmp_path, "prune")
    ko = KnockoutResult(per_example=torch.randn(2, 3, 4), sources=DOLLARS[:3], window=1, per_head=False,
                        base_per_example=torch.randn(4), metric_name=bad)
    _draw(ko.heatmap(title=bad), tmp_path, "knockout")
