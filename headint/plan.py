"""Plans: what the attention function applies at each layer.

A plan answers one question for the attention function: for this ``layer`` and a call
with ``B`` rows, ``Tq`` queries and ``Tk`` keys (queries at absolute positions
``q_start .. q_start + Tq - 1``, default ``Tk - Tq``), which operands apply?
(:meth:`Plan.for_call` returns a :class:`~headint.interventions.call.CallPlan`.)

- :class:`InterventionPlan` dispatches intervention objects: it groups them by site
  (attention stack and layer, see :mod:`headint.shape`) (and by
  row, when one list per batch row is given) and lets each one lower itself onto an
  :class:`~headint.interventions.call.AttentionCall`. It knows no intervention kind.
- :class:`TensorPlan` carries ready-made per-row tensors over absolute positions; scans
  build these directly for thousands of variants at once.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .interventions import AttentionCall, CallPlan, Intervention
from .ops.knockout import EdgeKnockout
from .shape import LayerShape, ModelShape

__all__ = ["Plan", "InterventionPlan", "TensorPlan", "CallPlan", "ModelShape"]


class Plan:
    """Base class: what to do at each layer."""

    def layers(self) -> set[int]:
        raise NotImplementedError

    def for_call(self, layer: int, B: int, Tq: int, Tk: int, device, dtype, q_start: int | None = None,
                 k_start: int | None = None) -> CallPlan | None:
        """Operands for a call at ``layer`` of the model's default attention stack whose queries sit
        at absolute positions ``q_start .. q_start+Tq-1`` (default ``Tk - Tq``) and whose keys at
        ``k_start .. k_start+Tk-1`` (default: they end with the last query; the attention function
        passes ``k_start`` only where they do not, see :mod:`headint.integration.positions`); None
        when nothing applies."""
        raise NotImplementedError

    def for_stack_call(self, stack: str, layer: int, B: int, Tq: int, Tk: int, device, dtype,
                       q_start: int | None = None, k_start: int | None = None) -> CallPlan | None:
        """Like :meth:`for_call`, for a call at ``layer`` of another attention ``stack`` (e.g.
        ``"encoder.self"``, ``"decoder.cross"``). The default: nothing applies (a plan that knows
        no stacks acts on the default stack only)."""
        return None


def check_intervention(iv: Any, shape: ModelShape) -> tuple[str, int]:
    """Validate one intervention object; return its site ``(stack, layer)``."""
    if isinstance(iv, EdgeKnockout):
        raise TypeError(
            "EdgeKnockout is the op-level selector for headint.attention(knockout=...); to knock out edges "
            "in a model, use headint.Knockout(queries, keys, layer=..., head=...)"
        )
    if not isinstance(iv, Intervention):
        raise TypeError(f"interventions must be headint.Intervention objects (Ablate, Patch, Scale, PatchQKV, Knockout "
                        f"or your own subclass); got {type(iv).__name__}")
    iv.validate(shape)
    return iv.site(shape)


class InterventionPlan(Plan):
    """Intervention objects, shared by all rows (``rows=None``) or one list per row; each
    object's ``validate(shape)`` runs here, before any model is touched."""

    def __init__(self, shape: ModelShape, shared: Sequence = (), rows: Sequence[Sequence] | None = None):
        self.shape = shape
        self.shared = [(check_intervention(iv, shape), iv) for iv in shared]
        self.rows = None if rows is None else [[(check_intervention(iv, shape), iv) for iv in r] for r in rows]
        self._cache: dict = {}

    def layers(self) -> set[int]:
        """The default stack's layers that some intervention acts on."""
        d = self.shape.default_stack
        return {l for (s, l), _ in self.shared if s == d} | {l for r in self.rows or [] for (s, l), _ in r if s == d}

    def for_call(self, layer, B, Tq, Tk, device, dtype, q_start=None, k_start=None):
        return self.for_stack_call(self.shape.default_stack, layer, B, Tq, Tk, device, dtype, q_start, k_start)

    def for_stack_call(self, stack, layer, B, Tq, Tk, device, dtype, q_start=None, k_start=None):
        q_start = Tk - Tq if q_start is None else q_start
        k_start = q_start + Tq - Tk if k_start is None else k_start
        key = (stack, layer, B, Tq, Tk, q_start, k_start, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._build((stack, layer), B, Tq, Tk, device, q_start, k_start)
        return self._cache[key]

    def _build(self, site, B, Tq, Tk, device, q_start, k_start) -> CallPlan | None:
        stack, layer = site
        if self.rows is not None and len(self.rows) != B:
            raise ValueError(f"per-row interventions were given for {len(self.rows)} rows but the batch has {B} rows")
        groups = [self.shared] if self.rows is None else [self.shared + r for r in self.rows]
        plans = []
        for i, group in enumerate(groups):
            call = AttentionCall(self.shape, layer, B, Tq, Tk, device, q_start, row=None if self.rows is None else i, stack=stack,
                                 k_start=k_start)
            for at, iv in group:
                if at == site:
                    iv.lower(call)
            plans.append(call.plan())
        if all(p.empty for p in plans):
            return None
        if len(plans) == 1:
            return plans[0]
        return _stack(plans, self.shape.layer(layer, stack), Tq, Tk, device)


def _stack(plans: list[CallPlan], s: LayerShape, Tq: int, Tk: int, device) -> CallPlan:
    """Stack single-row plans (of one layer, shape ``s``) into one batched plan."""
    H, D = s.n_heads, s.v_head_dim
    out = CallPlan()
    if any(p.head_mask is not None for p in plans):
        out.head_mask = torch.cat([p.head_mask if p.head_mask is not None else torch.ones(1, H, Tq, device=device) for p in plans])
        out.head_patch = torch.cat([p.head_patch.expand(1, H, Tq, D) if p.head_patch is not None else torch.zeros(1, H, Tq, D, device=device) for p in plans])
    if any(p.head_bias is not None for p in plans):
        out.head_bias = torch.cat([p.head_bias.expand(1, H, Tq, D) if p.head_bias is not None else torch.zeros(1, H, Tq, D, device=device) for p in plans])
    if any(p.score_scale is not None for p in plans):
        out.score_scale = torch.cat([p.score_scale if p.score_scale is not None else torch.ones(1, H, device=device) for p in plans])
    n_ko = max(len(p.knockouts) for p in plans)
    for n in range(n_ko):
        qs, ks = [], []
        for p in plans:
            if n < len(p.knockouts):
                ko = p.knockouts[n]
                qs.append(ko.queries.expand(1, H, Tq))
                ks.append(ko.keys.expand(1, H, Tk))
            else:
                qs.append(torch.zeros(1, H, Tq, dtype=torch.bool, device=device))
                ks.append(torch.zeros(1, H, Tk, dtype=torch.bool, device=device))
        out.knockouts.append(EdgeKnockout(torch.cat(qs), torch.cat(ks)))
    # q/k/v edits: row-wise, padded with "no edit" rows.
    whiches = sorted({w for p in plans for (w, _, _) in p.qkv_edits})
    for which in whiches:
        n = H if which == "q" else s.n_kv_heads
        T = Tq if which == "q" else Tk
        D = s.v_head_dim if which == "v" else s.head_dim
        sels, vals = [], []
        for p in plans:
            sel = torch.zeros(1, n, T, dtype=torch.bool, device=device)
            val = torch.zeros(1, n, T, D, device=device)
            for w, s_, v_ in p.qkv_edits:
                if w == which:
                    v_ = v_.expand(1, n, T, D).to(val.dtype)
                    s_ = s_.expand(1, n, T)
                    val = torch.where(s_[..., None], v_, val)
                    sel = sel | s_
            sels.append(sel)
            vals.append(val)
        out.qkv_edits.append((which, torch.cat(sels), torch.cat(vals)))
    return out


class TensorPlan(Plan):
    """Ready-made per-layer tensors over absolute positions (used by scans), for the layers of the
    model's default attention stack.

    ``layers[l]`` is a dict with any of: ``head_mask`` ``[B, H, T]`` (T may be 1 = all
    positions), ``head_patch`` ``[B, H, T, D]`` (or ``[1, ...]``), ``head_bias``
    ``[B, H, T, D]`` (added to the head outputs), ``score_scale`` ``[B, H]``, ``knockout``
    (:class:`~headint.ops.EdgeKnockout` with selectors over absolute query/key positions
    ``[B, H, T]``), ``qkv``: a list of ``(which, select [B, Hx, T] bool, values [B or 1, Hx,
    T, D])`` replacing queries (``which="q"``, ``Hx`` query heads, ``T`` over query positions)
    or keys/values (``"k"``/``"v"``, ``Hx`` key/value heads, ``T`` over key positions) before
    attention, after rotary embeddings; ``pattern``: ``(select [B, H, T] bool, probs [B or 1, H,
    T, T])``: the selected heads' attention probabilities at the selected queries replaced by
    ``probs`` (rows: absolute query positions, columns: absolute key positions; O(B*H*T^2)
    memory). ``T`` must cover every absolute position the model is
    run at (or be 1).
    """

    def __init__(self, layers: dict[int, dict[str, Any]]):
        self._layers = layers

    def layers(self) -> set[int]:
        return set(self._layers)

    def for_call(self, layer, B, Tq, Tk, device, dtype, q_start=None, k_start=None):
        spec = self._layers.get(layer)
        if not spec:
            return None
        q_start = Tk - Tq if q_start is None else q_start
        k_start = q_start + Tq - Tk if k_start is None else k_start

        def window(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            if x.shape[2] == 1:
                return x
            if x.shape[2] < hi or lo < 0:
                raise ValueError(f"TensorPlan tensor for layer {layer} covers {x.shape[2]} positions, the call needs {hi}")
            return x[:, :, lo:hi]

        plan = CallPlan()
        if spec.get("head_mask") is not None:
            plan.head_mask = window(spec["head_mask"], q_start, q_start + Tq)
            if spec.get("head_patch") is not None:
                plan.head_patch = window(spec["head_patch"], q_start, q_start + Tq)
        if spec.get("head_bias") is not None:
            plan.head_bias = window(spec["head_bias"], q_start, q_start + Tq)
        plan.score_scale = spec.get("score_scale")
        ko = spec.get("knockout")
        if ko is not None:
            plan.knockouts.append(EdgeKnockout(window(ko.queries, q_start, q_start + Tq), window(ko.keys, k_start, k_start + Tk)))
        for which, sel, values in spec.get("qkv") or ():
            lo, n = (q_start, Tq) if which == "q" else (k_start, Tk)
            plan.qkv_edits.append((which, window(sel, lo, lo + n), window(values, lo, lo + n)))
        if spec.get("pattern") is not None:
            sel, probs = spec["pattern"]
            if probs.shape[2] < q_start + Tq or probs.shape[3] < k_start + Tk or k_start < 0:
                raise ValueError(f"TensorPlan pattern for layer {layer} covers {list(probs.shape[2:])} positions, the call needs "
                                 f"queries up to {q_start + Tq} and keys up to {k_start + Tk}")
            plan.pattern_edits.append((window(sel, q_start, q_start + Tq), probs[:, :, q_start : q_start + Tq, k_start : k_start + Tk]))
        return None if plan.empty else plan
