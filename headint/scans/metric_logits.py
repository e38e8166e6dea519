"""The logits a scan computes for its metric, and the probe that finds out how few will do.

A scan unembeds as little as the metric reads:

- a metric that declares ``position="last"`` gets the final hidden state of each row's last real
  token unembedded, and only for its ``token_ids`` when it names them (:func:`restricted_logits`:
  ``[R, K]`` for a logit difference instead of ``[R, T, V]``), where the model's own logits are
  the unembedding of its base model's output (checked on the clean run);
- a callable on full logits (:class:`~headint.metrics.CallableMetric`, position ``"all"``) is
  probed on the base runs (:func:`last_position_form`); one that reads only the last real
  token's logits is then fed those alone (:class:`LastPositionOf`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..metrics import CallableMetric, Metric, _batch_mask, _last_logits, last_positions, select_logits


def restricted_logits(metric: Metric, hidden: torch.Tensor, rows: dict, start: int, unembed: nn.Module) -> torch.Tensor:
    """The logits ``metric`` reads (its layout, see :mod:`headint.metrics`) from final hidden
    states ``hidden [R, T - start, d]`` of tokens ``start ..`` of ``rows``: for a last-position
    metric only the last real token is unembedded (only the ``token_ids`` columns when given)."""
    last = (last_positions(rows["attention_mask"]) - start).clamp_min(0)
    if metric.position == "last":
        h = hidden[torch.arange(hidden.shape[0]), last]  # [R, d]: only the metric's position is unembedded
        ids = metric.token_ids(rows)
        W = unembed.weight
        b = getattr(unembed, "bias", None)
        if ids is None:
            return torch.nn.functional.linear(h, W, b)
        logits = torch.einsum("rd,rkd->rk", h, W[ids])  # only the K ids the metric reads
        return logits + b[ids] if b is not None else logits
    return model_logits(metric, unembed(hidden), rows, start)


def model_logits(metric: Metric, logits: torch.Tensor, rows: dict, start: int) -> torch.Tensor:
    """The logits ``metric`` reads from the model's own logits ``[R, T - start, V]`` of tokens
    ``start ..`` of ``rows`` (position ``"all"``: all of them)."""
    if metric.position == "all":
        return logits
    last = (last_positions(rows["attention_mask"]) - start).clamp_min(0)
    x = logits[torch.arange(logits.shape[0]), last]
    ids = metric.token_ids(rows)
    return x if ids is None else x.gather(1, ids)


LAST_FORMS = ("single", "expanded")


class LastPositionOf(Metric):
    """A position-``"all"`` metric fed only the logits at each example's last real token.

    ``inner`` takes ``[B, T, V]`` logits; this wrapper takes the last-position layout ``[B, V]``
    (so a scan unembeds one position per row) and hands ``inner``

    - ``form="single"``: ``[B, 1, V]``, the last real token's logits as a length-1 sequence;
    - ``form="expanded"``: ``[B, T, V]``, a zero-copy view repeating them at every position
      (``T`` from ``batch['input_ids']``), for callables that need the full shape.

    Only valid for an ``inner`` whose values depend on nothing but those logits:
    :func:`last_position_form` checks that on a base run before a scan uses it.
    ``clean_logits`` (``needs_clean``) are treated the same way.
    """

    position = "last"

    def __init__(self, inner: Metric, form: str = "single"):
        if not isinstance(inner, Metric):
            raise TypeError(f"inner must be a Metric, got {type(inner).__name__}")
        if inner.position != "all":
            raise ValueError(f"inner metric {inner.name!r} has position {inner.position!r}; LastPositionOf wraps position-'all' metrics")
        if form not in LAST_FORMS:
            raise ValueError(f"form must be one of {LAST_FORMS}, got {form!r}")
        self.inner = inner
        self.form = form
        self.name = inner.name
        self.needs_clean = inner.needs_clean
        self.maximize = inner.maximize

    def batch_keys(self) -> tuple[str, ...]:
        return self.inner.batch_keys()

    def _as_sequence(self, last: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.form == "single":
            return last[:, None]
        B, T = batch["input_ids"].shape
        return last[:, None].expand(B, T, last.shape[-1])

    def __call__(self, logits, batch, clean_logits=None):
        logits = self._as_sequence(_last_logits(logits, batch), batch)
        if clean_logits is not None:
            clean_logits = self._as_sequence(_last_logits(clean_logits, batch, "clean_logits"), batch)
        return self.inner(logits, batch, clean_logits=clean_logits)

    def __repr__(self) -> str:
        return f"LastPositionOf({self.inner!r}, form={self.form!r})"


PROBE_SEED = 1234


def _others_replaced(full: torch.Tensor, batch: dict, fill: str) -> torch.Tensor:
    """``full`` ``[B, T, V]`` with every position but each row's last real token replaced:
    ``"nan"`` by NaN, ``"noise"`` by seeded Gaussian noise of the logits' scale."""
    B = full.shape[0]
    keep = torch.zeros(full.shape[:2], dtype=torch.bool, device=full.device)
    keep[torch.arange(B, device=full.device), last_positions(_batch_mask(batch)).to(full.device)] = True
    if fill == "nan":
        other = torch.full((), float("nan"), dtype=full.dtype, device=full.device)
    else:
        g = torch.Generator(device=full.device).manual_seed(PROBE_SEED)
        scale = full.float().std().clamp_min(1.0)
        other = (torch.randn(full.shape, generator=g, device=full.device) * 3 * scale + 1.0).to(full.dtype)
    return torch.where(keep[..., None], full, other)


