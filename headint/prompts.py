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

A prompt file must be a regular file (a FIFO or device such as ``/dev/zero`` is refused before
it is opened) of at most :data:`MAX_PROMPT_BYTES`, UTF-8 (a leading byte-order mark, as
Notepad writes, is accepted), each line JSON that is not nested absurdly deep.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .files import parse_json, read_text

ANSWER_KEYS = ("target", "contrast")
MAX_PROMPT_BYTES = 256 * 2**20
"""The largest prompt file read (256 MiB, about a million prompts of a few hundred characters):
a prompt file is read whole, and a larger one is far more than a scan of every head can use."""


def _tokenize_answer(x, tokenizer, what: str, where: str, no_tokenizer: str) -> list[int]:
    """The token ids of an answer: ``[x]`` for an id, the tokenizer's ids for text."""
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise TypeError(f"{where}: {what} must be a token id or a string, got {x!r}")
    if isinstance(x, int):
        if x < 0:
            raise ValueError(f"{where}: {what} token id must be >= 0, got {x}")
        return [x]
    if tokenizer is None:
        raise ValueError(f"{where}: {what} {x!r} is text, but {no_tokenizer}; give token ids")
    ids = [int(i) for i in tokenizer(x, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ValueError(f"{where}: {what} {x!r} tokenizes to nothing")
    return ids


def _tokens_text(ids: list[int], tokenizer) -> str:
    pieces = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else ids
    return f"{pieces!r} (ids {ids})"


def _answer_ids(row: dict, keys: tuple[str, ...], tokenizer, where: str, no_tokenizer: str) -> dict[str, int]:
    """``{key: token id}`` of the line's answers; refuses answers of more than one token, naming
    every answer's tokenization (the metrics read the logit of a single next token)."""
    toks = {k: _tokenize_answer(row[k], tokenizer, k, where, no_tokenizer) for k in keys}
    if any(len(ids) != 1 for ids in toks.values()):
        parts = "; ".join(f"{k} {row[k]!r} -> {_tokens_text(ids, tokenizer)}" for k, ids in toks.items())
        raise ValueError(f"{where}: answers must be single tokens (the metrics score one next token), but {parts}; "
                         "use answers that are one token each, e.g. their first tokens when those differ")
    return {k: ids[0] for k, ids in toks.items()}


def _json_type(x) -> str:
    return f"a JSON {type(x).__name__}"


def _read_rows(path: str | Path, max_bytes: int = MAX_PROMPT_BYTES) -> list[tuple[int, object]]:
    """``[(line number, parsed JSON)]`` of the non-blank lines of ``path``: a regular UTF-8 file
    (a byte-order mark is accepted) of at most ``max_bytes`` bytes."""
    text = read_text(path, "prompt file", max_bytes)
    rows = []
    for i, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        rows.append((i, parse_json(raw, f"{path}:{i}")))
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def example_lines(path: str | Path) -> list[int]:
    """The line number (1-based) of each example of ``path``, in order (blank lines hold none)."""
    return [i for i, _ in _read_rows(path)]


def _int_ids(value, where: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, list):
        raise ValueError(f"{where}: 'input_ids' must be a list of token ids, got {_json_type(value)}")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f"{where}: 'input_ids' must hold ints (token ids), got {t!r}")
        if t < 0:
            raise ValueError(f"{where}: token id {t} in 'input_ids' is negative")
    return list(value)


def load_prompts(path: str | Path, tokenizer=None, pad_id: int | None = None, *, vocab_size: int | None = None,
                 max_length: int | None = None, no_tokenizer: str = "the model directory has no tokenizer") -> dict[str, torch.Tensor]:
    """Read a JSONL file into a batch: ``input_ids`` ``[N, T]`` (left-padded), ``attention_mask``
    ``[N, T]``, and ``target``/``contrast`` ``[N]`` (single token ids) when the lines have them:
    every line, or none.

    vocab_size: refuse token ids (of prompts and answers) that are not below it. max_length:
    refuse prompts longer than this many tokens (the model's positions). no_tokenizer: why there
    is no tokenizer, said when a line needs one.

    Raises FileNotFoundError / IsADirectoryError for a missing file or a folder, and ValueError
    naming the file for one that is not a regular file or too large, and ``path:line`` for a
    malformed line (not JSON, nested too deeply), an empty or too long sequence, a token id out
    of range, an answer that is not one token, or an answer given on some lines only."""
    rows = _read_rows(path)
    seqs = []
    for i, row in rows:
        where = f"{path}:{i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object like {{\"text\": ...}} or {{\"input_ids\": [...]}}, got {_json_type(row)}")
        if "input_ids" in row:
            ids = _int_ids(row["input_ids"], where)
        elif "text" in row:
            if not isinstance(row["text"], str):
                raise ValueError(f"{where}: 'text' must be a string, got {_json_type(row['text'])}")
            if tokenizer is None:
                raise ValueError(f"{where}: has 'text', but {no_tokenizer}; give 'input_ids' instead")
            ids = tokenizer(row["text"])["input_ids"]
        else:
            raise ValueError(f"{where}: each line needs 'text' or 'input_ids'")
        if not ids:
            raise ValueError(f"{where}: empty sequence (no tokens)")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise ValueError(f"{where}: token id {max(ids)} is not below the model's vocabulary size {vocab_size}")
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"{where}: {len(ids)} tokens, but the model has only {max_length} positions")
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
    answers = [_answer_ids(row, keys, tokenizer, f"{path}:{i}", no_tokenizer) for i, row in rows]
    for key in keys:
        if vocab_size is not None:
            for (i, _), a in zip(rows, answers):
                if a[key] >= vocab_size:
                    raise ValueError(f"{path}:{i}: {key} token id {a[key]} is not below the model's vocabulary size {vocab_size}")
        batch[key] = torch.tensor([a[key] for a in answers], dtype=torch.long)
    return batch
