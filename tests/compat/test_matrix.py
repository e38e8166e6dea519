"""The compatibility matrix script: a fast subset in the default suite, the full walk marked slow."""

from __future__ import annotations

import pytest

from _compat import matrix

# model type -> expected status: decoder-only (GPT-2, Llama), encoder-only (ModernBERT, whose scan
# needs the block attributes replayed), hybrid (LFM2), encoder-decoder (BART), a model without
# `_supports_attention_backend` that calls the registry (StableLM), refused ones (DiffLlama,
# BitNet's sub-norm, T5's position bias passed as a keyword).
SUBSET = {
    "gpt2": "supported", "llama": "supported", "modernbert": "supported", "lfm2": "supported", "bart": "supported",
    "stablelm": "supported", "diffllama": "refused", "bitnet": "refused", "t5": "refused",
}


@pytest.fixture(scope="module")
def cm():
    return matrix()


@pytest.mark.parametrize("model_type", sorted(SUBSET))
def test_subset_matches_oracle_or_is_refused(cm, model_type):
    classes = dict(cm.candidate_types())
    assert cm.uses_registry(model_type, classes[model_type])
    row = cm.check_model(model_type, classes[model_type])
    assert row.status == SUBSET[model_type], (row.status, row.reason, row.checks)
    if row.status == "supported":
        ran = {k: v for k, v in row.checks.items() if not v.startswith("n/a")}
        assert all(v.startswith("ok") for v in ran.values()), ran
        # every intervention kind actually ran against the oracle
        for k in ("none", "zero", "mean", "patch", "scale_output", "scale_scores", "knockout"):
            assert row.checks[k].startswith("ok"), (k, row.checks[k])
        assert row.checks["scan"].startswith("ok")  # BART: over its decoder, with decoder_input_ids
        assert row.checks["scan_positions"].startswith("ok")
        if model_type in ("gpt2", "llama", "lfm2", "stablelm"):
            assert row.checks["generate"].startswith("ok")
            assert row.checks["generate_static"].startswith("ok")  # static KV cache, absolute positions
        if model_type == "bart":
            assert row.checks["other_stacks"].startswith("ok")  # encoder.self and decoder.cross
            assert row.checks["cross_positions"].startswith("ok")  # decoder queries, encoder keys
    else:
        assert "cannot intervene" in row.reason and len(row.reason) > 60


def test_oracle_detects_a_wrong_intervention(cm, monkeypatch):
    """The matrix can fail: an Ablate that silently edits another head is reported as wrong."""
    import headint

    real = headint.Ablate.lower

    def off_by_one(self, call):
        object.__setattr__(self, "head", (self.head + 1) % call.shape.n_heads)
        real(self, call)

    monkeypatch.setattr(headint.Ablate, "lower", off_by_one)
    row = cm.check_model("llama", "LlamaForCausalLM")
    assert row.status == "wrong"
    assert row.checks["zero"].startswith("WRONG")


def _rows_file(tmp_path, statuses):
    import json

    rows = [{"model_type": f"type{i}", "cls": f"C{i}", "status": s, "reason": "r", "checks": {}, "seconds": 0.0}
            for i, s in enumerate(statuses)]
    path = tmp_path / f"rows-{'-'.join(statuses)}.json"
    path.write_text(json.dumps(rows))
    return path


def test_render_counts_and_exit_status(cm, tmp_path):
    rows = [cm.Row("a", "A", "supported"), cm.Row("b", "B", "refused", "because"), cm.Row("c", "C", "crash", "boom")]
    text = cm.render(rows, "x")
    assert "supported 1, refused 1, skipped 0, wrong 0, crash 1 (of 3)" in text
    assert "| b | B | refused | because |" in text
    # the exit status: non-zero exactly when a row is wrong or crashed (no model is checked: --only
    # names none, the rows come from --reuse)
    for statuses, want in ((["supported", "refused", "skipped"], 0), (["supported", "wrong"], 1), (["crash"], 1)):
        out = tmp_path / "m.md"
        assert cm.main(["--only", "no-such-type", "--reuse", str(_rows_file(tmp_path, statuses)), "--out", str(out)]) == want, statuses
        assert f"(of {len(statuses)})" in out.read_text()


