"""Attention-pattern patching, folded into the head-output blend the kernels already take.

Replacing head ``h``'s attention probabilities at a query by ``P`` (a row over keys) makes its
output there ``P @ v``. So no kernel changes: the output ``P @ v`` is computed here (a plain
matmul, the reference path for the affected heads) and handed to the kernel as a head-output
replacement (``head_mask = 0``, ``head_patch = P @ v``) at the selected heads and queries. The
probabilities are taken as given (not renormalised, not masked): they are those of another run.

Memory: the replacement probabilities are ``[B, H, Tq, Tk]`` per patched layer, O(B*H*T^2).
"""

from __future__ import annotations

import torch


def apply_pattern_edits(edits, value: torch.Tensor, head_mask: torch.Tensor | None,
                        head_patch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold pattern edits into ``(head_mask, head_patch)``.

    edits: ``(select [Bp, H, Tq] bool, probs [Bp, H, Tq, Tk])``, applied in order;
    value: ``[B, Hkv, Tk, D]`` (the call's values, after any q/k/v edit; key/value heads are
    repeated for grouped-query attention); head_mask ``[Bp, H, Tq]`` / head_patch
    ``[Bp, H, Tq, D]`` (or None: keep everything / zeros). Returns float32
    ``head_mask [B', H, Tq]`` and ``head_patch [B', H, Tq, D]`` such that the kernel's
    ``m * attn + (1 - m) * p`` gives ``probs @ v`` at every selected head and query and, elsewhere,
    what the given mask and patch gave. A head output replaced by the plan itself
    (``head_mask == 0``) stays replaced: the output replacement applies after the pattern.
    """
    B, Hkv, Tk, D = value.shape
    out_mask = None if head_mask is None else head_mask.float()
    out_patch = None if head_patch is None else head_patch.float()
    for sel, probs in edits:
        H = probs.shape[1]
        v = value.repeat_interleave(H // Hkv, dim=1) if H != Hkv else value
        z = torch.matmul(probs.to(v.device, torch.float32), v.float())  # [B, H, Tq, D]
        m_pat = (~sel.to(v.device)).float()  # 0 where the pattern is replaced
        m = torch.ones_like(m_pat) if out_mask is None else out_mask
        p = torch.zeros_like(z) if out_patch is None else out_patch
        # out = m * (m_pat * attn + (1 - m_pat) * z) + (1 - m) * p
        new_mask = m * m_pat
        num = (m * (1 - m_pat))[..., None] * z + (1 - m)[..., None] * p
        den = (1 - new_mask)[..., None]
        out_patch = num / torch.where(den != 0, den, torch.ones_like(den))
        out_mask = new_mask
    return out_mask, out_patch
