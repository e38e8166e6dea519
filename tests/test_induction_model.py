"""The embedded ``induction-2l`` model, its synthetic task and the attention-pattern scores."""

from __future__ import annotations

import json

import pytest
import torch

from headint import models
from headint.tasks import induction as data
from headint.patterns import attention_patterns, induction_scores, previous_token_scores

PREV_CLEAR, IND_CLEAR = 0.4, 0.3  # "clear" previous-token / induction head
PREV_LOW, IND_LOW = 0.15, 0.1  # bystander: low on both


@pytest.fixture(scope="module")
def model():
    return models.load("induction-2l")


@pytest.fixture(scope="module")
def scores(model):
    tokens = data.repeated_random_tokens(32, 16, model.config.vocab_size, seed=11)
    return previous_token_scores(model, tokens), induction_scores(model, tokens)


# ---------------------------------------------------------------------------------------- loading


def test_load_returns_gpt2_in_eval_mode(model):
    from transformers import GPT2LMHeadModel

    assert isinstance(model, GPT2LMHeadModel)
    assert not model.training
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head) == (2, 4)
    assert cfg.vocab_size == data.DEFAULT_VOCAB and cfg.n_positions >= data.DEFAULT_SEQ_LEN
    assert "induction-2l" in models.available()
    path = models.model_dir("induction-2l")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert (path / "model.safetensors").stat().st_size < 5 * 2**20
    info = json.loads((path / "training.json").read_text())
    for key in ("seed", "steps", "final_loss", "copy_accuracy", "command"):
        assert key in info
    # saved with the default attention implementation: loads like any checkpoint
    assert "attn_implementation" not in (path / "config.json").read_text()


def test_load_forwards_kwargs():
    m = models.load("induction-2l", attn_implementation="eager", dtype=torch.float64)
    assert m.config._attn_implementation == "eager"
    assert next(m.parameters()).dtype == torch.float64


def test_unknown_model_names_available_ones():
    with pytest.raises(ValueError, match="induction-2l"):
        models.load("no-such-model")
    with pytest.raises(ValueError, match="available"):
        models.model_dir("gpt-17")


# --------------------------------------------------------------------------------------- behaviour


def test_copy_accuracy_far_above_chance(model):
    acc, chance = data.copy_accuracy(model, batch=128, seed=2024)
    assert chance == pytest.approx(1 / model.config.vocab_size)
    assert acc > 0.8, acc
    assert acc > 50 * chance


def test_induction_prompts_are_solved_only_with_the_earlier_occurrence(model):
    p = data.induction_prompts(64, seq_len=32, vocab=model.config.vocab_size, seed=3)
    with torch.no_grad():
        clean = model(p.clean).logits[:, -1]
        corrupt = model(p.corrupted).logits[:, -1]
    rows = torch.arange(64)
    diff_clean = clean[rows, p.target] - clean[rows, p.contrast]
    diff_corrupt = corrupt[rows, p.target] - corrupt[rows, p.contrast]
    assert (clean.argmax(-1) == p.target).float().mean() > 0.9
    assert diff_clean.mean() > 5.0
    assert diff_corrupt.mean() < 1.0


def test_pattern_scores_find_the_circuit_and_bystanders(scores):
    prev, ind = scores
    assert prev.shape == ind.shape == (2, 4)
    assert prev[0].max() > PREV_CLEAR, prev  # previous-token head in layer 0
    assert ind[1].max() > IND_CLEAR, ind  # induction head in layer 1
    bystander = (prev < PREV_LOW) & (ind < IND_LOW)
    assert bystander.any(), (prev, ind)
    # the roles are distinct heads: the prev-token head is no induction head and vice versa
    assert ind[0].max() < IND_LOW
    assert prev[1].max() < PREV_LOW


# ------------------------------------------------------------------------------------------ patterns