def test_script_process_exits_non_zero_on_a_crash_row(tmp_path):
    """What CI sees: the process's exit status, not only main()'s return value."""
    import subprocess
    import sys

    from _compat import SCRIPT

    rows = _rows_file(tmp_path, ["supported", "crash"])
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "no-such-type", "--reuse", str(rows),
                           "--out", str(tmp_path / "m.md")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    assert "crash 1 (of 2)" in (tmp_path / "m.md").read_text()


@pytest.mark.slow
def test_full_walk_has_no_wrong_or_crash(cm, tmp_path):
    out = tmp_path / "compatibility.md"
    assert cm.main(["--out", str(out)]) == 0
    assert "wrong 0, crash 0" in out.read_text()


def test_recheck_some_types_reusing_a_previous_walk(cm, tmp_path):
    prev = tmp_path / "prev.json"
    prev.write_text('[{"model_type": "zzz", "cls": "Z", "status": "refused", "reason": "old reason", "checks": {}, "seconds": 0.0},'
                    ' {"model_type": "gpt2", "cls": "GPT2LMHeadModel", "status": "crash", "reason": "stale", "checks": {}, "seconds": 0.0}]')
    out = tmp_path / "m.md"
    assert cm.main(["--only", "gpt2", "--reuse", str(prev), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| gpt2 | GPT2LMHeadModel | supported |" in text and "stale" not in text
    assert "| zzz | Z | refused | old reason |" in text


# ------------------------------------------------------------------------------------------------
# the vision-language section: scans with pixels


def test_vlm_row_scans_with_pixels_against_the_oracle(cm):
    row = cm.check_vlm("llava", cm.VLM_TYPES["llava"][0])
    assert row.section == "vlm" and row.status == "supported", (row.status, row.reason, row.checks)
    for k in ("none", "pixels", "scan", "scan_patch"):
        assert row.checks[k].startswith("ok"), (k, row.checks[k])
    assert "pixel_values" in row.reason


def test_vlm_row_is_wrong_when_a_scan_drops_the_pixels(cm, monkeypatch):
    """Issue 22's bug put back (the scan's forward no longer gets ``pixel_values``): the row is wrong."""
    from headint.scans.inputs import InputLayout

    real = InputLayout.takes
    monkeypatch.setattr(InputLayout, "takes", lambda self, key: key != "pixel_values" and real(self, key))
    row = cm.check_vlm("llava", cm.VLM_TYPES["llava"][0])
    assert row.status == "wrong", (row.status, row.checks)
    assert row.checks["scan"].startswith("WRONG") and row.checks["scan_patch"].startswith("WRONG")


def test_vlm_row_refused_names_the_input(cm):
    """Qwen2-VL takes every image's patches flattened into one tensor: refused, naming it."""
    row = cm.check_vlm("qwen2_vl", cm.VLM_TYPES["qwen2_vl"][0])
    assert row.status == "refused", (row.status, row.checks)
    assert "pixel_values" in row.reason and "[32, 384]" in row.reason


def test_vlm_section_alone_keeps_the_other_rows(cm, tmp_path):
    """``--section vlm`` checks only VLMs; the text rows of a previous walk stand as they were."""
    prev = _rows_file(tmp_path, ["refused"])
    out, js = tmp_path / "m.md", tmp_path / "m.json"
    assert cm.main(["--section", "vlm", "--only", "llava", "--reuse", str(prev), "--out", str(out), "--json", str(js)]) == 0
    text = out.read_text()
    assert "supported 0, refused 1, skipped 0, wrong 0, crash 0 (of 1)" in text  # the text section, from --reuse
    assert "## Vision-language models: scans with pixels" in text
    assert "| llava | LlavaForConditionalGeneration | supported | ok" in text
    import json

    assert [(r["section"], r["model_type"]) for r in json.loads(js.read_text())] == [("lm", "type0"), ("vlm", "llava")]
