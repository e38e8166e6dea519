"""Edge attribution: EAP and EAP-IG scores for every edge of the graph.

Definitions (``a_u`` a sender's output, ``x_v`` receiver ``v``'s own copy of its input, the
pre-norm residual stream; ``M`` the metric; scores are means over examples of sums over
positions, or per position with ``per_position=True``):

- ``"eap"`` (edge attribution patching, Syed et al. 2023): ``(a_u' - a_u) . dM/dx_v`` at the
  clean run, ``a_u'`` the corrupt run's value. One forward over the corrupt inputs (no graph)
  and one forward + one backward over the clean inputs.
- ``"eap-ig"`` (EAP with integrated gradients on the inputs, Hanna et al. 2024, "EAP-IG-inputs"):
  the gradient is averaged over ``steps`` runs whose input embedding is ``e' + (k / steps)(e - e')``
  for ``k = 0 .. steps - 1`` (``e``/``e'`` the clean/corrupt embeddings), as in Hanna et al.'s
  implementation. The steps of an example are rows of one batch.
- ``"eap-ig-activations"`` (integrated gradients on activations, as in Marks et al. 2024 and the
  MIB benchmark's EAP-IG-activations): for each sender group (the input embedding, the heads of
  one layer, one MLP) the group's output is set to ``a' + (k / steps)(a - a')`` for ``k = 1 ..
  steps`` and the gradients at every later receiver are averaged; the edges *from that group*
  are scored with them. (Hanna et al.'s code averages every receiver's gradient over the runs of
  all groups instead.)

All three are read without per-receiver copies of the residual stream (see
:mod:`headint.circuits.taps`); an edge's score is exact against an implementation that does
build them (``tests/circuit_oracle.py``). A score estimates the metric change when the edge
alone carries its corrupt value (noising); positive means the metric goes up.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .graph import EdgeGraph
from .inputs import forward_kwargs, logits_of, metric_values, paired, resolve_metric, rows
from .structure import circuit_structure
from .taps import Taps

METHODS = ("eap", "eap-ig", "eap-ig-activations")


class _Scores:
    """Running sums of per-example edge scores: ``total`` / ``squares`` ``[S, R]`` and, per
    position, ``positions`` ``[S, R, T]``."""

    def __init__(self, graph: EdgeGraph, T: int, per_position: bool):
        S, R = len(graph.senders), len(graph.receivers)
        self.total = torch.zeros(S, R, dtype=torch.float64)
        self.squares = torch.zeros(S, R, dtype=torch.float64)
        self.positions = torch.zeros(S, R, T, dtype=torch.float64) if per_position else None
        self.per_example: list[torch.Tensor] = []

    def add(self, s_idx: list[int], r_idx: list[int], per_example: torch.Tensor, per_position: torch.Tensor | None) -> None:
        """``per_example`` ``[len(s), len(r), B]`` (summed over positions); ``per_position``
        ``[len(s), len(r), T]`` (summed over examples) when positions are kept."""
        per_ex = per_example.double().cpu()
        si, ri = torch.tensor(s_idx)[:, None], torch.tensor(r_idx)[None, :]
        self.total[si, ri] += per_ex.sum(-1)
        self.squares[si, ri] += (per_ex ** 2).sum(-1)
        if self.positions is not None:
            self.positions[si, ri] += per_position.double().cpu()


def _diffs(src: dict, base: dict, mask: torch.Tensor) -> dict:
    """Sender output differences ``src - base``, zero at padding positions."""
    out = {}
    for k, v in base.items():
        out[k] = _mask_(src[k].to(v.dtype) - v, mask)
    return out


def _mask_(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``v`` (``[B, T, ...]``, owned) zeroed in place at padding positions (``mask`` ``[B, T]``)."""
    if not bool(mask.all()):
        m = mask.to(v.device, v.dtype)
        v.mul_(m.reshape(*m.shape, *([1] * (v.dim() - 2))))
    return v


