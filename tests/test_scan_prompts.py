"""The prompt loader (``headint.prompts.load_prompts``) and ``headint scan`` on text prompts.

Answers must be single tokens: ``" Johnathan"`` tokenizes to ``[" John", "athan"]``, and
reading only its first token made every cell of a logit-difference scan against ``" John"``
exactly 0.0 with exit code 0. The loader refuses such answers before any model runs, naming
the file, the line and every answer's tokenization; the CLI prints that one line and exits 2.

The tokenizer is a small byte-level BPE built here (no download) in which ``" John"`` and
``" Mary"`` are single tokens and ``" Johnathan"`` is ``" John"`` + ``"athan"``.
"""

from __future__ import annotations

import json

import pytest
import torch

from headint.cli import main
from headint.prompts import load_prompts
from scan_oracles import oracle_scan

MERGES = [("Ġ", "J"), ("ĠJ", "o"), ("ĠJo", "h"), ("ĠJoh", "n"), ("a", "t"), ("at", "h"), ("ath", "a"), ("atha", "n"),
          ("Ġ", "M"), ("ĠM", "a"), ("ĠMa", "r"), ("ĠMar", "y")]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="Ġ")


@pytest.fixture(scope="module")
def tokenizer():
    t = make_tokenizer()
    assert t.convert_ids_to_tokens(t(" Johnathan", add_special_tokens=False)["input_ids"]) == ["ĠJohn", "athan"]
    assert len(t(" John", add_special_tokens=False)["input_ids"]) == 1
    assert len(t(" Mary", add_special_tokens=False)["input_ids"]) == 1
    return t


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny GPT-2 whose vocabulary covers the tokenizer, saved with it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=len(tokenizer), n_positions=64,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    root = tmp_path_factory.mktemp("textmodel")
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root, model


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = [{"text": "When Mary and John went out, John gave it to", "target": " Mary", "contrast": " John"},
        {"text": "Then John and Mary", "target": " John", "contrast": " Mary"}]


def test_single_token_answers_load(tmp_path, tokenizer):
    batch = load_prompts(_write(tmp_path / "p.jsonl", GOOD), tokenizer)
    john, mary = (tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in (" John", " Mary"))
    assert batch["target"].tolist() == [mary, john] and batch["contrast"].tolist() == [john, mary]
    lengths = [len(tokenizer(r["text"])["input_ids"]) for r in GOOD]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"].shape == (2, max(lengths))


def test_multi_token_answer_refused_naming_file_line_and_tokens(tmp_path, tokenizer):
    rows = [GOOD[0], GOOD[1], {"text": "Then Johnathan and John", "target": " Johnathan", "contrast": " John"}]
    path = _write(tmp_path / "names.jsonl", rows)
    with pytest.raises(ValueError) as e:
        load_prompts(path, tokenizer)
    msg = str(e.value)
    assert f"{path}:3:" in msg
    assert "'ĠJohn', 'athan'" in msg and "' Johnathan'" in msg  # the target's tokenization
    assert "contrast ' John' -> ['ĠJohn']" in msg  # and the contrast's
    assert "single token" in msg


def test_multi_token_contrast_and_blank_lines(tmp_path, tokenizer):
    """Line numbers count blank lines; the contrast is checked too."""
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n\n" + json.dumps({"text": "x", "target": " John", "contrast": " Johnathan"}) + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:3: .*contrast ' Johnathan' -> \['ĠJohn', 'athan'\]"):
        load_prompts(path, tokenizer)


def test_other_prompt_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"p\.jsonl:2: has no 'contrast'"):
        load_prompts(_write(tmp_path / "p.jsonl", [GOOD[0], {"text": "a", "target": " John"}]), tokenizer)
    with pytest.raises(ValueError, match=r"q\.jsonl:1: .*tokenizes to nothing"):
        load_prompts(_write(tmp_path / "q.jsonl", [{"text": "a", "target": "", "contrast": " John"}]), tokenizer)
    with pytest.raises(ValueError, match=r"r\.jsonl:1: expected a JSON object"):
        load_prompts(_write(tmp_path / "r.jsonl", [[1, 2, 3]]), tokenizer)
    with pytest.raises(ValueError, match=r"s\.jsonl:1: target token id must be >= 0"):
        load_prompts(_write(tmp_path / "s.jsonl", [{"input_ids": [1, 2], "target": -1}]), None)
    with pytest.raises(TypeError, match=r"t\.jsonl:1: target must be a token id or a string"):
        load_prompts(_write(tmp_path / "t.jsonl", [{"input_ids": [1, 2], "target": [3, 4]}]), None)
    with pytest.raises(ValueError, match=r"u\.jsonl:1: target ' John' is text.*no tokenizer"):
        load_prompts(_write(tmp_path / "u.jsonl", [{"input_ids": [1, 2], "target": " John"}]), None)
    # token ids are single tokens by construction
    batch = load_prompts(_write(tmp_path / "v.jsonl", [{"input_ids": [1, 2, 3], "target": 5, "contrast": 6},
                                                        {"input_ids": [4], "target": 7, "contrast": 8}]), None)
    assert batch["target"].tolist() == [5, 7]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_cli_refuses_multi_token_answers_before_loading_the_model(tmp_path, model_dir, capsys, monkeypatch):
    root, _ = model_dir
    path = _write(tmp_path / "names.jsonl", [GOOD[0], {"text": "Then Johnathan and John", "target": " Johnathan",
                                                        "contrast": " John"}])
    import transformers

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded when the prompts are refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    rc = main(["scan", str(root), "--prompts", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("headint scan: ") and f"{path}:2:" in lines[0] and "'ĠJohn', 'athan'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_text_prompts_end_to_end(tmp_path, model_dir, tokenizer):
    """Text prompts of different lengths (left-padded) through the CLI equal the hook oracle."""
    root, model = model_dir
    path = _write(tmp_path / "p.jsonl", GOOD)
    out = tmp_path / "out"
    assert main(["scan", str(root), "--prompts", str(path), "--out", str(out), "--no-progress", "--backend", "reference"]) == 0
    import pandas as pd

    frame = pd.read_csv(out / "scan.csv").sort_values(["layer", "head"])
    batch = load_prompts(path, tokenizer)
    assert batch["attention_mask"].min() == 0  # the prompts really are padded
    expected = oracle_scan(model, batch, "logit_diff", method="zero").double().mean(-1).flatten()
    torch.testing.assert_close(torch.tensor(frame["value"].to_numpy()), expected, atol=1e-5, rtol=1e-5)
