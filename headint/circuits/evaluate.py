"""Comparing circuits with a ground truth: ROC AUC of edge scores, and of a family of circuits."""

from __future__ import annotations

import torch


def roc_auc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Area under the ROC curve of ranking edges by ``scores`` (higher = more likely true) against
    ``truth`` (bool ``[E]``): the probability that a true edge outranks a false one, ties half
    (Mann-Whitney). NaN scores rank lowest."""
    s = torch.nan_to_num(scores.double(), nan=float("-inf"))
    t = truth.bool()
    pos, neg = s[t], s[~t]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("roc_auc needs at least one true and one false edge")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def roc_points(circuits: list[torch.Tensor], truth: torch.Tensor) -> list[tuple[float, float]]:
    """``(false positive rate, true positive rate)`` of each circuit (bool ``[E]``), plus (0, 0) and (1, 1)."""
    t = truth.bool()
    pts = [(0.0, 0.0), (1.0, 1.0)]
    for c in circuits:
        c = c.bool()
        pts.append((float((c & ~t).sum() / max(int((~t).sum()), 1)), float((c & t).sum() / max(int(t.sum()), 1))))
    return sorted(set(pts))


def curve_auc(points: list[tuple[float, float]]) -> float:
    """Area under the upper envelope of ROC points (a threshold sweep's circuits), by trapezoids."""
    pts = sorted(points)
    best: list[tuple[float, float]] = []
    for x, y in pts:  # the monotone envelope: TPR never decreases with FPR
        y = max([y] + [b for _, b in best])
        best.append((x, y))
    return float(sum((x2 - x1) * (y1 + y2) / 2 for (x1, y1), (x2, y2) in zip(best, best[1:])))