class _Scorer:
    """The gradient sink of one backward (:class:`~headint.circuits.taps.Taps` ``grads=``).

    Receivers' input gradients ``G`` ``[r, rows, T, d]`` arrive during the backward, a chunk at a
    time, layer by layer from the last. They are buffered until their layer is complete (or the
    buffer reaches half the ``budget``) and then scored against every sender in scope and dropped:
    no receiver gradient outlives its layer, and a sender layer's head writes (``[H, B, T, d]``,
    a few heads at a time within the other half of the budget) are built once per flush.
    ``budget`` (elements) is set by :func:`_backward` to the size of the logits: the gradient a
    plain backward starts with, freed before any receiver's gradient arrives, so scoring does not
    raise the backward's peak by more than that.

    ``diffs``: the sender differences ``corrupt - clean`` (zero at padding), ``{"embed": [B, T, d],
    ("z", l): [B, T, H, Dv], ("mlp", l): [B, T, d]}``; ``steps`` consecutive gradient rows per
    example are averaged first (EAP-IG); ``only``: score the edges from these senders only;
    ``want``: the receivers expected (a layer is complete when all of its have arrived)."""

    def __init__(self, graph: EdgeGraph, st, diffs: dict | None, acc: _Scores, steps: int = 1, only: set[int] | None = None):
        self.graph, self.st, self.diffs, self.acc, self.steps = graph, st, diffs, acc, steps
        self.allowed = torch.ones(len(graph.senders), dtype=torch.bool)
        if only is not None:
            self.allowed[:] = False
            self.allowed[sorted(only)] = True
        self.want = (graph.mask & self.allowed[:, None]).any(0).nonzero()[:, 0].tolist()
        self.left: dict[int, int] = {}
        for r in self.want:
            layer = graph.receivers[r].layer
            self.left[layer] = self.left.get(layer, 0) + 1
        self.heads = {l: [i for i, s in enumerate(graph.senders) if s.kind == "head" and s.layer == l] for l in range(st.n_layers)}
        self.mlp = {s.layer: i for i, s in enumerate(graph.senders) if s.kind == "mlp"}
        self.budget = 0
        self.pending: list[tuple[int, list[int], torch.Tensor]] = []
        self.pending_size = 0

    def __call__(self, layer: int, recv: list[int], G: torch.Tensor) -> None:
        if self.pending and self.pending[-1][0] != layer:
            self.flush()
        if self.steps > 1:
            G = G.reshape(G.shape[0], G.shape[1] // self.steps, self.steps, *G.shape[2:]).mean(2)
        self.pending.append((layer, recv, G))
        self.pending_size += G.numel()
        self.left[layer] -= len(recv)
        if self.left[layer] <= 0 or 2 * self.pending_size >= self.budget:
            self.flush()

    def flush(self) -> None:
        """Score the buffered receivers (all of one layer) and drop their gradients."""
        if not self.pending:
            return
        layer = self.pending[0][0]
        recv = [r for _, rs, _ in self.pending for r in rs]
        Gs = [G for _, _, G in self.pending]
        self.pending, self.pending_size = [], 0
        ok = self.graph.mask[:, recv].any(1) & self.allowed  # senders with an edge into the buffered receivers
        if bool(ok[0]):
            self._add([0], self.diffs["embed"][None], recv, Gs)
        for l in range(min(layer + 1, self.st.n_layers)):
            heads = [h for h, s in enumerate(self.heads[l]) if bool(ok[s])]
            if heads:
                W = self.st.layers[l].out_matrix.detach()
                dz = self.diffs[("z", l)]
                B, T = dz.shape[:2]
                per = max(1, self.budget // (2 * B * T * W.shape[-1]))  # heads whose writes fit in half the budget
                for c in range(0, len(heads), per):
                    hs = heads[c:c + per]
                    D = torch.einsum("bthe,hed->hbtd", dz[:, :, hs].to(Gs[0].dtype), W[hs].to(Gs[0].dtype))  # [hs, B, T, d]
                    self._add([self.heads[l][h] for h in hs], D, recv, Gs)
                    del D
            m = self.mlp.get(l)
            if m is not None and bool(ok[m]):
                self._add([m], self.diffs[("mlp", l)][None], recv, Gs)

    def _add(self, s_idx: list[int], D: torch.Tensor, recv: list[int], Gs: list[torch.Tensor]) -> None:
        """Scores of the edges ``s_idx`` x ``recv`` from the sender writes ``D`` ``[s, B, T, d]``
        and the receivers' gradients ``Gs`` (``[r_i, B, T, d]`` each, ``recv`` in order)."""
        s, B = D.shape[0], D.shape[1]
        D = D.to(Gs[0].dtype)
        flat = D.reshape(s, B, -1)  # views of contiguous tensors: one matrix product per example, no copies
        per_example = torch.cat([torch.stack([flat[:, b] @ G.reshape(G.shape[0], B, -1)[:, b].t() for b in range(B)], -1)
                                 for G in Gs], 1)
        per_position = None
        if self.acc.positions is not None:
            per_position = torch.cat([torch.einsum("sbtd,rbtd->srt", D, G) for G in Gs], 1)
        self.acc.add(s_idx, recv, per_example, per_position)


def edge_attribution(model, clean, corrupt, metric="logit_diff", *, method: str = "eap", steps: int = 5,
                     graph: EdgeGraph | None = None, per_position: bool = False, batch_size: int = 16,
                     progress: bool = False) -> dict:
    """Scores of every edge in ``graph`` (default: the model's full graph). Returns a dict with
    ``graph``, ``mean`` ``[E]``, ``stderr`` ``[E]``, ``positions`` ``[E, T]`` (per_position),
    ``n_examples`` and the runs' cost; :func:`headint.circuits.attribute` wraps it in a
    :class:`~headint.circuits.CircuitResult`. See the module docstring for the methods."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if corrupt is None:
        raise ValueError(f"method {method!r} needs corrupt= inputs (the sender values an edge would carry)")
    metric = resolve_metric(metric)
    st = circuit_structure(model)
    full = EdgeGraph(st.n_layers, st.n_heads, st.n_kv_heads, st.has_mlp, st.parallel)
    if graph is None:
        graph = full
    elif not isinstance(graph, EdgeGraph) or graph.to_dict() != full.to_dict():
        raise ValueError("graph must be an EdgeGraph of this model (headint.circuits.graph_of(model), restricted)")
    clean_b, corrupt_b = paired(clean, corrupt)
    N, T = clean_b["input_ids"].shape
    device = next(model.parameters()).device
    acc = _Scores(graph, T, per_position)
    cost = {"forwards": 0, "backwards": 0, "rows": 0}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for start in range(0, N, batch_size):
            idx = torch.arange(start, min(N, start + batch_size))
            cb, xb = rows(clean_b, idx), rows(corrupt_b, idx)
            _chunk(model, st, graph, metric, method, steps, cb, xb, device, acc, cost)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, t in training:
            m.training = t
    idx = graph.mask.nonzero()
    mean = acc.total[idx[:, 0], idx[:, 1]] / N
    var = (acc.squares[idx[:, 0], idx[:, 1]] / N - mean ** 2).clamp_min(0) * (N / max(N - 1, 1))
    out = dict(graph=graph, mean=mean.float(), stderr=(var / N).sqrt().float() if N > 1 else torch.full_like(mean, float("nan")).float(),
               n_examples=int(N), seq_len=int(T), metric_name=metric.name, cost=cost, method=method,
               steps=steps if method != "eap" else None)
    if per_position:
        out["positions"] = (acc.positions[idx[:, 0], idx[:, 1]] / N).float()
    return out


def _logits(model, kw, taps: Taps, cost: dict) -> torch.Tensor:
    """One forward without gradients under ``taps``; the logits."""
    with taps, torch.no_grad():
        logits = logits_of(model(**kw)).detach()
    cost["forwards"] += 1
    cost["rows"] += logits.shape[0]
    return logits


def _backward(model, kw, taps: Taps, batch: dict, metric, clean_logits, cost: dict, ready: Callable[[], None] | None = None) -> None:
    """A forward and a backward of the summed metric under ``taps``, whose ``grads`` sink (a
    :class:`_Scorer`) scores the edges during the backward. The logits are dropped before the
    backward (the metric keeps what its own backward needs) and their size is the scorer's
    budget; ``ready`` runs between the forward and the backward."""
    with taps, torch.enable_grad():
        logits = logits_of(model(**kw))
        cost["forwards"] += 1
        cost["rows"] += logits.shape[0]
        if clean_logits is None and metric.needs_clean:
            clean_logits = logits.detach()  # EAP: the clean run is this run
        total = metric_values(metric, logits, batch, clean_logits).sum()
        taps.grads.budget = logits.numel()
        del logits, clean_logits
        if ready is not None:
            ready()
        total.backward()
        taps.grads.flush()  # receivers of a layer some of whose gradients never arrived (zero)
        cost["backwards"] += 1


def _chunk(model, st, graph, metric, method, steps, cb, xb, device, acc, cost) -> None:
    mask = cb["attention_mask"].to(device).bool()
    corrupt_taps = Taps(model, st, graph, capture=True, stop=True)
    with corrupt_taps, torch.no_grad():  # sender values only: the forward ends after the last block
        model(**forward_kwargs(model, xb, device))
    cost["forwards"] += 1
    B = cb["input_ids"].shape[0]
    if method == "eap":
        # the clean run turns the corrupt values into differences as it meets them (no clean copy
        # is kept); every receiver is scored during the backward as its gradient completes
        scorer = _Scorer(graph, st, None, acc)
        taps = Taps(model, st, graph, grads=scorer, diff_from=corrupt_taps.values)
        scorer.diffs = taps.values

        def ready():
            for v in taps.values.values():
                _mask_(v, mask)
        _backward(model, forward_kwargs(model, cb, device), taps, cb, metric, None, cost, ready)
        return
    clean_taps = Taps(model, st, graph, capture=True)
    clean_logits = _logits(model, forward_kwargs(model, cb, device), clean_taps, cost)
    diffs = _diffs(corrupt_taps.values, clean_taps.values, mask)
    rep = torch.arange(B).repeat_interleave(steps)
    big = rows(cb, rep)
    kw = forward_kwargs(model, big, device)
    big_clean = clean_logits[rep.to(clean_logits.device)] if metric.needs_clean else None
    del clean_logits
    if method == "eap-ig":
        e_clean, e_corr = clean_taps.values["embed"], corrupt_taps.values["embed"]
        del clean_taps, corrupt_taps
        alpha = (torch.arange(steps, dtype=e_clean.dtype, device=e_clean.device) / steps).repeat(B)[:, None, None]
        r = rep.to(e_corr.device)
        e = e_corr[r] + alpha * (e_clean - e_corr)[r]
        del e_clean, e_corr
        taps = Taps(model, st, graph, grads=_Scorer(graph, st, diffs, acc, steps=steps), replace={"embed": e})
        del e
        _backward(model, kw, taps, big, metric, big_clean, cost)
        return
    # eap-ig-activations: one batch of B * steps rows per sender group
    groups = [("embed", [0])]
    for l, lp in enumerate(st.layers):
        groups.append((("z", l), [i for i, s in enumerate(graph.senders) if s.kind == "head" and s.layer == l]))
        if lp.mlp is not None:
            groups.append((("mlp", l), [i for i, s in enumerate(graph.senders) if s.kind == "mlp" and s.layer == l]))
    for key, senders in groups:
        if not bool(graph.mask[senders].any()):
            continue
        a, a_corr = clean_taps.values[key], corrupt_taps.values[key]
        shape = [1] * (a.dim() - 1)
        alpha = (torch.arange(1, steps + 1, dtype=a.dtype, device=a.device) / steps).repeat(B).reshape(-1, *shape)
        r = rep.to(a.device)
        value = a_corr[r] + alpha * (a - a_corr)[r]
        only = set(senders)
        scorer = _Scorer(graph, st, diffs, acc, steps=steps, only=only)
        taps = Taps(model, st, graph, grads=scorer, want=scorer.want, replace={key: value})
        del value
        _backward(model, kw, taps, big, metric, big_clean, cost)