def test_pattern_scores_restore_attention_implementation(model):
    before = model.config._attn_implementation
    tokens = data.repeated_random_tokens(2, 8, model.config.vocab_size, seed=0)
    previous_token_scores(model, tokens)
    assert model.config._attn_implementation == before
    assert not model.training

    model.train()
    try:
        with pytest.raises(Exception):
            attention_patterns(model, torch.full((1, 5), 10**6))  # out-of-vocabulary id raises in forward
        assert model.config._attn_implementation == before
        assert model.training
    finally:
        model.eval()


def test_pattern_scores_match_manual_computation(model):
    tokens = data.repeated_random_tokens(4, 6, model.config.vocab_size, seed=5)
    pat = attention_patterns(model, tokens)  # [L, B, H, T, T]
    assert pat.shape == (2, 4, 4, 12, 12)
    torch.testing.assert_close(pat.sum(-1), torch.ones(2, 4, 4, 12))
    prev = torch.stack([pat[..., i, i - 1] for i in range(1, 12)], -1).mean(dim=(1, 3))
    ind = torch.stack([pat[..., i, i - 6 + 1] for i in range(6, 12)], -1).mean(dim=(1, 3))
    torch.testing.assert_close(previous_token_scores(model, tokens), prev)
    torch.testing.assert_close(induction_scores(model, tokens), ind)
    with pytest.raises(ValueError):
        induction_scores(model, torch.arange(12).view(1, 12))  # not a repeated sequence


# ---------------------------------------------------------------------------------------------- data


def test_copy_task_is_deterministic_and_varied():
    a = data.copy_task_batch(256, seed=7)
    b = data.copy_task_batch(256, seed=7)
    c = data.copy_task_batch(256, seed=8)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.repeat_mask, b.repeat_mask)
    assert not torch.equal(a.input_ids, c.input_ids)
    # lengths, source offsets, destination offsets and distances all vary
    assert a.seg_len.unique().numel() >= 10
    assert a.src.unique().numel() >= 10 and a.dst.unique().numel() >= 10
    assert (a.dst - a.src).unique().numel() >= 15
    assert a.seg_len.min() >= data.DEFAULT_MIN_SEG and a.seg_len.max() <= data.DEFAULT_MAX_SEG
    # a shared generator gives successive, different batches
    g = data.make_generator(0)
    assert not torch.equal(data.copy_task_batch(8, generator=g).input_ids, data.copy_task_batch(8, generator=g).input_ids)


def test_copy_task_structure():
    batch = data.copy_task_batch(64, seq_len=40, vocab=64, seed=1)
    ids, mask = batch.input_ids, batch.repeat_mask
    assert ids.shape == mask.shape == (64, 40) and mask.dtype == torch.bool
    assert not mask[:, -1].any()
    for i in range(64):
        s, d, n = int(batch.src[i]), int(batch.dst[i]), int(batch.seg_len[i])
        assert d >= s + n and d + n <= 40
        assert torch.equal(ids[i, d : d + n], ids[i, s : s + n])
        # the segment is the only repetition: every other token is distinct
        assert ids[i].unique().numel() == 40 - n
        assert mask[i].sum() == n - 1 and mask[i, d : d + n - 1].all()
        # masked positions: the next token follows the earlier occurrence of the current token
        for p in torch.nonzero(mask[i]).flatten().tolist():
            earlier = (ids[i, :p] == ids[i, p]).nonzero().flatten()
            assert earlier.numel() == 1 and ids[i, earlier[0] + 1] == ids[i, p + 1]


def test_repeated_random_tokens():
    t = data.repeated_random_tokens(5, 10, vocab=50, seed=2)
    assert t.shape == (5, 20) and torch.equal(t[:, :10], t[:, 10:])
    assert all(row[:10].unique().numel() == 10 for row in t)
    assert torch.equal(t, data.repeated_random_tokens(5, 10, vocab=50, seed=2))
    assert not torch.equal(t, data.repeated_random_tokens(5, 10, vocab=50, seed=3))
    assert data.repeated_random_tokens(2, 10, vocab=5, seed=0, distinct=False).max() < 5


