"""The grid of a scan: its axes, and names for head sets and cells.

A scan yields one metric value per intervention (a grid cell) and example:
``per_example`` ``[*grid, N]``. The grid is one of

* ``("layer", "head")``: ``[L, H]``;
* ``("layer", "head", "position")``: ``[L, H, P]``;
* ``("head_set",)``: ``[S]``, with ``labels[s]`` the head set (a tuple of ``(layer, head)``
  pairs) of entry ``s``.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["AXES_CHOICES", "head_set_name", "cell_name"]

AXES_CHOICES = (("layer", "head"), ("layer", "head", "position"), ("head_set",))


def head_set_name(heads: Sequence[tuple[int, int]]) -> str:
    """``[(0, 1), (1, 2)]`` -> ``"L0H1+L1H2"``; the empty set -> ``"none"``."""
    if len(heads) == 0:
        return "none"
    return "+".join(f"L{int(layer)}H{int(head)}" for layer, head in heads)


def cell_name(axes: tuple[str, ...], index: Sequence[int], labels: Sequence | None = None) -> str:
    """Readable name of the grid cell at ``index`` (one int per axis): ``"L0H1"``,
    ``"L0H1 position 3"``, or the head set's name (``labels[index[0]]``)."""
    if axes == ("head_set",):
        return head_set_name(labels[index[0]])
    name = f"L{int(index[0])}H{int(index[1])}"
    if len(axes) == 3:
        name += f" position {int(index[2])}"
    return name
