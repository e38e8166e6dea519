"""Edge-level circuits: EAP, EAP-IG, exact edge patching and ACDC on any model headint supports.

The graph and its node / edge names: :mod:`headint.circuits.graph` (``input``, ``a{l}.h{h}``,
``m{l}``, ``logits``; receivers ``a{l}.h{h}<q>``, ``<k>``, ``<v>``). Every function takes a
``transformers`` model, clean inputs (a ``[N, T]`` id tensor or a dict with ``input_ids``,
``attention_mask`` and the metric's keys, e.g. ``target`` / ``contrast``), corrupt inputs of the
same shape and a metric (a :mod:`headint.metrics` name, object or callable), and returns a
:class:`CircuitResult`.

- :func:`attribute`: EAP / EAP-IG (inputs or activations) scores of every edge
  (:mod:`.attribution`);
- :func:`edge_patching`: the exact effect of patching each edge alone (:mod:`.patching`);
  :func:`patch_edges`: the metric with any edge sets patched, one set per batch row;
- :func:`acdc`: ACDC's greedy circuit (:mod:`.acdc`);
- :meth:`CircuitResult.circuit`: a circuit from any scores (top-n, threshold, connected).
"""

from __future__ import annotations

from .acdc import acdc as _acdc
from .attribution import METHODS, edge_attribution
from .graph import EdgeGraph, graph_of
from .patching import SOURCES, patch_edges as _patch_edges
from .result import CircuitResult
from .structure import circuit_structure

__all__ = ["attribute", "edge_patching", "patch_edges", "acdc", "graph_of", "EdgeGraph", "CircuitResult",
           "circuit_structure", "METHODS", "SOURCES"]


def attribute(model, clean, corrupt, metric="logit_diff", *, method: str = "eap-ig", steps: int = 5,
              graph: EdgeGraph | None = None, per_position: bool = False, batch_size: int = 16) -> CircuitResult:
    """Scores of every edge in ``graph`` (default all) by ``method`` (``"eap"``, ``"eap-ig"`` (on
    the inputs, ``steps`` interpolation steps) or ``"eap-ig-activations"``); see
    :mod:`headint.circuits.attribution`. ``batch_size``: examples per forward (EAP-IG runs
    ``batch_size * steps`` rows)."""
    out = edge_attribution(model, clean, corrupt, metric, method=method, steps=steps, graph=graph,
                           per_position=per_position, batch_size=batch_size)
    settings = dict(method=method, steps=out["steps"], n_examples=out["n_examples"], seq_len=out["seq_len"],
                    model=type(model).__name__, per_position=per_position, batch_size=batch_size, cost=out["cost"])
    return CircuitResult(out["graph"], out["mean"], method=method, metric_name=out["metric_name"], stderr=out["stderr"],
                         positions=out.get("positions"), settings=settings)


def patch_edges(model, clean, edge_sets, metric="logit_diff", *, corrupt=None, source: str = "corrupt",
                graph: EdgeGraph | None = None, batch_size: int = 32, seed: int = 0):
    """``[K, N]`` metric values with each of the K edge sets patched (one batch row per set and
    example; see :mod:`headint.circuits.patching`)."""
    return _patch_edges(model, clean, edge_sets, metric, corrupt=corrupt, source=source, graph=graph,
                        batch_size=batch_size, seed=seed)["values"]


def edge_patching(model, clean, metric="logit_diff", *, corrupt=None, source: str = "corrupt",
                  graph: EdgeGraph | None = None, batch_size: int = 32, seed: int = 0) -> CircuitResult:
    """The exact effect of each edge alone: mean over examples of ``metric(edge patched) -
    metric(clean)``, for every edge in ``graph`` (each (edge, example) a batch row)."""
    from .graph import graph_of as _g

    g = graph or _g(model)
    out = _patch_edges(model, clean, [[i] for i in range(g.n_edges)], metric, corrupt=corrupt, source=source, graph=g,
                       batch_size=batch_size, seed=seed)
    diff = out["values"].double() - out["clean"].double()[None]
    N = diff.shape[1]
    stderr = diff.std(1) / N ** 0.5 if N > 1 else torch.full((g.n_edges,), float("nan"))
    settings = dict(method="patch", source=out["source"], n_examples=N, model=type(model).__name__, batch_size=batch_size,
                    cost=out["cost"], clean_baseline=float(out["clean"].mean()))
    return CircuitResult(g, diff.mean(1).float(), method="patch", metric_name=_metric_name(metric), stderr=stderr.float(),
                         settings=settings)


def acdc(model, clean, corrupt=None, *, threshold: float, criterion="kl", source: str = "corrupt", maximize=None,
         abs_value: bool = False, graph: EdgeGraph | None = None, batch_size: int = 256, seed: int = 0,
         progress: bool = False) -> CircuitResult:
    """ACDC's circuit (see :mod:`headint.circuits.acdc`): ``in_circuit`` holds the edges kept;
    ``scores`` the criterion's change when each edge was tried."""
    out = _acdc(model, clean, corrupt, threshold=threshold, criterion=criterion, source=source, maximize=maximize,
                abs_value=abs_value, graph=graph, batch_size=batch_size, seed=seed, progress=progress)
    settings = dict(method="acdc", threshold=float(threshold), criterion=out["metric_name"], source=source,
                    n_examples=out["n_examples"], circuit_value=out["circuit_value"], full_value=out["full_value"],
                    model=type(model).__name__, batch_size=batch_size, cost=out["cost"])
    return CircuitResult(out["graph"], out["effect"], method="acdc", metric_name=out["metric_name"],
                         in_circuit=out["in_circuit"], settings=settings)


def _metric_name(metric) -> str:
    from ..metrics import as_metric

    return as_metric(metric).name


import torch  # noqa: E402  (used by edge_patching)