def test_induction_prompts_structure():
    p = data.induction_prompts(128, seq_len=32, vocab=128, seed=4)
    assert p.clean.shape == p.corrupted.shape == (128, 32)
    assert torch.equal(p.clean, data.induction_prompts(128, seq_len=32, vocab=128, seed=4).clean)
    assert p.seg_len.unique().numel() > 5 and p.src.unique().numel() > 5 and p.n_repeated.unique().numel() > 5
    for i in range(128):
        s, d, n, k = (int(x[i]) for x in (p.src, p.dst, p.seg_len, p.n_repeated))
        c, x = p.clean[i], p.corrupted[i]
        assert d == 32 - k and 2 <= k < n and s + n <= d
        assert torch.equal(c[d:], c[s : s + k])  # the prompt ends k tokens into the repeat
        assert p.target[i] == c[s + k] and p.target[i] != p.contrast[i]
        assert (c == p.contrast[i]).sum() == 1 and (x == p.contrast[i]).sum() == 1
        differs = c != x
        assert differs[s : s + n].all() and differs.sum() == n  # only the earlier occurrence is replaced
        assert not (x == p.target[i]).any()  # the answer is nowhere in the corrupted prompt
        assert not set(x[s : s + n].tolist()) & set(c.tolist())


# ------------------------------------------------------------------------------------------ training


def _train_in_process(argv: list[str]) -> dict:
    """``train_induction.main(argv)``, leaving torch's global state as it was."""
    from headint.tasks import train_induction

    state = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_rng_state(),
    )
    try:
        return train_induction.main(argv)
    finally:
        torch.set_num_threads(state[0])
        torch.use_deterministic_algorithms(state[1], warn_only=state[2])
        torch.set_rng_state(state[3])


def test_training_script_smoke(tmp_path, capsys):
    """``python -m headint.tasks.train_induction --out DIR --steps 20`` (run in-process: fast)."""
    from transformers import GPT2LMHeadModel

    out = tmp_path / "ckpt"
    info = _train_in_process(["--out", str(out), "--steps", "20", "--seed", "3", "--log-every", "10"])
    printed = capsys.readouterr().out
    assert "copy accuracy" in printed and "induction scores" in printed and "previous-token scores" in printed
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    saved = json.loads((out / "training.json").read_text())
    assert saved["steps"] == 20 and saved["seed"] == 3 and saved == json.loads(json.dumps(info))
    assert saved["command"].startswith("python -m headint.tasks.train_induction") and "--steps 20" in saved["command"]
    assert 0.0 <= saved["copy_accuracy"] <= 1.0 and saved["final_loss"] > 0
    m = GPT2LMHeadModel.from_pretrained(str(out))
    assert m.config.n_layer == 2 and m.config.vocab_size == saved["task"]["vocab"]
    assert m(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, m.config.vocab_size)


def test_training_module_runs_and_is_deterministic(tmp_path, capsys):
    """``python -m headint.tasks.train_induction`` in a fresh process writes the same weights, bit
    for bit, as a run in this process with the same seed; another seed writes other weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import headint

    root = str(Path(headint.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}

    def args(name, seed):
        return ["--out", str(tmp_path / name), "--steps", "30", "--seed", str(seed), "--log-every", "100"]

    subprocess.run([sys.executable, "-m", "headint.tasks.train_induction", *args("module", 5)], check=True, env=env,
                   capture_output=True, timeout=600)
    _train_in_process(args("same", 5))
    _train_in_process(args("other", 6))
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in ("module", "same", "other")}
    assert weights["module"] == weights["same"]
    assert weights["other"] != weights["same"]
    info = json.loads((tmp_path / "module" / "training.json").read_text())
    assert info["command"].startswith("python -m headint.tasks.train_induction")
    assert info["task"]["generator"] == "headint.tasks.induction.copy_task_batch"


def test_shipped_training_record_names_modules_that_exist():
    import importlib

    info = json.loads((models.model_dir("induction-2l") / "training.json").read_text())
    module = info["command"].split()[2]
    importlib.import_module(module)
    gen_module, gen_name = info["task"]["generator"].rsplit(".", 1)
    assert callable(getattr(importlib.import_module(gen_module), gen_name))
