"""Plans: interventions turned into the per-layer tensors the attention operator takes.

A plan answers one question for the attention function: for this ``layer`` and a call
with ``B`` rows, ``Tq`` queries and ``Tk`` keys (queries at absolute positions
``Tk - Tq .. Tk - 1``), which ``head_mask``/``head_patch``/``knockout``/``score_scale``
and which q/k/v edits apply? (:meth:`Plan.for_call` returns a :class:`CallPlan`.)

- :class:`InterventionPlan` compiles intervention objects, either shared by every row
  or one list per row (row ``i`` of the batch gets ``rows[i]``).
- :class:`TensorPlan` carries ready-made per-row tensors over absolute positions; scans
  build these directly for thousands of variants at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .interventions import Ablate, Patch, PatchQKV, Scale
from .ops.knockout import Knockout


@dataclass(frozen=True)
class ModelShape:
    """Attention geometry of a model: layers, query heads, key/value heads, head dim."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = cfg.num_hidden_layers
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        return cls(int(n_layers), int(n_heads), int(n_kv), int(head_dim))


@dataclass
class CallPlan:
    """Operator arguments for one attention call (``Bp`` is 1 or the batch size).

    head_mask ``[Bp, H, Tq]`` float32, head_patch ``[Bp, H, Tq, D]`` float32 (or None: zeros),
    score_scale ``[Bp, H]``, knockouts: op-level :class:`Knockout` list,
    qkv_edits: ``(which, select [Bp, Hx, T] bool, values [Bs, Hx, T, D])`` applied before attention.
    output: the call's result ``[B, H, Tq, D]`` when the plan already knows it (a scan's variant
    whose inputs to this layer are the clean run's: the clean head outputs blended with the
    replacement); the attention function then returns it without computing attention.
    """

    head_mask: torch.Tensor | None = None
    head_patch: torch.Tensor | None = None
    score_scale: torch.Tensor | None = None
    knockouts: list = field(default_factory=list)
    qkv_edits: list = field(default_factory=list)
    output: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.head_mask is None and self.score_scale is None and not self.knockouts and not self.qkv_edits and self.output is None


