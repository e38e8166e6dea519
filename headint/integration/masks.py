"""The attention-mask builder headint registers in ``transformers`` (next to its attention function).

``transformers`` builds each forward's attention masks with the builder registered under the
model's attention implementation. headint's is SDPA's (:func:`transformers.masking_utils.sdpa_mask`),
which may skip a plain causal mask (returning None) and leave causality to the attention call's
``is_causal`` / the module's ``is_causal`` flag, as SDPA does.

Some models never meant their masks to be skipped: they run only with eager attention (which
always gets the mask), and their attention modules do not say they are causal (PEGASUS-X's
decoder self-attention has ``is_causal=False`` and relies on the mask). For such a model the
probe (:mod:`.structure`) finds that headint's output differs from the model's own, tries again
with every mask materialized (:func:`materialized_masks`), and, if that matches, keeps it so for
the model's configs (:func:`mark`): their masks are always built in full, and headint's attention
is then exactly the model's.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

_FULL: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()  # id(config) -> config


def headint_mask(*args, config=None, **kwargs):
    """SDPA's mask builder; for a marked config the causal mask is never skipped."""
    from transformers.masking_utils import sdpa_mask

    if config is not None and _FULL.get(id(config)) is config:
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, config=config, **kwargs)


def mark(configs) -> None:
    """Build every mask of these configs in full from now on (while the configs live)."""
    for c in configs:
        _FULL[id(c)] = c


def unmark(configs) -> None:
    for c in configs:
        if _FULL.get(id(c)) is c:
            del _FULL[id(c)]


def is_marked(config) -> bool:
    return _FULL.get(id(config)) is config


@contextlib.contextmanager
def materialized_masks(configs) -> Iterator[None]:
    """Within the block, these configs' masks are built in full (marks made before are kept)."""
    new = [c for c in configs if not is_marked(c)]
    mark(new)
    try:
        yield
    finally:
        unmark(new)
