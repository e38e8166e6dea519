"""``headint scan`` on a tiny GPT-2 checkpoint saved to disk and a JSONL prompt file."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from headint.cli import build_parser, main
from scan_oracles import all_head_pairs, corrupt_of, make_batch, oracle_attribution, oracle_baseline, oracle_scan, tiny_gpt2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
L, H = 3, 4
SCAN_OPTIONS = ["--prompts", "--corrupt", "--metric", "--method", "--direction", "--per-position", "--pairs", "--layers",
                "--heads", "--normalize", "--batch-size", "--backend", "--checkpoint", "--top", "--no-progress", "--out"]


def _write_jsonl(path, batch, with_answers=True):
    with open(path, "w") as f:
        for n in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][n][batch["attention_mask"][n] != 0].tolist()
            row = {"input_ids": ids}
            if with_answers:
                row.update(target=int(batch["target"][n]), contrast=int(batch["contrast"][n]))
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_gpt2()
    model.save_pretrained(root / "model")
    clean = make_batch(3, 6, seed=1, pad="left", lengths=[6, 4, 5])
    corrupt = corrupt_of(clean, seed=2)
    _write_jsonl(root / "prompts.jsonl", clean)
    _write_jsonl(root / "corrupt.jsonl", corrupt, with_answers=False)  # answers come from --prompts
    return root, model, clean, corrupt


def _run(setup, out, *extra):
    root = setup[0]
    args = ["scan", str(root / "model"), "--prompts", str(root / "prompts.jsonl"), "--out", str(root / out),
            "--no-progress", "--backend", "reference", *extra]
    assert main(args) == 0
    return root / out


def _check_outputs(out, columns):
    frame = pd.read_csv(out / "scan.csv")
    # the tidy columns, then the paired effect columns scans add
    assert list(frame.columns) == columns + ["n", "effect", "effect_stderr"]
    png = (out / "heatmap.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1000
    settings = json.loads((out / "settings.json").read_text())
    return frame, settings


def _grid(frame):
    return torch.tensor(frame.sort_values(["layer", "head"])["value"].to_numpy(), dtype=torch.float32).view(L, H)


def test_zero_scan_default(setup, capsys):
    out = _run(setup, "zero")
    frame, settings = _check_outputs(out, ["layer", "head", "value", "stderr"])
    assert len(frame) == L * H
    _, model, clean, _ = setup
    expected = oracle_scan(model, clean, "logit_diff", method="zero")
    torch.testing.assert_close(_grid(frame), expected.double().mean(-1).float(), atol=1e-5, rtol=1e-5)
    sd = expected.double().std(-1) / 3 ** 0.5
    torch.testing.assert_close(torch.tensor(frame.sort_values(["layer", "head"])["stderr"].to_numpy()).view(L, H), sd,
                               atol=1e-5, rtol=1e-4)
    assert settings["method"] == "zero" and settings["normalized"] is False
    assert settings["model_dir"].endswith("model") and settings["corrupt"] is None
    assert settings["cost"]["layer_forwards"] > 0
    printed = capsys.readouterr().out
    assert "scan.csv" in printed and "heatmap.png" in printed and "layer" in printed


def test_patch_normalized(setup):
    out = _run(setup, "patch", "--corrupt", str(setup[0] / "corrupt.jsonl"), "--method", "patch", "--normalize")
    frame, settings = _check_outputs(out, ["layer", "head", "value", "stderr"])
    _, model, clean, corrupt = setup
    expected = oracle_scan(model, clean, "logit_diff", method="patch", corrupt=corrupt, direction="denoising").double()
    c = float(oracle_baseline(model, clean, "logit_diff").double().mean())
    x = float(oracle_baseline(model, corrupt, "logit_diff").double().mean())
    norm = (expected.mean(-1) - x) / (c - x)
    torch.testing.assert_close(_grid(frame).double(), norm, atol=1e-4, rtol=1e-4)
    assert settings["normalized"] is True
    assert settings["clean_baseline"] == 1.0 and settings["corrupt_baseline"] == 0.0
    assert settings["normalization"]["clean_baseline"] == pytest.approx(c, abs=1e-5)
    assert settings["normalization"]["corrupt_baseline"] == pytest.approx(x, abs=1e-5)
    assert settings["method"] == "patch" and settings["direction"] == "denoising"


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_attribution(setup, direction):
    out = _run(setup, f"attr-{direction}", "--corrupt", str(setup[0] / "corrupt.jsonl"), "--method", "attribution",
               "--direction", direction)
    frame, settings = _check_outputs(out, ["layer", "head", "value", "stderr"])
    _, model, clean, corrupt = setup
    base, source = (corrupt, clean) if direction == "denoising" else (clean, corrupt)
    values, est = oracle_attribution(model, base, source, "logit_diff", clean=clean)
    expected = (values[None, None] + est).double().mean(-1).float()
    torch.testing.assert_close(_grid(frame), expected, atol=1e-5, rtol=1e-4)
    assert settings["kind"] == "attribution" and settings["method"] == "patch" and settings["direction"] == direction


def test_attribution_mask(setup):
    out = _run(setup, "attr-mask", "--method", "attribution-mask", "--metric", "logprob")
    frame, settings = _check_outputs(out, ["layer", "head", "value", "stderr"])
    _, model, clean, _ = setup
    values, est = oracle_attribution(model, clean, None, "logprob")
    torch.testing.assert_close(_grid(frame), (values[None, None] + est).double().mean(-1).float(), atol=1e-5, rtol=1e-4)
    assert settings["method"] == "mask"


def test_pairs(setup):
    out = _run(setup, "pairs", "--pairs", "--method", "mean", "--batch-size", "40")
    frame, settings = _check_outputs(out, ["head_set", "value", "stderr"])
    pairs = all_head_pairs(L, H)
    assert list(frame["head_set"]) == [f"L{a[0]}H{a[1]}+L{b[0]}H{b[1]}" for a, b in pairs]
    _, model, clean, _ = setup
    expected = oracle_scan(model, clean, "logit_diff", method="mean", head_sets=pairs).double().mean(-1)
    torch.testing.assert_close(torch.tensor(frame["value"].to_numpy()), expected, atol=1e-5, rtol=1e-5)
    assert settings["batch_rows"] == 40


def test_pairs_restricted_layers_heads(setup):
    out = _run(setup, "pairs-sub", "--pairs", "--layers", "0,2", "--heads", "1,3")
    frame, _ = _check_outputs(out, ["head_set", "value", "stderr"])
    assert list(frame["head_set"]) == ["L0H1+L0H3", "L0H1+L2H1", "L0H1+L2H3", "L0H3+L2H1", "L0H3+L2H3", "L2H1+L2H3"]


def test_per_position_layers_heads_metric(setup):
    out = _run(setup, "pos", "--per-position", "--layers", "1", "--heads", "0,2", "--metric", "kl", "--method", "resample")
    frame, settings = _check_outputs(out, ["layer", "head", "position", "value", "stderr"])
    assert len(frame) == L * H * 6
    _, model, clean, _ = setup
    expected = oracle_scan(model, clean, "kl", method="resample", per_position=True, layers=[1], heads=[0, 2]).double().mean(-1)
    got = torch.tensor(frame.sort_values(["layer", "head", "position"])["value"].to_numpy()).view(L, H, 6)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert settings["per_position"] is True and settings["layers"] == [1] and settings["heads"] == [0, 2]


def test_checkpoint_option(setup):
    ckpt = setup[0] / "ck.pt"
    out = _run(setup, "ck", "--checkpoint", str(ckpt), "--batch-size", "5")
    assert ckpt.exists()
    first = pd.read_csv(out / "scan.csv")
    out2 = _run(setup, "ck2", "--checkpoint", str(ckpt), "--batch-size", "5")
    pd.testing.assert_frame_equal(first, pd.read_csv(out2 / "scan.csv"))


def test_unusable_checkpoint_is_one_line_exit_2(setup, capsys):
    bad = setup[0] / "old-format.ckpt"
    bad.write_bytes(b"not a folder")
    root = setup[0]
    rc = main(["scan", str(root / "model"), "--prompts", str(root / "prompts.jsonl"), "--out", str(root / "bad-ck"),
               "--no-progress", "--backend", "reference", "--checkpoint", str(bad)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("headint scan: checkpoint ") and str(bad) in err[0] and "start over" in err[0]


def test_bad_batch_size_is_one_line_exit_2(setup, capsys):
    root = setup[0]
    rc = main(["scan", str(root / "model"), "--prompts", str(root / "prompts.jsonl"), "--out", str(root / "bad-bs"),
               "--batch-size", "lots"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["headint scan: --batch-size must be a positive integer or 'auto', got 'lots'"]


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"input_ids": [1, 2, 3], "target": 1, "contrast": 2}\n')
    rc = main(["scan", str(tmp_path), "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "config.json" in capsys.readouterr().err


def test_bad_choice_exits(setup):
    with pytest.raises(SystemExit) as e:
        main(["scan", str(setup[0] / "model"), "--prompts", "x", "--out", "y", "--method", "knockout"])
    assert e.value.code == 2


def test_help_subprocess():
    top = subprocess.run([sys.executable, "-m", "headint", "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0, top.stderr
    assert "usage: headint" in top.stdout
    for word in ("scan", "demo", "--help"):
        assert word in top.stdout, word


def test_scan_help_mentions_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["scan", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in SCAN_OPTIONS:
        assert opt in text, opt
    # and every option the parser knows about, for both subcommands
    for name in ("scan", "demo"):
        sub = build_parser()._subparsers._group_actions[0].choices[name]
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        for action in sub._actions:
            for opt in action.option_strings:
                assert opt in text, (name, opt)
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    text = capsys.readouterr().out
    for choice in ("zero", "mean", "resample", "patch", "attribution", "attribution-mask", "logit_diff", "logprob", "prob",
                   "kl", "loss", "denoising", "noising"):
        assert choice in text, choice