class Plan:
    """Base class: what to do at each layer."""

    def layers(self) -> set[int]:
        raise NotImplementedError

    def for_call(self, layer: int, B: int, Tq: int, Tk: int, device, dtype, q_start: int | None = None) -> CallPlan | None:
        """Tensors for a call whose queries sit at absolute positions ``q_start .. q_start+Tq-1``
        (default ``Tk - Tq``) and whose keys end with the last query."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Selectors


def _heads(head: Any, n: int, what: str, layer: int) -> list[int]:
    if head is None:
        return list(range(n))
    hs = [head] if isinstance(head, int) else list(head)
    for h in hs:
        if not isinstance(h, int) or isinstance(h, bool):
            raise TypeError(f"{what} head must be an int, a list of ints or None; got {head!r}")
        if not 0 <= h < n:
            raise ValueError(f"{what} head {h} out of range at layer {layer}: the model has {n} {what} heads (0..{n - 1})")
    return hs


def _head_select(heads: list[int], n: int, device) -> torch.Tensor:
    sel = torch.zeros(n, dtype=torch.bool, device=device)
    sel[heads] = True
    return sel


def _positions(pos: Any, abs_pos: torch.Tensor, name: str) -> torch.Tensor:
    """Bool ``[Bs, len(abs_pos)]`` (Bs 1 or the selector's batch): is each absolute position selected."""
    if pos is None:
        return torch.ones(1, abs_pos.numel(), dtype=torch.bool, device=abs_pos.device)
    if isinstance(pos, torch.Tensor) and pos.dtype == torch.bool:
        if pos.dim() not in (1, 2):
            raise ValueError(f"{name} as a bool tensor must be [T] or [B, T], got shape {list(pos.shape)}")
        p = pos.to(abs_pos.device).reshape(-1, pos.shape[-1])
        T = p.shape[-1]
        inside = abs_pos < T
        out = torch.zeros(p.shape[0], abs_pos.numel(), dtype=torch.bool, device=abs_pos.device)
        out[:, inside] = p[:, abs_pos[inside]]
        return out
    if isinstance(pos, int):
        pos = [pos]
    if isinstance(pos, torch.Tensor):
        pos = pos.tolist()
    idx = list(pos)
    for p in idx:
        if not isinstance(p, int) or p < 0:
            raise ValueError(f"{name} must be non-negative ints (absolute token positions), got {p!r}")
    return torch.isin(abs_pos, torch.tensor(idx, dtype=abs_pos.dtype, device=abs_pos.device))[None]


# ---------------------------------------------------------------------------------------------
# Values


def _z_source(x: Any, layer: int, what: str):
    """A recorded head output for ``layer`` as ``[Bs, T, H, D]`` (T may be 1 = every position)."""
    from .record import ActivationCache

    if isinstance(x, ActivationCache):
        return x.get("z", layer)
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{what} must be an ActivationCache or a tensor, got {type(x).__name__}")


def _mean_value(x: Any, layer: int) -> torch.Tensor:
    from .record import ActivationCache

    if isinstance(x, ActivationCache):
        return x.mean_z(layer)[None]  # [1, T, H, D]
    if isinstance(x, torch.Tensor):
        if x.dim() == 2:
            return x[None, None]  # [H, D] -> every position
        if x.dim() == 3:
            return x[None]
        raise ValueError(f"Ablate(kind='mean') value for layer {layer} has shape {list(x.shape)}; expected [H, D] or [T, H, D]")
    raise TypeError("Ablate(kind='mean') needs value=: an ActivationCache from headint.record or a mean tensor [H, D] / [T, H, D]")


def _gather_positions(x: torch.Tensor, abs_pos: torch.Tensor, what: str) -> torch.Tensor:
    """Index dim 1 (positions) of ``x [Bs, T, ...]`` at ``abs_pos``; T == 1 broadcasts."""
    T = x.shape[1]
    if T == 1:
        return x.expand(x.shape[0], abs_pos.numel(), *x.shape[2:])
    if int(abs_pos.max()) >= T or int(abs_pos.min()) < 0:
        shape = "" if "shape" in what else f" (shape {list(x.shape)})"
        raise ValueError(f"{what}{shape} covers {T} positions but the model is at positions up to {int(abs_pos.max())}")
    return x[:, abs_pos.to(x.device)]


# ---------------------------------------------------------------------------------------------


class InterventionPlan(Plan):
    """Intervention objects, shared by all rows (``rows=None``) or one list per row."""

    def __init__(self, shape: ModelShape, shared: Sequence = (), rows: Sequence[Sequence] | None = None):
        self.shape = shape
        self.shared = list(shared)
        self.rows = None if rows is None else [list(r) for r in rows]
        self._cache: dict = {}
        for iv in self._all():
            self._validate(iv)

    def _all(self):
        yield from self.shared
        for r in self.rows or []:
            yield from r

    def _validate(self, iv) -> None:
        s = self.shape
        kinds = (Ablate, Patch, Scale, Knockout, PatchQKV)
        if not isinstance(iv, kinds):
            raise TypeError(f"interventions must be {', '.join(k.__name__ for k in kinds)}; got {type(iv).__name__}")
        if not isinstance(iv.layer, int) or isinstance(iv.layer, bool):
            raise TypeError(f"{type(iv).__name__}.layer must be an int, got {iv.layer!r}")
        if not 0 <= iv.layer < s.n_layers:
            raise ValueError(f"{type(iv).__name__}: layer {iv.layer} out of range; the model has {s.n_layers} layers (0..{s.n_layers - 1})")
        if isinstance(iv, PatchQKV):
            if iv.which not in ("q", "k", "v"):
                raise ValueError(f"PatchQKV.which must be 'q', 'k' or 'v', got {iv.which!r}")
            n = s.n_heads if iv.which == "q" else s.n_kv_heads
            _heads(iv.head, n, "query" if iv.which == "q" else "key/value", iv.layer)
            if iv.source is None:
                raise ValueError("PatchQKV needs source=: an ActivationCache or a tensor [B, H, T, D]")
        else:
            _heads(iv.head, s.n_heads, "query", iv.layer)
        if isinstance(iv, Ablate):
            if iv.kind not in ("zero", "mean"):
                raise ValueError(f"Ablate.kind must be 'zero' or 'mean', got {iv.kind!r}")
            if iv.kind == "mean":
                v = _mean_value(iv.value, iv.layer)
                if tuple(v.shape[-2:]) != (s.n_heads, s.head_dim):
                    seen = list(iv.value.shape) if isinstance(iv.value, torch.Tensor) else list(v.shape[1:])
                    raise ValueError(
                        f"Ablate mean value for layer {iv.layer} has shape {seen}; expected [{s.n_heads}, {s.head_dim}] or [T, {s.n_heads}, {s.head_dim}] ([H, D] or [T, H, D])"
                    )
        if isinstance(iv, Patch):
            z = _z_source(iv.source, iv.layer, "Patch.source")
            if z.dim() != 4 or tuple(z.shape[2:]) != (s.n_heads, s.head_dim):
                raise ValueError(f"Patch.source for layer {iv.layer} has shape {list(z.shape)}; expected [B, T, {s.n_heads}, {s.head_dim}]")
        if isinstance(iv, Scale) and iv.target not in ("output", "scores"):
            raise ValueError(f"Scale.target must be 'output' or 'scores', got {iv.target!r}")
        if isinstance(iv, Scale) and iv.target == "scores" and iv.positions is not None:
            raise ValueError("Scale(target='scores') applies to all positions; positions must be None")

    def layers(self) -> set[int]:
        return {iv.layer for iv in self._all()}

    def for_call(self, layer, B, Tq, Tk, device, dtype, q_start=None):
        q_start = Tk - Tq if q_start is None else q_start
        key = (layer, B, Tq, Tk, q_start, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._build(layer, B, Tq, Tk, device, dtype, q_start)
        return self._cache[key]

    def _build(self, layer, B, Tq, Tk, device, dtype, q_start) -> CallPlan | None:
        if self.rows is not None and len(self.rows) != B:
            raise ValueError(f"per-row interventions were given for {len(self.rows)} rows but the batch has {B} rows")
        groups = [self.shared] if self.rows is None else [self.shared + r for r in self.rows]
        plans = [self._build_rows([iv for iv in g if iv.layer == layer], layer, B, Tq, Tk, device, q_start, per_row=self.rows is not None, row=i)
                 for i, g in enumerate(groups)]
        if all(p.empty for p in plans):
            return None
        if len(plans) == 1:
            return plans[0]
        return _stack(plans, self.shape, Tq, Tk, device)

    def _build_rows(self, ivs, layer, B, Tq, Tk, device, q_start: int, per_row: bool, row: int) -> CallPlan:
        s = self.shape
        H, D = s.n_heads, s.head_dim
        qpos = torch.arange(q_start, q_start + Tq, device=device)
        kpos = torch.arange(q_start + Tq - Tk, q_start + Tq, device=device)  # a sliding-window cache keeps the last Tk
        plan = CallPlan()

        def pick_row(x: torch.Tensor, what: str = "source") -> torch.Tensor:
            # a per-batch source: batch 1 broadcasts; batch B gives row i to row i
            if x.shape[0] not in (1, B):
                raise ValueError(f"{what} for layer {layer} has batch {x.shape[0]} (shape {list(x.shape)}), but the model runs {B} rows; expected 1 or {B}")
            if per_row and x.shape[0] == B and B > 1:
                return x[row : row + 1]
            return x

        m = p = None
        for iv in ivs:
            if isinstance(iv, Knockout):
                hsel = _head_select(_heads(iv.head, H, "query", layer), H, device)
                qs = pick_row(_positions(iv.queries, qpos, "Knockout.queries"))
                ks = pick_row(_positions(iv.keys, kpos, "Knockout.keys"))
                plan.knockouts.append(Knockout(hsel[None, :, None] & qs[:, None, :], ks[:, None, :]))
                continue
            if isinstance(iv, PatchQKV):
                n = H if iv.which == "q" else s.n_kv_heads
                heads = _heads(iv.head, n, "head", layer)
                pos = qpos if iv.which == "q" else kpos
                from .record import ActivationCache

                src = iv.source.get(iv.which, layer) if isinstance(iv.source, ActivationCache) else iv.source
                if src.dim() != 4 or src.shape[1] != n or src.shape[3] != D:
                    raise ValueError(f"PatchQKV(which={iv.which!r}).source for layer {layer} has shape {list(src.shape)}; expected [B, {n}, T, {D}]")
                vals = _gather_positions(pick_row(src, "PatchQKV.source").transpose(1, 2), pos, f"PatchQKV.source ({iv.which}, shape {list(src.shape)})").transpose(1, 2)
                sel = _head_select(heads, n, device)[None, :, None] & pick_row(_positions(iv.positions, pos, "positions"))[:, None, :]
                plan.qkv_edits.append((iv.which, sel, vals.to(device)))
                continue
            if isinstance(iv, Scale) and iv.target == "scores":
                if plan.score_scale is None:
                    plan.score_scale = torch.ones(1, H, device=device)
                f = torch.ones(H, device=device)
                f[_heads(iv.head, H, "query", layer)] = float(iv.factor)
                plan.score_scale = plan.score_scale * f
                continue
            # Output blends: out = m * attn + (1 - m) * p, composed in order.
            if m is None:
                m = torch.ones(1, H, Tq, device=device)
                p = torch.zeros(1, H, Tq, D, device=device)
            sel = _head_select(_heads(iv.head, H, "query", layer), H, device)[None, :, None] & pick_row(
                _positions(iv.positions, qpos, "positions")
            )[:, None, :]
            if isinstance(iv, Scale):
                f = float(iv.factor)
                new_m = f * m
                denom = 1 - new_m
                new_p = _safe_div(f * (1 - m)[..., None] * p, denom[..., None])
                m = torch.where(sel, new_m, m)
                p = torch.where(sel[..., None], new_p, p)
                continue
            if isinstance(iv, Ablate) and iv.kind == "zero":
                value = torch.zeros(1, Tq, H, D, device=device)
            elif isinstance(iv, Ablate):
                mv = _mean_value(iv.value, layer)
                seen = list(iv.value.shape) if isinstance(iv.value, torch.Tensor) else list(mv.shape[1:])
                value = _gather_positions(mv.to(device), qpos, f"Ablate mean value (shape {seen})")
            else:
                z = _z_source(iv.source, layer, "Patch.source")
                value = _gather_positions(pick_row(z, "Patch.source").to(device), qpos, f"Patch.source (shape {list(z.shape)})")
            value = value.transpose(1, 2).float()  # [Bs, H, Tq, D]
            m = torch.where(sel, torch.zeros_like(m), m)
            p = torch.where(sel[..., None], value, p)
        if m is not None:
            plan.head_mask, plan.head_patch = m, p
        return plan


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a / torch.where(b != 0, b, torch.ones_like(b))


def _stack(plans: list[CallPlan], s: ModelShape, Tq: int, Tk: int, device) -> CallPlan:
    """Stack single-row plans into one batched plan."""
    H, D = s.n_heads, s.head_dim
    out = CallPlan()
    if any(p.head_mask is not None for p in plans):
        out.head_mask = torch.cat([p.head_mask if p.head_mask is not None else torch.ones(1, H, Tq, device=device) for p in plans])
        out.head_patch = torch.cat([p.head_patch.expand(1, H, Tq, D) if p.head_patch is not None else torch.zeros(1, H, Tq, D, device=device) for p in plans])
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
        out.knockouts.append(Knockout(torch.cat(qs), torch.cat(ks)))
    # q/k/v edits: row-wise, padded with "no edit" rows.
    whiches = sorted({w for p in plans for (w, _, _) in p.qkv_edits})
    for which in whiches:
        n = H if which == "q" else s.n_kv_heads
        T = Tq if which == "q" else Tk
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
    """Ready-made per-layer tensors over absolute positions (used by scans).

    ``layers[l]`` is a dict with any of: ``head_mask`` ``[B, H, T]`` (T may be 1 = all
    positions), ``head_patch`` ``[B, H, T, D]`` (or ``[1, ...]``), ``score_scale``
    ``[B, H]``, ``knockout`` (op-level :class:`Knockout` with selectors over absolute
    query/key positions ``[B, H, T]``). ``T`` must cover every absolute position the
    model is run at (or be 1).
    """

    def __init__(self, layers: dict[int, dict[str, Any]]):
        self._layers = layers

    def layers(self) -> set[int]:
        return set(self._layers)

    def for_call(self, layer, B, Tq, Tk, device, dtype, q_start=None):
        spec = self._layers.get(layer)
        if not spec:
            return None
        q_start = Tk - Tq if q_start is None else q_start
        k_start = q_start + Tq - Tk

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
        plan.score_scale = spec.get("score_scale")
        ko = spec.get("knockout")
        if ko is not None:
            plan.knockouts.append(Knockout(window(ko.queries, q_start, q_start + Tq), window(ko.keys, k_start, k_start + Tk)))
        return None if plan.empty else plan
