"""Compact query->key edge knockouts at the operator level: :class:`EdgeKnockout`.

An :class:`EdgeKnockout` removes the attention edges ``i -> j`` for which the query
selector is true at ``i`` *and* the key selector is true at ``j``.  It is the
outer product of two boolean vectors, so no kernel ever needs a ``Tq x Tk``
mask: the kernels receive one small integer per query and one per key
(:func:`knockout_bits`), bit ``n`` standing for the ``n``-th knockout of a
union, and drop an edge where ``q_bits[i] & k_bits[j] != 0``.

The model-level intervention :class:`headint.Knockout` (absolute positions, a layer and
heads) is a different object; it lowers to an :class:`EdgeKnockout` for each attention call.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch

MAX_KNOCKOUTS = 32  # bits in the int32 selector words handed to the kernels


@dataclass(frozen=True, eq=False)
class EdgeKnockout:
    """Remove attention edges from the selected queries to the selected keys
    (``headint.attention(..., knockout=EdgeKnockout(queries, keys))``).

    ``queries``: bool tensor broadcastable to ``[B, Hq, Tq]``, or query indices (an int or a
    list of ints in ``0 .. Tq-1``: every batch row and head).
    ``keys``: bool tensor broadcastable to ``[B, Hq, Tk]``, or key indices (an int or a list of
    ints in ``0 .. Tk-1``).

    A list of knockouts is their union.  A query row whose every key is removed
    yields a zero output row.
    """

    queries: Any
    keys: Any

    def __repr__(self) -> str:  # short: selectors may be big tensors
        def short(x):
            if isinstance(x, torch.Tensor):
                return f"Tensor{list(x.shape)}"
            return repr(x)

        return f"EdgeKnockout(queries={short(self.queries)}, keys={short(self.keys)})"


def _indices(x: Any) -> list[int] | None:
    """``x`` as a list of indices if it is an int or a list/tuple of ints (not bools), else None."""
    items = [x] if not isinstance(x, (list, tuple)) else list(x)
    out = []
    for i in items:
        if isinstance(i, (bool, torch.Tensor)) or not isinstance(i, numbers.Integral):
            return None
        out.append(int(i))
    return out


def _selector(x: Any, name: str, full: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Check a selector and return it as a bool tensor of at most 3 dims broadcastable to ``full``
    (``[B, H, T]``); index lists become a ``[T]`` vector."""
    T = full[2]
    if not isinstance(x, torch.Tensor):
        idx = _indices(x)
        if idx is None:
            raise TypeError(
                f"EdgeKnockout {name} must be a bool tensor broadcastable to {list(full)} or an int / list of ints "
                f"(indices along that axis), got {type(x).__name__}"
            )
        bad = [i for i in idx if not 0 <= i < T]
        if bad:
            raise ValueError(f"EdgeKnockout {name} indices {bad} out of range: the call has {T} {name} (0..{T - 1})")
        sel = torch.zeros(T, dtype=torch.bool, device=device)
        sel[idx] = True
        return sel
    if x.dtype != torch.bool:
        raise TypeError(f"EdgeKnockout {name} must have dtype torch.bool, got {x.dtype} with shape {list(x.shape)}")
    if x.dim() > 3:
        raise ValueError(f"EdgeKnockout {name} has shape {list(x.shape)}; expected at most 3 dims broadcastable to {list(full)}")
    try:
        fits = torch.broadcast_shapes(tuple(x.shape), full) == torch.Size(full)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"EdgeKnockout {name} has shape {list(x.shape)}, which does not broadcast to {list(full)} ([B, Hq, T])"
        )
    if x.device != device:
        raise ValueError(f"knockout selectors must be on {device}, got {name} on {x.device}")
    return x


def as_knockout_list(knockout: Any) -> list[EdgeKnockout]:
    """Accept an :class:`EdgeKnockout` or a sequence of them (their union)."""
    if knockout is None:
        return []
    if isinstance(knockout, EdgeKnockout):
        return [knockout]
    if isinstance(knockout, Sequence) and not isinstance(knockout, str) and all(isinstance(k, EdgeKnockout) for k in knockout):
        return list(knockout)
    items = list(knockout) if isinstance(knockout, Sequence) and not isinstance(knockout, str) else [knockout]
    model_level = [k for k in items if not isinstance(k, EdgeKnockout) and hasattr(k, "layer") and hasattr(k, "lower")]
    if model_level:
        raise TypeError(
            f"knockout: got {type(model_level[0]).__name__}(layer=...), a model-level intervention; pass it to "
            "headint.intervene(model, [...]). headint.attention takes headint.ops.EdgeKnockout(queries, keys), "
            "a list of them, or a dense bool tensor"
        )
    raise TypeError(f"knockout must be a headint.ops.EdgeKnockout, a list of them, or a bool tensor; got {type(knockout).__name__}")


def knockout_bits(
    knockouts: Sequence[EdgeKnockout], B: int, H: int, Tq: int, Tk: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a union of knockouts as selector words.

    Returns ``q_bits`` ``[B, H, Tq]`` and ``k_bits`` ``[B, H, Tk]`` (int32, possibly
    stride-0 views on broadcast dimensions): edge ``i -> j`` is removed iff
    ``q_bits[b, h, i] & k_bits[b, h, j] != 0``.
    """
    if len(knockouts) > MAX_KNOCKOUTS:
        raise ValueError(
            f"knockout: at most {MAX_KNOCKOUTS} EdgeKnockout objects per call, got {len(knockouts)}; "
            "merge them or pass a dense bool mask [B, Hq, Tq, Tk]"
        )
    q_words, k_words = [], []
    for n, ko in enumerate(knockouts):
        qs = _selector(ko.queries, "queries", (B, H, Tq), device)
        ks = _selector(ko.keys, "keys", (B, H, Tk), device)
        bit = torch.tensor(1 << n if n < 31 else -(1 << 31), dtype=torch.int32, device=device)
        q_words.append((qs, bit))
        k_words.append((ks, bit))

    def combine(words, T):
        # Combine at the broadcast shape of the selectors, then expand with stride 0.
        shapes = [w.reshape((1,) * (3 - w.dim()) + tuple(w.shape)).shape for w, _ in words]
        shape = torch.broadcast_shapes(*shapes)
        acc = torch.zeros(shape, dtype=torch.int32, device=device)
        for w, bit in words:
            acc = acc | torch.where(w.reshape((1,) * (3 - w.dim()) + tuple(w.shape)), bit, 0)
        return acc.expand(B, H, T)

    return combine(q_words, Tq), combine(k_words, Tk)
