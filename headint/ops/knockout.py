"""Compact query->key edge knockouts.

A :class:`Knockout` removes the attention edges ``i -> j`` for which the query
selector is true at ``i`` *and* the key selector is true at ``j``.  It is the
outer product of two boolean vectors, so no kernel ever needs a ``Tq x Tk``
mask: the kernels receive one small integer per query and one per key
(:func:`knockout_bits`), bit ``n`` standing for the ``n``-th knockout of a
union, and drop an edge where ``q_bits[i] & k_bits[j] != 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

MAX_KNOCKOUTS = 32  # bits in the int32 selector words handed to the kernels


@dataclass(frozen=True, eq=False)
class Knockout:
    """Remove attention edges from the selected queries to the selected keys.

    Op level (``headint.attention(..., knockout=Knockout(queries, keys))``):
        ``queries``: bool tensor broadcastable to ``[B, Hq, Tq]``.
        ``keys``: bool tensor broadcastable to ``[B, Hq, Tk]``.
    Model level (``headint.intervene(model, [Knockout(queries, keys, layer=1, head=3)])``):
        ``queries`` / ``keys`` are absolute token positions: an int, a list of
        ints, ``None`` for every position, or a bool tensor ``[T]`` / ``[B, T]``;
        ``layer`` and ``head`` name where the knockout applies (``head`` an int,
        a list, or ``None`` for all heads of the layer).

    A list of knockouts is their union.  A query row whose every key is removed
    yields a zero output row.
    """

    queries: Any = None
    keys: Any = None
    layer: int | None = None
    head: Any = None

    def __repr__(self) -> str:  # short: selectors may be big tensors
        def short(x):
            if isinstance(x, torch.Tensor):
                return f"Tensor{list(x.shape)}"
            return repr(x)

        where = "" if self.layer is None else f", layer={self.layer}, head={self.head!r}"
        return f"Knockout(queries={short(self.queries)}, keys={short(self.keys)}{where})"


def _selector(x: Any, name: str, full: tuple[int, int, int]) -> torch.Tensor:
    """Check a boolean selector and view it as a (possibly stride-0) ``[B, H, T]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Knockout {name} must be a bool tensor broadcastable to {list(full)}, got {type(x).__name__}")
    if x.dtype != torch.bool:
        raise TypeError(f"Knockout {name} must have dtype torch.bool, got {x.dtype} with shape {list(x.shape)}")
    if x.dim() > 3:
        raise ValueError(f"Knockout {name} has shape {list(x.shape)}; expected at most 3 dims broadcastable to {list(full)}")
    try:
        return x.expand(full) if x.dim() == 3 else x.reshape((1,) * (3 - x.dim()) + tuple(x.shape)).expand(full)
    except RuntimeError:
        raise ValueError(
            f"Knockout {name} has shape {list(x.shape)}, which does not broadcast to {list(full)} ([B, Hq, T])"
        ) from None


def as_knockout_list(knockout: Any) -> list[Knockout]:
    """Accept a Knockout or a sequence of them (their union)."""
    if knockout is None:
        return []
    if isinstance(knockout, Knockout):
        return [knockout]
    if isinstance(knockout, Sequence) and all(isinstance(k, Knockout) for k in knockout):
        return list(knockout)
    raise TypeError(f"knockout must be a headint.Knockout, a list of them, or a bool tensor; got {type(knockout).__name__}")


def knockout_bits(
    knockouts: Sequence[Knockout], B: int, H: int, Tq: int, Tk: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a union of knockouts as selector words.

    Returns ``q_bits`` ``[B, H, Tq]`` and ``k_bits`` ``[B, H, Tk]`` (int32, possibly
    stride-0 views on broadcast dimensions): edge ``i -> j`` is removed iff
    ``q_bits[b, h, i] & k_bits[b, h, j] != 0``.
    """
    if len(knockouts) > MAX_KNOCKOUTS:
        raise ValueError(
            f"knockout: at most {MAX_KNOCKOUTS} Knockout objects per call, got {len(knockouts)}; "
            "merge them or pass a dense bool mask [B, Hq, Tq, Tk]"
        )
    q_words, k_words = [], []
    for n, ko in enumerate(knockouts):
        if ko.layer is not None:
            raise ValueError("knockout: a Knockout with `layer` set is a model-level intervention; pass it to headint.intervene")
        qs = _selector(ko.queries, "queries", (B, H, Tq))
        ks = _selector(ko.keys, "keys", (B, H, Tk))
        if qs.device != device or ks.device != device:
            raise ValueError(f"knockout selectors must be on {device}, got queries on {qs.device}, keys on {ks.device}")
        bit = torch.tensor(1 << n if n < 31 else -(1 << 31), dtype=torch.int32, device=device)
        q_words.append((ko.queries, bit))
        k_words.append((ko.keys, bit))

    def combine(words, T):
        # Combine at the broadcast shape of the selectors, then expand with stride 0.
        shapes = [w.reshape((1,) * (3 - w.dim()) + tuple(w.shape)).shape for w, _ in words]
        shape = torch.broadcast_shapes(*shapes)
        acc = torch.zeros(shape, dtype=torch.int32, device=device)
        for w, bit in words:
            acc = acc | torch.where(w.reshape((1,) * (3 - w.dim()) + tuple(w.shape)), bit, 0)
        return acc.expand(B, H, T)

    return combine(q_words, Tq), combine(k_words, Tk)
