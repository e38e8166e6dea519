"""The logits a scan computes for its metric, and the probe that finds out how few will do.

A scan unembeds as little as the metric reads:

- a metric that declares ``position="last"`` gets the final hidden state of each row's last real
  token unembedded, and only for its ``token_ids`` when it names them (:func:`restricted_logits`:
  ``[R, K]`` for a logit difference instead of ``[R, T, V]``), where the model's own logits are
  the unembedding of its base model's output (checked on the clean run);
- a callable on full logits (:class:`~headint.metrics.CallableMetric`, position ``"all"``) is
  probed on the base runs (:func:`last_position_form`); one that reads only the last real
  token's logits is then fed those alone (:class:`LastPositionOf`), and one of those that reads
  only a few vocabulary columns (:func:`column_form`) gets only those columns unembedded, in an
  otherwise NaN-filled ``[R, V]`` (:class:`ColumnsOf`, :func:`column_values`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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


class _Wrapping(Metric):
    """A metric that stands for ``inner``: it carries ``inner``'s name, ``needs_clean``,
    direction and batch keys."""

    def _wrap(self, inner: Metric) -> None:
        self.inner = inner
        self.name = inner.name
        self.needs_clean = inner.needs_clean
        self.maximize = inner.maximize

    def batch_keys(self) -> tuple[str, ...]:
        return self.inner.batch_keys()


class LastPositionOf(_Wrapping):
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
        self._wrap(inner)
        self.form = form

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



# --------------------------------------------------------------------------- vocabulary columns


class ColumnsOf(_Wrapping):
    """A :class:`LastPositionOf` metric found to read only ``columns`` ``[K]`` of the vocabulary.

    Its layout is the last-position one, ``[B, V]``; a scan's variants fill only ``columns`` of it
    (:func:`column_values`), the rest NaN, and hand it to ``inner`` unchanged. Anywhere else (base
    runs, full logits) it is ``inner`` itself. :func:`column_form` checks the column set on the base
    runs; :func:`column_values` checks every variant batch again (NaN and two extreme fills must
    give the same finite values) and falls back to the full vocabulary where they do not.
    ``fallback_rows`` counts the variant rows that fell back.
    """

    position = "last"

    def __init__(self, inner: LastPositionOf, columns: torch.Tensor):
        if not isinstance(inner, LastPositionOf):
            raise TypeError(f"inner must be a LastPositionOf, got {type(inner).__name__}")
        columns = torch.as_tensor(columns, dtype=torch.long)
        if columns.dim() != 1:
            raise ValueError(f"columns must be a 1-d tensor of vocabulary ids, got shape {tuple(columns.shape)}")
        self._wrap(inner)
        self.columns = columns
        self.fallback_rows = 0

    def __call__(self, logits, batch, clean_logits=None):
        return self.inner(logits, batch, clean_logits=clean_logits)

    def __repr__(self) -> str:
        return f"ColumnsOf({self.inner!r}, {len(self.columns)} columns)"


def _extreme(dtype: torch.dtype) -> float:
    """A finite fill far beyond any logit, for the extreme-value checks (``± _extreme``)."""
    return float(torch.finfo(dtype).max) / 16


def _columns_kept(x: torch.Tensor, cols: torch.Tensor, fill: str, seed: int = PROBE_SEED) -> torch.Tensor:
    """``x`` ``[B, V]`` with every column but ``cols`` replaced: ``"nan"``, ``"+big"``/``"-big"``
    (:func:`_extreme`) or ``"noise"`` (seeded Gaussian noise of the logits' scale)."""
    if fill == "noise":
        g = torch.Generator(device=x.device).manual_seed(seed)
        scale = x.float().std().clamp_min(1.0) if x.numel() > 1 else torch.tensor(1.0)
        out = (torch.randn(x.shape, generator=g, device=x.device) * 3 * scale + 1.0).to(x.dtype)
    else:
        value = {"nan": float("nan"), "+big": _extreme(x.dtype), "-big": -_extreme(x.dtype)}[fill]
        out = torch.full(x.shape, value, dtype=x.dtype, device=x.device)
    c = cols.to(x.device)
    out[:, c] = x[:, c]
    return out


COLUMN_FILLS = ("nan", "noise", "+big", "-big")  # base-run check
VARIANT_FILLS = ("+big", "-big")  # every variant batch, after the NaN fill


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def _read_columns(metric: LastPositionOf, x: torch.Tensor, batch: dict, clean) -> torch.Tensor:
    """Candidate columns ``[V]`` bool: where the gradient of ``metric``'s values w.r.t. ``x``
    ``[N, V]`` is not zero in some row (a metric whose values carry no gradient gives none:
    the fills then decide)."""
    xg = x.detach().float().requires_grad_(True)
    with torch.enable_grad():
        v = metric(xg.to(x.dtype), batch, clean_logits=clean)
        if not v.requires_grad:
            return torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
        (g,) = torch.autograd.grad(v.float().sum(), xg, allow_unused=True)
    if g is None:
        return torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    return ((g != 0) | g.isnan()).any(0)


# Operations that only select, view or copy: the one thing a metric may do to a tensor holding a
# whole vocabulary axis for its columns to be found. Anything else on such a tensor (a softmax, an
# argmax, a comparison, a reshape) may read every column, and the metric keeps the full vocabulary.
SELECTING_OPS = frozenset({
    "__getitem__", "gather", "index_select", "select", "narrow", "take_along_dim", "expand", "expand_as",
    "unsqueeze", "clone", "detach", "contiguous", "to", "float", "double", "half", "bfloat16", "type",
    "dim", "size", "numel", "is_floating_point", "is_contiguous", "__get__", "__len__",
})


class _WholeVocabularyOps(TorchFunctionMode):
    """Records the torch operations other than :data:`SELECTING_OPS` applied to a tensor with an
    axis of length ``V`` (the vocabulary) while a metric runs."""

    def __init__(self, V: int):
        super().__init__()
        self.V = V
        self.seen: list[str] = []

    def _wide(self, a) -> bool:
        if isinstance(a, torch.Tensor):
            return self.V in a.shape
        if isinstance(a, (list, tuple)):
            return any(self._wide(b) for b in a)
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name not in SELECTING_OPS and (self._wide(args) or self._wide(tuple(kwargs.values()))):
            self.seen.append(name)
        return func(*args, **kwargs)


def _whole_vocabulary_op(metric: Metric, x: torch.Tensor, batch: dict, clean) -> str | None:
    """The first non-selecting operation ``metric`` applies to a vocabulary-wide tensor on ``x``
    ``[N, V]`` (see :data:`SELECTING_OPS`), or None."""
    mode = _WholeVocabularyOps(x.shape[-1])
    with torch.no_grad(), mode:
        metric(x, batch, clean_logits=clean)
    return mode.seen[0] if mode.seen else None


def column_form(metric: Metric, last_logits: list, batches: list, clean_logits: list | None = None,
                restricted: bool = True) -> tuple[Metric, str]:
    """Which vocabulary columns a :class:`LastPositionOf` metric reads, checked on the base runs.

    ``last_logits[i]`` ``[N_i, V]``: base run ``i``'s last-position logits (``clean_logits[i]``
    the reference the metric gets, left whole: variants get it whole too). Candidates: the
    columns where the gradient of the values w.r.t. these logits is non-zero in some row, union
    over rows and runs. They are accepted only if, on every base run, the values are bit for bit
    those on the full logits when every other column holds NaN, seeded noise, and ``±`` a huge
    finite value (so a column read through a step, an ``argmax`` or a branch with zero gradient
    is not missed on these runs); a metric reading the whole vocabulary (softmax, logsumexp,
    argmax) fails. ``restricted``: whether variants unembed hidden states themselves (else they
    get the model's full logits and the columns would save nothing).

    Returns ``(ColumnsOf(metric, columns), "columns <K> of <V>")`` or ``(metric, "full
    vocabulary (<why>)")``.
    """
    if not isinstance(metric, LastPositionOf):
        return metric, "declared"
    if not restricted:
        return metric, "full vocabulary (the model's logits are not its final hidden state unembedded)"
    clean_logits = clean_logits or [None] * len(last_logits)
    V = last_logits[0].shape[-1]
    support = torch.zeros(V, dtype=torch.bool, device=last_logits[0].device)
    try:
        for x, batch, clean in zip(last_logits, batches, clean_logits):
            op = _whole_vocabulary_op(metric, x, batch, clean)
            if op is not None:
                return metric, f"full vocabulary (it applies {op} to a vocabulary-wide tensor)"
            support |= _read_columns(metric, x, batch, clean).to(support.device)
    except Exception as e:
        return metric, f"full vocabulary (finding its columns failed: {type(e).__name__})"
    if bool(support.all()):
        return metric, "full vocabulary (its gradient reaches every column)"
    cols = support.nonzero().flatten()
    with torch.no_grad():
        for x, batch, clean in zip(last_logits, batches, clean_logits):
            ref = metric(x, batch, clean_logits=clean)
            if not bool(torch.isfinite(ref).all()):
                return metric, "full vocabulary (its values on the base run are not all finite)"
            for fill in COLUMN_FILLS:
                try:
                    got = metric(_columns_kept(x, cols, fill), batch, clean_logits=clean)
                except Exception as e:
                    return metric, f"full vocabulary (it raised {type(e).__name__} with other columns set to {fill})"
                if not _same(got, ref):
                    return metric, f"full vocabulary (its values change with the other columns set to {fill})"
    return ColumnsOf(metric, cols), f"columns {len(cols)} of {V}"


def column_values(metric: ColumnsOf, hidden: torch.Tensor, rows: dict, start: int, unembed: nn.Module,
                  clean_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Values ``[R]`` of ``metric`` on final hidden states ``hidden [R, T - start, d]`` of tokens
    ``start ..`` of ``rows``, unembedding only ``metric.columns`` at each row's last real token
    (``W[cols]``, plus the bias's entries) into a NaN-filled ``[R, V]``.

    The batch is checked: the values must be finite and unchanged, bit for bit, with the other
    columns at ``±`` a huge finite value, and the metric must not raise; otherwise (a column the base runs never showed read, e.g.
    behind a branch they never took) the whole vocabulary is unembedded for the batch and
    ``metric.fallback_rows`` grows.
    """
    last = (last_positions(rows["attention_mask"]) - start).clamp_min(0)
    h = hidden[torch.arange(hidden.shape[0]), last]  # [R, d]
    W = unembed.weight
    b = getattr(unembed, "bias", None)
    cols = metric.columns.to(W.device)
    part = torch.nn.functional.linear(h, W[cols], None if b is None else b[cols])  # [R, K]
    full = torch.full((h.shape[0], W.shape[0]), float("nan"), dtype=part.dtype, device=part.device)
    full[:, cols] = part
    try:
        values = metric(full, rows, clean_logits=clean_logits)
        ok = bool(torch.isfinite(values).all())
        for fill in VARIANT_FILLS if ok else ():
            value = _extreme(part.dtype) if fill == "+big" else -_extreme(part.dtype)
            full.fill_(value)
            full[:, cols] = part
            if not _same(metric(full, rows, clean_logits=clean_logits), values):
                ok = False
                break
    except Exception:  # e.g. an index computed from a column it was not given: the full path decides
        ok = False
    if ok:
        return values
    metric.fallback_rows += h.shape[0]
    return metric(torch.nn.functional.linear(h, W, b), rows, clean_logits=clean_logits)
