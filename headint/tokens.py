"""Token ids as readable strings, for labelling plots and tables.

:func:`to_str_tokens` is what TransformerLens users know as ``model.to_str_tokens``: one
string per token id, each token decoded on its own (so ``" Mary"`` keeps its leading space).
"""

from __future__ import annotations

import operator
from typing import Sequence

import torch

__all__ = ["to_str_tokens", "check_token_ids", "vocab_size"]


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


def vocab_size(model) -> int | None:
    """The number of rows of ``model``'s input embedding (what token ids index), else its
    config's ``vocab_size``; None when neither is known."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    n = getattr(emb, "num_embeddings", None)
    if isinstance(n, int):
        return n
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "vocab_size", None)
    return n if isinstance(n, int) else None


def check_token_ids(ids, vocab: int | None, name: str, *, shape: str = "[N, T]") -> None:
    """Refuse what an embedding lookup would answer with a raw torch error: ``ids`` must be a
    2-D integer tensor (``shape`` names its dims in the message) with at least one row and one
    position, every id in ``[0, vocab)``. ValueError / TypeError naming ``name``, the shape,
    and the offending id and its place."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of token ids {shape}, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integer token ids, got a {ids.dtype} tensor of shape {list(ids.shape)}; "
                        "convert with .long() if they are ids")
    if ids.dim() != 2:
        raise ValueError(f"{name} has shape {list(ids.shape)}; expected {shape} token ids")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} has shape {list(ids.shape)}: no {'examples' if ids.shape[0] == 0 else 'tokens'}; "
                         f"expected {shape} with at least one example of at least one token")
    bad = (ids < 0) if vocab is None else (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        n, t = (int(i) for i in bad.nonzero()[0])
        want = "0 <= id" if vocab is None else f"0 <= id < {vocab}, the model's vocabulary size"
        raise ValueError(f"{name}[{n}, {t}] = {int(ids[n, t])} is not a token id of this model (expected {want})")