def last_position_form(metric: Metric, full_logits: list, batches: list, clean_logits: list | None = None) -> tuple[Metric, str]:
    """Whether a position-``"all"`` callable metric reads only the last real token's logits.

    ``full_logits[i]`` ``[N_i, T, V]`` are the full logits of base run ``i`` on ``batches[i]``
    (``clean_logits[i]`` its reference logits when the metric needs them). The metric's values
    on them are compared, bit for bit, with its values when every other position holds NaN,
    when every other position holds seeded noise, and on the cheap form (``[N, 1, V]``, else
    the ``[N, T, V]`` expanded view, see :class:`LastPositionOf`). If every base run gives the
    same values on all of them, the cheap metric is returned; otherwise (different values, an
    error, or non-finite values) ``metric`` itself.

    Returns ``(metric to use, path)`` with ``path`` ``"last position, form <form>"`` or
    ``"full logits (<why>)"``. Metrics other than :class:`CallableMetric` with position
    ``"all"`` are returned as they are (``"declared"``): built-ins declare what they read.
    """
    if not isinstance(metric, CallableMetric) or metric.position != "all":
        return metric, "declared"
    if not metric.probe_last:
        return metric, "full logits (probe_last=False)"
    clean_logits = clean_logits or [None] * len(full_logits)
    reasons = []
    for form in LAST_FORMS:
        cheap = LastPositionOf(metric, form)
        why = None
        for full, batch, clean in zip(full_logits, batches, clean_logits):
            why = _probe(metric, cheap, full, batch, clean)
            if why:
                break
        if why is None:
            return cheap, f"last position, form {form}"
        reasons.append(f"{form}: {why}")
    return metric, "full logits (" + "; ".join(reasons) + ")"


def _probe(metric: Metric, cheap: LastPositionOf, full: torch.Tensor, batch: dict, clean) -> str | None:
    """None if ``metric`` gives identical values on ``full`` and on every probe; else why not."""
    with torch.no_grad():
        try:
            ref = metric(full, batch, clean_logits=clean)
        except Exception as e:  # the full path raises the same error when the scan calls it
            return f"the metric raised {type(e).__name__} on the full logits"
        if not bool(torch.isfinite(ref).all()):
            return "its values on the base run are not all finite"
        probes = [
            ("other positions set to NaN", lambda: metric(
                _others_replaced(full, batch, "nan"), batch,
                clean_logits=None if clean is None else _others_replaced(clean, batch, "nan"))),
            ("other positions set to noise", lambda: metric(
                _others_replaced(full, batch, "noise"), batch,
                clean_logits=None if clean is None else _others_replaced(clean, batch, "noise"))),
            (f"the {cheap.form} form", lambda: cheap(select_logits(full, cheap, batch), batch,
                                                     clean_logits=None if clean is None else select_logits(clean, cheap, batch))),
        ]
        for what, run in probes:
            try:
                got = run()
            except Exception as e:
                return f"it raised {type(e).__name__} with {what}"
            if not torch.equal(got, ref):
                return f"its values change with {what}"
    return None

