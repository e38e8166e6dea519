"""Scan inputs from JSONL files.

One example per line, either text (needs a tokenizer)::

    {"text": "When Mary and John went to the store, John gave a drink to", "target": " Mary", "contrast": " John"}

or token ids::

    {"input_ids": [5, 17, 3, 9], "target": 12, "contrast": 40}

``target``/``contrast`` are token ids or strings (their first token). Sequences of unequal
length are left-padded, so every example's last token sits at the last position.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _token_id(x, tokenizer, what: str, line: int) -> int:
    if isinstance(x, int):
        return x
    if isinstance(x, str):
        if tokenizer is None:
            raise ValueError(f"line {line}: {what} {x!r} is text, but the model directory has no tokenizer; give token ids")
        ids = tokenizer(x, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"line {line}: {what} {x!r} tokenizes to nothing")
        return int(ids[0])
    raise TypeError(f"line {line}: {what} must be a token id or a string, got {x!r}")


def load_prompts(path: str | Path, tokenizer=None, pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Read a JSONL file into a batch: ``input_ids`` ``[N, T]``, ``attention_mask``, and
    ``target``/``contrast`` ``[N]`` when every line has them."""
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
    for key in ("target", "contrast"):
        if all(key in row for _, row in rows):
            batch[key] = torch.tensor([_token_id(row[key], tokenizer, key, i) for i, row in rows])
    return batch
