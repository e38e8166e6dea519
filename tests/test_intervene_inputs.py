"""Intervention input errors and forms (issue #12), and record with a mask (issue #11).

- integer scalars (numpy, 0-dim tensors) accepted for layer / head / positions;
- a wrong-sized bool ``positions`` is reported as ``positions``;
- a recording shorter than the run is fine when every selected position is covered, refused
  naming the uncovered positions otherwise;
- ``ActivationCache.load`` of foreign / truncated files: a clear error naming the file;
- ``Scale.factor`` must be a finite real number;
- ``record(..., attention_mask=mask)`` stores the mask; left padding changes no recorded value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from headint import ActivationCache, Ablate, Knockout, Patch, PatchQKV, Scale, intervene, record

import tiny_models as tm
from test_intervene_safety import assert_pristine, snapshot

B, T = 3, 8
IDS = torch.randint(3, tm.VOCAB, (B, T), generator=torch.Generator().manual_seed(31))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with tm.one_thread():
        yield


def _logits(model, ivs, ids=IDS, mask=None):
    with intervene(model, ivs, backend="reference"):
        return tm.logits(model, ids, mask)


# ---------------------------------------------------------------------------------------------
# integer scalars


@pytest.mark.parametrize("form", ["numpy", "tensor"])
def test_integer_scalars_accepted(form):
    tiny = tm.get("llama")
    conv = (lambda x: np.int64(x)) if form == "numpy" else (lambda x: torch.tensor(x))
    arr = (lambda xs: np.array(xs)) if form == "numpy" else (lambda xs: torch.tensor(xs))
    cache = record(tiny.model, IDS.flip(0), what=("z", "k"), backend="reference")
    plain = [Ablate(layer=1, head=1, positions=[2, 5]), Scale(layer=0, head=2, positions=4, factor=0.5),
             Patch(layer=0, head=[0, 3], positions=[1], source=cache), PatchQKV(layer=1, head=1, which="k", positions=[3], source=cache),
             Knockout(queries=[6], keys=[0, 1], layer=1, head=0)]
    scalars = [Ablate(layer=conv(1), head=conv(1), positions=arr([2, 5])), Scale(layer=conv(0), head=conv(2), positions=conv(4), factor=0.5),
               Patch(layer=conv(0), head=[conv(0), conv(3)], positions=[conv(1)], source=cache),
               PatchQKV(layer=conv(1), head=conv(1), which="k", positions=arr([3]), source=cache),
               Knockout(queries=conv(6), keys=arr([0, 1]), layer=conv(1), head=conv(0))]
    want = _logits(tiny.model, plain)
    assert not torch.equal(want, tm.logits(tiny.model, IDS))
    assert torch.equal(_logits(tiny.model, scalars), want)
    assert torch.equal(_logits(tiny.model, [[*scalars]] * B), want)  # per-row too


@pytest.mark.parametrize("bad,pattern", [
    (dict(layer=0, head=1.0), r"query head must be an int, a list of ints or None; got 1\.0"),
    (dict(layer=0, head=torch.tensor(1.0)), r"head must be an int"),
    (dict(layer=0, head=np.bool_(True)), r"head must be an int"),
    (dict(layer=np.float64(0.0), head=0), r"Ablate\.layer must be an int .*got"),
    (dict(layer=torch.tensor([0]), head=0), r"Ablate\.layer must be an int"),
    (dict(layer=0, positions=[1.5]), r"Ablate\.positions must be non-negative ints .*1\.5"),
    (dict(layer=0, positions=torch.tensor([0.0, 1.0])), r"Ablate\.positions as a tensor must be bool .* or integer"),
    (dict(layer=0, positions=np.int64(-3)), r"Ablate\.positions must be non-negative ints .*-3"),
])
def test_non_integer_selectors_refused(bad, pattern):
    tiny = tm.get("gpt2")
    before = snapshot(tiny.model)
    with pytest.raises((TypeError, ValueError), match=pattern):
        intervene(tiny.model, [Ablate(**bad)])
    assert_pristine(tiny.model, before)


# ---------------------------------------------------------------------------------------------
# wrong-sized bool positions


@pytest.mark.parametrize("per_row", [False, True])
def test_bool_positions_with_wrong_batch_names_positions(per_row):
    tiny = tm.get("qwen2")
    before = snapshot(tiny.model)
    iv = Ablate(layer=0, head=0, positions=torch.ones(2, T, dtype=torch.bool))
    with pytest.raises(ValueError) as err:
        with intervene(tiny.model, [[iv]] * B if per_row else [iv], backend="reference"):
            tm.logits(tiny.model, IDS)
    msg = str(err.value)
    assert "Ablate.positions" in msg and "batch 2" in msg and "[2, 8]" in msg and "3 rows" in msg, msg
    assert "source" not in msg, msg
    assert_pristine(tiny.model, before)


def test_knockout_bool_selector_wrong_batch_names_it():
    tiny = tm.get("gpt2")
    with pytest.raises(ValueError, match=r"Knockout\.keys \(bool\) for layer 1 has batch 2"):
        _logits(tiny.model, [Knockout(queries=[5], keys=torch.ones(2, T, dtype=torch.bool), layer=1, head=0)])


# ---------------------------------------------------------------------------------------------
# recordings that cover only part of the run


def _z_edit(layer, head, positions, source_z):
    def edit(z):
        z[:, positions, head] = source_z[:, positions, head]
        return z
    return {layer: edit}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_patch_from_shorter_recording_at_covered_positions(name):
    tiny = tm.get(name)
    short = IDS[:, :3].flip(0)
    cache = record(tiny.model, short, backend="reference")  # 3 positions
    with tm.edit_heads(tiny, _z_edit(1, 2, [1], cache["z", 1])):
        want = tm.logits(tiny.model, IDS[:, :6])
    got = _logits(tiny.model, [Patch(layer=1, head=2, positions=[1], source=cache)], ids=IDS[:, :6])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, tm.logits(tiny.model, IDS[:, :6]), atol=1e-4)
    # a bool selector covering only recorded positions works as well
    sel = torch.tensor([False, True, False, False, False, False])
    torch.testing.assert_close(_logits(tiny.model, [Patch(layer=1, head=2, positions=sel, source=cache)], ids=IDS[:, :6]), got)


def test_shorter_recording_refused_naming_uncovered_positions():
    tiny = tm.get("gpt2")
    before = snapshot(tiny.model)
    cache = record(tiny.model, IDS[:, :3], what=("z", "v"), backend="reference")
    cases = [
        (Patch(layer=1, head=2, positions=[1, 4, 5], source=cache), r"Patch\.source \(shape \[3, 3, 4, 8\]\) covers 3 positions .*not covered: \[4, 5\]"),
        (Ablate(layer=0, head=0, kind="mean", value=cache, positions=[2, 3]), r"Ablate mean value .*covers 3 positions .*not covered: \[3\]"),
        (PatchQKV(layer=0, head=1, which="v", positions=[0, 7], source=cache), r"PatchQKV\.source .*covers 3 positions .*not covered: \[7\]"),
    ]
    for iv, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            _logits(tiny.model, [iv], ids=IDS[:, :6] if not isinstance(iv, PatchQKV) else IDS)
        assert_pristine(tiny.model, before)


def test_mean_value_shorter_than_run_at_covered_positions():
    tiny = tm.get("gpt2")
    mean = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(2))

    def edit(z):
        z[:, [0, 2], 1] = mean[[0, 2], 1]
        return z

    with tm.edit_heads(tiny, {0: edit}):
        want = tm.logits(tiny.model, IDS)
    got = _logits(tiny.model, [Ablate(layer=0, head=1, kind="mean", value=mean, positions=[0, 2])])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# ActivationCache.load


def test_load_foreign_safetensors_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match=r"ActivationCache\.load: .*weights\.safetensors was not written by ActivationCache\.save"):
        ActivationCache.load(path)
    save_file({"weight": torch.zeros(2, 2)}, str(path), metadata={"headint": "{}"})
    with pytest.raises(ValueError, match=r"weights\.safetensors holds a tensor named 'weight'; expected names '<what>\.<layer>'"):
        ActivationCache.load(path)


def test_load_truncated_and_garbage_files(tmp_path):
    tiny = tm.get("gpt2")
    good = tmp_path / "cache.safetensors"
    record(tiny.model, IDS, backend="reference").save(good)
    data = good.read_bytes()
    for name, content in [("truncated.safetensors", data[: len(data) // 2]), ("header-only.safetensors", data[:6]),
                          ("garbage.safetensors", b"not a safetensors file at all"), ("empty.safetensors", b"")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=rf"ActivationCache\.load: .*{name} is not a readable safetensors file"):
            ActivationCache.load(path)
    with pytest.raises(FileNotFoundError):
        ActivationCache.load(tmp_path / "missing.safetensors")
    assert ActivationCache.load(good).layers() == [0, 1]


# ---------------------------------------------------------------------------------------------
# Scale.factor


@pytest.mark.parametrize("factor,exc,pattern", [
    ("2", TypeError, r"Scale\.factor must be a real number .*got str '2'"),
    (None, TypeError, r"Scale\.factor must be a real number"),
    (True, TypeError, r"Scale\.factor must be a real number"),
    (1 + 2j, TypeError, r"Scale\.factor must be a real number"),
    (torch.tensor([2.0]), TypeError, r"Scale\.factor must be a real number"),
    (torch.tensor(2 + 0j), TypeError, r"Scale\.factor must be a real number"),
    (float("nan"), ValueError, r"Scale\.factor must be finite, got nan"),
    (np.float32("inf"), ValueError, r"Scale\.factor must be finite, got inf"),
])
@pytest.mark.parametrize("target", ["output", "scores"])
def test_scale_factor_must_be_real(factor, exc, pattern, target):
    tiny = tm.get("gpt2")
    before = snapshot(tiny.model)
    with pytest.raises(exc, match=pattern):
        intervene(tiny.model, [Scale(layer=0, head=1, factor=factor, target=target)])
    assert_pristine(tiny.model, before)


@pytest.mark.parametrize("target", ["output", "scores"])
def test_scale_factor_real_forms_agree(target):
    tiny = tm.get("llama")
    want = _logits(tiny.model, [Scale(layer=1, head=3, factor=2.0, target=target)])
    assert not torch.equal(want, tm.logits(tiny.model, IDS))
    for f in (2, np.float32(2.0), np.int64(2), torch.tensor(2.0), torch.tensor(2)):
        assert torch.equal(_logits(tiny.model, [Scale(layer=1, head=3, factor=f, target=target)]), want), repr(f)


# ---------------------------------------------------------------------------------------------
# record with a mask (issue #11)


def _left_padded(lengths, seed=3):
    ids = torch.randint(3, tm.VOCAB, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, max(lengths) - n:] = 1
    return torch.where(mask.bool(), ids, torch.zeros_like(ids)), mask


def test_record_stores_a_keyword_mask():
    tiny = tm.get("gpt2")
    ids, mask = _left_padded([8, 5, 3])
    by_kw = record(tiny.model, ids, attention_mask=mask, backend="reference")
    by_dict = record(tiny.model, {"input_ids": ids, "attention_mask": mask}, backend="reference")
    assert torch.equal(by_kw.attention_mask, mask)
    for l in range(tm.N_LAYERS):
        assert torch.equal(by_kw["z", l], by_dict["z", l])
        torch.testing.assert_close(by_kw.mean_z(l), by_dict.mean_z(l))
        # the mean over real tokens only: position 0 is real in row 0 alone
        torch.testing.assert_close(by_kw.mean_z(l)[0], by_kw["z", l][0, 0])
    with pytest.raises(TypeError, match="attention_mask was given both"):
        record(tiny.model, {"input_ids": ids, "attention_mask": mask}, attention_mask=mask)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_record_left_padding_changes_no_value(name):
    """A prompt recorded alone and left-padded beside a longer one: the same activations at its
    real positions (GPT-2's learned absolute positions need position ids from the mask)."""
    tiny = tm.get(name)
    ids, mask = _left_padded([8, 5])
    what = ("z", "q", "k", "v")
    alone = record(tiny.model, ids[1:, 3:], what=what, backend="reference")
    for padded in (record(tiny.model, ids, attention_mask=mask, what=what, backend="reference"),
                   record(tiny.model, {"input_ids": ids, "attention_mask": mask}, what=what, backend="reference")):
        for l in range(tm.N_LAYERS):
            torch.testing.assert_close(padded["z", l][1:, 3:], alone["z", l], atol=1e-5, rtol=1e-5)
            for w in ("q", "k", "v"):  # rotary q/k too: the real tokens keep positions 0..4
                torch.testing.assert_close(padded[w, l][1:, :, 3:], alone[w, l], atol=1e-5, rtol=1e-5)
    # explicit position ids from the caller are used as given
    explicit = record(tiny.model, ids, attention_mask=mask, position_ids=torch.arange(8).expand(2, 8), backend="reference")
    if name == "gpt2":
        assert not torch.allclose(explicit["z", 1][1:, 3:], alone["z", 1], atol=1e-3)
