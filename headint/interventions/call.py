"""One attention call as interventions see it: :class:`AttentionCall` (geometry + edit methods)
and the :class:`~headint.interventions.edits.CallPlan` it produces (the call's edits, described
in :mod:`headint.interventions.edits`).

Layouts (``Bs`` is 1, meaning every row alike, or the model's batch ``B``; under per-row
interventions each row gets its own call with ``Bs == 1``):

- head selectors ``[Bs, Hq, Tq]`` bool (query heads x this call's queries);
- head values ``[Bs, Hq, Tq, D]`` (head-major, like ``headint.attention``'s ``head_patch``);
- q/k/v selectors ``[Bs, Hx, T]`` and values ``[Bs, Hx, T, D]`` with ``Hx``/``T`` those of the
  tensor edited (queries: ``Hq``/``Tq``; keys and values: ``Hkv``/``Tk``).

The output edits compose in the order they are made. The attention function computes
``out = m * attn + (1 - m) * p + b`` per head and query: ``replace_output`` sets ``m = 0``,
``p = value``, ``b = 0``; ``scale_output`` multiplies the whole expression; ``add_output`` adds
to ``b``. So a later replace overrides an earlier add, a later add adds on top, a later scale
scales it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops.knockout import EdgeKnockout
from ..shape import ModelShape
from .base import as_real, head_list, positions_form
from .edits import INPUT_EDITS, CallPlan, PatternEdit, Replacement


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a / torch.where(b != 0, b, torch.ones_like(b))


class AttentionCall:
    """One attention call at ``layer``, handed to :meth:`Intervention.lower`.

    Geometry: ``stack`` and ``layer``; ``B`` rows in the model's batch; ``Tq`` queries at
    absolute positions ``q_positions`` (``[Tq]``, long) and ``Tk`` keys at ``k_positions``
    (``[Tk]``, from ``k_start``, by default ending with the last query: a sliding-window cache
    keeps only the last ``Tk``; cross-attention's keys are the encoder's ``0 .. Tk - 1``); ``device``; ``shape``: this
    layer's :class:`~headint.shape.LayerShape` (``n_heads``, ``n_kv_heads``, ``head_dim``,
    ``v_head_dim``; head outputs are ``[.., n_heads, v_head_dim]``), ``model_shape``: the
    model's :class:`~headint.shape.ModelShape`; ``row``: the batch row these edits are for
    (per-row interventions) or None (every row).

    Selectors: :meth:`select`, :meth:`select_keys`, :meth:`select_qkv`, :meth:`positions`.
    Values: :meth:`batch` (a per-row source's rows for this call), :meth:`values_at` (a
    recording's values at this call's positions). Edits: :meth:`replace_output`,
    :meth:`scale_output`, :meth:`add_output`, :meth:`scale_scores`, :meth:`knock_out`,
    :meth:`replace_qkv`, :meth:`replace_pattern`. :meth:`plan` returns the resulting :class:`CallPlan`.
    """

    def __init__(self, shape: ModelShape, layer: int, B: int, Tq: int, Tk: int, device, q_start: int,
                 row: int | None = None, stack: str | None = None, k_start: int | None = None):
        self.model_shape = shape
        self.stack = shape.resolve_stack(stack)
        self.shape = shape.layer(layer, self.stack)
        self.layer = layer
        self.B, self.Tq, self.Tk = B, Tq, Tk
        self.device = device
        self.row = row
        self.q_positions = torch.arange(q_start, q_start + Tq, device=device)
        k_start = q_start + Tq - Tk if k_start is None else k_start  # default: the keys end with the last query
        self.k_positions = torch.arange(k_start, k_start + Tk, device=device)
        H, D = self.shape.n_heads, self.shape.v_head_dim
        self._m: torch.Tensor | None = None  # [Bs, H, Tq]
        self._p: torch.Tensor | None = None  # [Bs, H, Tq, D]
        self._b: torch.Tensor | None = None  # [Bs, H, Tq, D]
        self._score_scale: torch.Tensor | None = None
        self._knockouts: list[EdgeKnockout] = []
        self._inputs: dict[str, Replacement] = {}  # "q"/"k"/"v" -> the merged replacement
        self._patterns: list[PatternEdit] = []
        self._H, self._D = H, D

    # -- selectors --------------------------------------------------------------------------------------
    def heads(self, head: Any, kv: bool = False) -> list[int]:
        """The query heads (``kv=True``: key/value heads) that ``head`` names (None = all)."""
        n = self.shape.n_kv_heads if kv else self.shape.n_heads
        return head_list(head, n, "key/value" if kv else "query", self.layer)

    def batch(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """``x`` (batch first) for this call: batch 1 broadcasts, batch ``B`` gives row ``i`` to
        row ``i`` (this call's row only, under per-row interventions); other batches are refused
        naming ``what``."""
        if x.shape[0] not in (1, self.B):
            raise ValueError(f"{what} for layer {self.layer} has batch {x.shape[0]} (shape {list(x.shape)}), but the model runs {self.B} rows; expected 1 or {self.B}")
        if self.row is not None and x.shape[0] == self.B and self.B > 1:
            return x[self.row : self.row + 1]
        return x

    def positions(self, pos: Any, axis: str = "q", name: str = "positions") -> torch.Tensor:
        """Bool ``[Bs, T]``: is each of this call's query (``axis="q"``) or key (``"k"``) positions
        selected by ``pos`` (absolute positions, see :mod:`headint.interventions.base`)."""
        abs_pos = self.q_positions if axis == "q" else self.k_positions
        pos = positions_form(pos, name)
        if pos is None:
            return torch.ones(1, abs_pos.numel(), dtype=torch.bool, device=self.device)
        if isinstance(pos, torch.Tensor):
            p = self.batch(pos.to(self.device).reshape(-1, pos.shape[-1]), f"{name} (bool)")
            T = p.shape[-1]
            inside = abs_pos < T  # a selector shorter than the sequence selects nothing beyond it
            out = torch.zeros(p.shape[0], abs_pos.numel(), dtype=torch.bool, device=self.device)
            out[:, inside] = p[:, abs_pos[inside]]
            return out
        return torch.isin(abs_pos, torch.tensor(pos, dtype=abs_pos.dtype, device=self.device))[None]

    def select(self, head: Any = None, positions: Any = None, name: str = "positions") -> torch.Tensor:
        """Bool ``[Bs, Hq, Tq]``: the query heads ``head`` at the query positions ``positions``."""
        hsel = torch.zeros(self._H, dtype=torch.bool, device=self.device)
        hsel[self.heads(head)] = True
        return hsel[None, :, None] & self.positions(positions, "q", name)[:, None, :]

    def select_keys(self, head: Any = None, positions: Any = None, name: str = "keys") -> torch.Tensor:
        """Bool ``[Bs, Hq, Tk]``: the query heads ``head`` at the key positions ``positions``
        (the key side of :meth:`knock_out`)."""
        hsel = torch.zeros(self._H, dtype=torch.bool, device=self.device)
        hsel[self.heads(head)] = True
        return hsel[None, :, None] & self.positions(positions, "k", name)[:, None, :]

    def select_qkv(self, which: str, head: Any = None, positions: Any = None, name: str = "positions") -> torch.Tensor:
        """Bool ``[Bs, Hx, T]`` over the heads and positions of q (``which="q"``), k or v."""
        kv = which != "q"
        n = self.shape.n_kv_heads if kv else self._H
        hsel = torch.zeros(n, dtype=torch.bool, device=self.device)
        hsel[self.heads(head, kv=kv)] = True
        return hsel[None, :, None] & self.positions(positions, "k" if kv else "q", name)[:, None, :]

    def values_at(self, x: torch.Tensor, sel: torch.Tensor, axis: str, what: str) -> torch.Tensor:
        """Index dim 1 (absolute positions) of a recording ``x [Bs, T, ...]`` at this call's query
        (``axis="q"``) or key positions; ``T == 1`` broadcasts. Only positions selected by ``sel``
        (bool ``[..., Tcall]``) must be covered; others are refused naming ``what``."""
        abs_pos = self.q_positions if axis == "q" else self.k_positions
        T = x.shape[1]
        if T == 1:
            return x.expand(x.shape[0], abs_pos.numel(), *x.shape[2:])
        needed = sel.reshape(-1, sel.shape[-1]).any(0)
        missing = abs_pos[needed & (abs_pos >= T)]
        if missing.numel():
            shown = missing.tolist()
            shown = shown if len(shown) <= 8 else shown[:8] + ["..."]
            raise ValueError(
                f"{what} covers {T} positions (0..{T - 1}) but the model is at selected positions up to "
                f"{int(missing.max())}; selected positions not covered: {shown}"
            )
        return x[:, abs_pos.clamp(max=T - 1).to(x.device)]

    # -- edits ------------------------------------------------------------------------------------------
    def _blend(self) -> None:
        if self._m is None:
            self._m = torch.ones(1, self._H, self.Tq, device=self.device)
            self._p = torch.zeros(1, self._H, self.Tq, self._D, device=self.device)

    def _check_sel(self, sel: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(sel, torch.Tensor) or sel.dtype != torch.bool or sel.dim() != 3 or tuple(sel.shape[1:]) != (self._H, self.Tq) or sel.shape[0] not in (1, self.B):
            got = f"shape {list(sel.shape)} {sel.dtype}" if isinstance(sel, torch.Tensor) else type(sel).__name__
            raise ValueError(f"{what}: the selector must be bool [Bs, {self._H}, {self.Tq}] (from call.select), got {got}")
        return self.batch(sel.to(self.device), what)

    def _values(self, x: Any, what: str, last: int | None = None, last_name: str = "D") -> torch.Tensor:
        """``x`` as float32 on this call's device, checked to broadcast to ``[Bs, Hq, Tq, last]``
        (``last`` default: the head dim ``D``)."""
        last = self._D if last is None else last
        v = torch.as_tensor(x, device=self.device).float()
        try:
            s = torch.broadcast_shapes(tuple(v.shape), (1, self._H, self.Tq, last))
            fits = v.dim() <= 4 and tuple(s[1:]) == (self._H, self.Tq, last) and s[0] in (1, self.B)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{what} has shape {list(v.shape)}; expected a tensor broadcastable to "
                             f"[Bs, {self._H}, {self.Tq}, {last}] ([Bs, H, Tq, {last_name}] with Bs 1 or {self.B})")
        return self.batch(v, what) if v.dim() == 4 else v

    def replace_output(self, sel: torch.Tensor, value: Any) -> None:
        """Selected head outputs become ``value`` (broadcastable to ``[Bs, Hq, Tq, D]``)."""
        sel = self._check_sel(sel, "replace_output")
        value = self._values(value, "replace_output value")
        self._blend()
        self._m = torch.where(sel, torch.zeros_like(self._m), self._m)
        self._p = torch.where(sel[..., None], value, self._p)
        if self._b is not None:
            self._b = torch.where(sel[..., None], torch.zeros_like(self._b), self._b)

    def scale_output(self, sel: torch.Tensor, factor: Any) -> None:
        """Selected head outputs (as edited so far) are multiplied by ``factor``."""
        sel = self._check_sel(sel, "scale_output")
        f = as_real(factor, "scale_output factor")
        self._blend()
        m, p = self._m, self._p
        new_m = f * m
        new_p = _safe_div(f * (1 - m)[..., None] * p, (1 - new_m)[..., None])
        self._m = torch.where(sel, new_m, m)
        self._p = torch.where(sel[..., None], new_p, p)
        if self._b is not None:
            self._b = torch.where(sel[..., None], f * self._b, self._b)

    def add_output(self, sel: torch.Tensor, vector: Any) -> None:
        """``vector`` (broadcastable to ``[Bs, Hq, Tq, D]``, e.g. ``[D]``) is added to the
        selected head outputs (additive steering)."""
        sel = self._check_sel(sel, "add_output")
        vec = self._values(vector, "add_output vector")
        b = self._b if self._b is not None else torch.zeros(1, self._H, self.Tq, self._D, device=self.device)
        self._b = torch.where(sel[..., None], b + vec, b)

    def scale_scores(self, head: Any, factor: Any) -> None:
        """Pre-softmax scores of the query heads ``head`` are multiplied by ``factor`` (all positions)."""
        f = torch.ones(self._H, device=self.device)
        f[self.heads(head)] = as_real(factor, "scale_scores factor")
        self._score_scale = f[None] if self._score_scale is None else self._score_scale * f

    def knock_out(self, query_sel: torch.Tensor, key_sel: torch.Tensor) -> None:
        """Remove edges ``i -> j`` where ``query_sel [Bs, Hq, Tq]`` is true at ``i`` and
        ``key_sel [Bs, Hq | 1, Tk]`` at ``j`` (same head)."""
        self._knockouts.append(EdgeKnockout(query_sel.to(self.device), key_sel.to(self.device)))

    def replace_qkv(self, which: str, sel: torch.Tensor, values: torch.Tensor) -> None:
        """Before attention, ``which`` (``"q"``, ``"k"`` or ``"v"``) takes ``values [Bs, Hx, T, D]``
        where ``sel [Bs, Hx, T]`` is true (a later replacement of the same entries wins)."""
        if which not in INPUT_EDITS:
            raise ValueError(f"replace_qkv: which must be 'q', 'k' or 'v', got {which!r}")
        sel, values = sel.to(self.device), values.to(self.device)
        old = self._inputs.get(which)
        if old is not None:
            values = torch.where(sel[..., None], values, old.values)
            sel = sel | old.select
        self._inputs[which] = Replacement(sel, values)

    def replace_pattern(self, sel: torch.Tensor, probs: Any) -> None:
        """The selected heads' attention probabilities at the selected queries (``sel [Bs, Hq, Tq]``
        bool, from :meth:`select`) become ``probs`` (broadcastable to ``[Bs, Hq, Tq, Tk]``: rows over
        this call's keys), so those head outputs become ``probs @ v``; output edits (replace, scale,
        add) apply on top of it, whatever order they are made in (see
        :mod:`headint.integration.pattern_patch`)."""
        sel = self._check_sel(sel, "replace_pattern")
        p = self._values(probs, "replace_pattern probs", self.Tk, "Tk")
        self._patterns.append(PatternEdit(sel, p.expand(p.shape[0] if p.dim() == 4 else 1, self._H, self.Tq, self.Tk)))

    def plan(self) -> CallPlan:
        return CallPlan(head_mask=self._m, head_patch=self._p, head_bias=self._b, score_scale=self._score_scale,
                        knockouts=list(self._knockouts), pattern_edits=list(self._patterns),
                        **{INPUT_EDITS[w]: r for w, r in self._inputs.items()})
