"""Token ids as readable strings, for labelling plots and tables.

:func:`to_str_tokens` is what TransformerLens users know as ``model.to_str_tokens``: one
string per token id, each token decoded on its own (so ``" Mary"`` keeps its leading space).
"""

from __future__ import annotations

import operator
from typing import Sequence

import torch

__all__ = ["to_str_tokens"]


def _id_list(ids, name: str) -> list[int] | list[list[int]]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() not in (1, 2) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be integer token ids [T] or [B, T], got a {ids.dtype} tensor of shape {list(ids.shape)}")
        return ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{name} must be token ids (a list of ints, or an int tensor [T] or [B, T]), got {type(ids).__name__}")
    out = []
    for i, x in enumerate(ids):
        if isinstance(x, (list, tuple, torch.Tensor)):
            out.append(_id_list(x, f"{name}[{i}]"))
        else:
            try:
                if isinstance(x, bool):
                    raise TypeError
                out.append(operator.index(x))
            except TypeError:
                raise TypeError(f"{name}[{i}] must be an int token id, got {x!r}") from None
    return out


def to_str_tokens(tokenizer, ids) -> list[str] | list[list[str]]:
    """One readable string per token id.

    ids: ``[T]`` (list of ints or int tensor) -> ``list[str]`` of length T; ``[B, T]`` ->
    one such list per row. Each id is decoded alone with ``tokenizer.decode([id])`` (special
    tokens kept, e.g. ``"[SEP]"``); an id the tokenizer decodes to nothing shows as
    ``"<id>"`` (e.g. ``"<50256>"``), so every position gets a visible label. With
    ``tokenizer=None`` every token is shown as its id, ``"<17>"``. A negative id, or one not
    below ``len(tokenizer)``, is refused with a ValueError naming it.
    """
    ids = _id_list(ids, "ids")
    if ids and isinstance(ids[0], list):
        return [to_str_tokens(tokenizer, row) for row in ids]
    size = None if tokenizer is None else len(tokenizer)
    out = []
    for i, t in enumerate(ids):
        if t < 0 or (size is not None and t >= size):
            raise ValueError(f"ids[{i}] = {t} is not a token id of this tokenizer (expected 0 <= id < {size})")
        text = "" if tokenizer is None else tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(text if text else f"<{t}>")
    return out
