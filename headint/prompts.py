"""Scan inputs from JSONL files.

One example per line, either text (needs a tokenizer)::

    {"text": "When Mary and John went to the store, John gave a drink to", "target": " Mary", "contrast": " John"}

or token ids::

    {"input_ids": [5, 17, 3, 9], "target": 12, "contrast": 40}

``target``/``contrast`` are token ids or strings that tokenize to exactly one token (the
metrics score a single next token); a string of several tokens (e.g. ``" Johnathan"`` ->
``[" John", "athan"]``) is refused with an error naming the file, the line and the
tokenization of every answer on it, before any model runs. Sequences of unequal length are
left-padded, so every example's last token sits at the last position; the scans number each
prompt's positions from its first real token (``position_ids`` from the mask), so padding
changes no result.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ANSWER_KEYS = ("target", "contrast")


def _tokenize_answer(x, tokenizer, what: str, where: str) -> list[int]:
    """The token ids of an answer: ``[x]`` for an id, the tokenizer's ids for text."""
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise TypeError(f"{where}: {what} must be a token id or a string, got {x!r}")
    if isinstance(x, int):
        if x < 0:
            raise ValueError(f"{where}: {what} token id must be >= 0, got {x}")
        return [x]
    if tokenizer is None:
        raise ValueError(f"{where}: {what} {x!r} is text, but the model directory has no tokenizer; give token ids")
    ids = [int(i) for i in tokenizer(x, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ValueError(f"{where}: {what} {x!r} tokenizes to nothing")
    return ids


def _tokens_text(ids: list[int], tokenizer) -> str:
    pieces = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else ids
    return f"{pieces!r} (ids {ids})"


def _answer_ids(row: dict, keys: tuple[str, ...], tokenizer, where: str) -> dict[str, int]:
    """``{key: token id}`` of the line's answers; refuses answers of more than one token, naming
    every answer's tokenization (the metrics read the logit of a single next token)."""
    toks = {k: _tokenize_answer(row[k], tokenizer, k, where) for k in keys}
    if any(len(ids) != 1 for ids in toks.values()):
        parts = "; ".join(f"{k} {row[k]!r} -> {_tokens_text(ids, tokenizer)}" for k, ids in toks.items())
        raise ValueError(f"{where}: answers must be single tokens (the metrics score one next token), but {parts}; "
                         "use answers that are one token each, e.g. their first tokens when those differ")
    return {k: ids[0] for k, ids in toks.items()}


def _json_type(x) -> str:
    return f"a JSON {type(x).__name__}"


def load_prompts(path: str | Path, tokenizer=None, pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Read a JSONL file into a batch: ``input_ids`` ``[N, T]``, ``attention_mask``, and
    ``target``/``contrast`` ``[N]`` (single token ids) when the lines have them: every line, or none.

    Raises ValueError naming ``path:line`` for a malformed line, an answer that is not one
    token, or an answer given on some lines only."""
    rows = []
    for i, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((i, json.loads(raw)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"{path}: no examples")
    seqs = []
    for i, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object like {{\"text\": ...}} or {{\"input_ids\": [...]}}, got {_json_type(row)}")
        if "input_ids" in row:
            ids = [int(t) for t in row["input_ids"]]
        elif "text" in row:
            if tokenizer is None:
                raise ValueError(f"{path}:{i}: has 'text' but the model directory has no tokenizer; give 'input_ids'")
            ids = tokenizer(row["text"])["input_ids"]
        else:
            raise ValueError(f"{path}:{i}: each line needs 'text' or 'input_ids'")
        if not ids:
            raise ValueError(f"{path}:{i}: empty sequence")
        seqs.append(ids)
    T = max(len(s) for s in seqs)
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0
    input_ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for n, s in enumerate(seqs):
        input_ids[n, T - len(s):] = torch.tensor(s)
        mask[n, T - len(s):] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    keys = tuple(k for k in ANSWER_KEYS if any(k in row for _, row in rows))
    for key in keys:
        missing = [i for i, row in rows if key not in row]
        if missing:
            raise ValueError(f"{path}:{missing[0]}: has no {key!r}, but other lines have one; give every line a {key!r} or none")
    answers = [_answer_ids(row, keys, tokenizer, f"{path}:{i}") for i, row in rows]
    for key in keys:
        batch[key] = torch.tensor([a[key] for a in answers], dtype=torch.long)
    return batch
