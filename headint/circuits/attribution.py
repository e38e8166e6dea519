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
        m = mask.to(v.device, v.dtype)
        m = m[..., None, None] if v.dim() == 4 else m[..., None]
        out[k] = (src[k].to(v.dtype) - v) * m
    return out


def _receivers_by_layer(graph: EdgeGraph, n_layers: int, senders: set[int] | None = None) -> dict[int, list[int]]:
    """Receivers with at least one edge in scope (from ``senders`` if given), by layer (``n_layers``: logits)."""
    cols = graph.mask if senders is None else graph.mask[sorted(senders)]
    live = cols.any(0)
    out: dict[int, list[int]] = {}
    for r, rc in enumerate(graph.receivers):
        if bool(live[r]):
            out.setdefault(rc.layer, []).append(r)
    return out


RECEIVER_CHUNK = 8  # receivers whose norm vector-Jacobian products are taken at once (bounds temporaries)


def _score_layer(taps: Taps, graph: EdgeGraph, st, layer: int, recv: list[int], diffs: dict, acc: _Scores,
                 steps: int = 1, only: set[int] | None = None) -> None:
    """Score the edges into receivers ``recv`` (of ``layer``) from every sender in scope
    (``only``: these senders); ``steps`` consecutive rows per example are averaged first. The
    layer's stored gradients are freed afterwards."""
    parts = []
    for i in range(0, len(recv), RECEIVER_CHUNK):
        g = taps.receiver_grads(layer, recv[i:i + RECEIVER_CHUNK])  # [r, rows, T, d]
        if steps > 1:
            g = g.reshape(g.shape[0], g.shape[1] // steps, steps, *g.shape[2:]).mean(2)
        parts.append(g)
    taps.release(layer)
    G = parts[0] if len(parts) == 1 else torch.cat(parts)
    del parts
    col = graph.mask[:, recv]
    groups: list[tuple[list[int], Callable[[], torch.Tensor]]] = [([0], lambda: diffs["embed"][None])]
    for l in range(min(layer + 1, st.n_layers)):
        lp = st.layers[l]
        heads = [i for i, s in enumerate(graph.senders) if s.kind == "head" and s.layer == l]
        groups.append((heads, lambda l=l, lp=lp: torch.einsum("bthe,hed->hbtd", diffs[("z", l)], lp.out_matrix.detach().to(G.dtype))))
        if lp.mlp is not None:
            m = next(i for i, s in enumerate(graph.senders) if s.kind == "mlp" and s.layer == l)
            groups.append(([m], lambda l=l: diffs[("mlp", l)][None]))
    R, B, T, d = G.shape
    flat = G.reshape(R, B, T * d)
    for s_idx, make in groups:
        keep = [s for s in s_idx if (only is None or s in only) and bool(col[s].any())]
        if not keep:
            continue
        D = make()
        if D.shape[0] != len(keep):
            D = D[[s_idx.index(s) for s in keep]]
        D = D.to(G.dtype)
        per_example = torch.einsum("sbx,rbx->srb", D.reshape(len(keep), B, T * d), flat)
        per_position = torch.einsum("sbtd,rbtd->srt", D, G) if acc.positions is not None else None
        acc.add(keep, recv, per_example, per_position)


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


def _run(model, kw, taps: Taps, cb: dict, metric, clean_logits, grad: bool, cost: dict):
    with taps, torch.set_grad_enabled(grad):
        logits = logits_of(model(**kw))
        cost["forwards"] += 1
        cost["rows"] += logits.shape[0]
        if not grad:
            return logits.detach()
        if clean_logits is None and metric.needs_clean:
            clean_logits = logits.detach()  # EAP: the clean run is this run
        values = metric_values(metric, logits, cb, clean_logits)
        values.sum().backward()
        cost["backwards"] += 1
        return logits.detach()


def _chunk(model, st, graph, metric, method, steps, cb, xb, device, acc, cost) -> None:
    mask = cb["attention_mask"].to(device)
    corrupt_taps = Taps(model, st, graph, capture=True, stop=True)
    with corrupt_taps, torch.no_grad():  # sender values only: the forward ends after the last block
        model(**forward_kwargs(model, xb, device))
    cost["forwards"] += 1
    B = cb["input_ids"].shape[0]
    if method == "eap":
        taps = Taps(model, st, graph, capture=True, grads=True)
        _run(model, forward_kwargs(model, cb, device), taps, cb, metric, None, True, cost)
        diffs = _diffs(corrupt_taps.values, taps.values, mask)
        for layer, recv in sorted(_receivers_by_layer(graph, st.n_layers).items()):
            _score_layer(taps, graph, st, layer, recv, diffs, acc)
        return
    clean_taps = Taps(model, st, graph, capture=True)
    clean_logits = _run(model, forward_kwargs(model, cb, device), clean_taps, cb, metric, None, False, cost)
    diffs = _diffs(corrupt_taps.values, clean_taps.values, mask)
    rep = torch.arange(B).repeat_interleave(steps)
    big = rows(cb, rep)
    kw = forward_kwargs(model, big, device)
    big_clean = clean_logits[rep.to(clean_logits.device)]
    if method == "eap-ig":
        e_clean, e_corr = clean_taps.values["embed"], corrupt_taps.values["embed"]
        alpha = (torch.arange(steps, dtype=e_clean.dtype, device=e_clean.device) / steps).repeat(B)[:, None, None]
        e = e_corr[rep.to(e_corr.device)] + alpha * (e_clean - e_corr)[rep.to(e_corr.device)]
        taps = Taps(model, st, graph, grads=True, replace={"embed": e})
        _run(model, kw, taps, big, metric, big_clean, True, cost)
        for layer, recv in sorted(_receivers_by_layer(graph, st.n_layers).items()):
            _score_layer(taps, graph, st, layer, recv, diffs, acc, steps=steps)
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
        taps = Taps(model, st, graph, grads=True, replace={key: value})
        _run(model, kw, taps, big, metric, big_clean, True, cost)
        only = set(senders)
        for layer, recv in sorted(_receivers_by_layer(graph, st.n_layers, only).items()):
            _score_layer(taps, graph, st, layer, recv, diffs, acc, steps=steps, only=only)
