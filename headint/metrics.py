"""Scan metrics: per-example scores computed from a model's logits.

A scan runs the model once per intervention and calls a :class:`Metric` on the
logits of a batch of examples. To let a scan compute only the logits a metric
needs, every metric declares them:

* ``position``: ``"last"`` (the logits at each example's last real token) or
  ``"all"`` (every position);
* ``token_ids(batch)``: ``[B, K]`` vocabulary ids whose logits are enough, or
  ``None`` for the full vocabulary;
* ``needs_clean``: whether ``__call__`` also needs the clean run's logits.

The logits a metric receives are therefore laid out as

* ``[B, K]``: position ``"last"`` with ``token_ids`` given, column ``k`` holding
  the logit of id ``token_ids[:, k]``;
* ``[B, V]``: position ``"last"``, full vocabulary;
* ``[B, T, V]``: position ``"all"``.

:func:`select_logits` maps full ``[B, T, V]`` logits to that layout.

``batch`` is a dict of per-example tensors with at least ``input_ids`` ``[B, T]``
and ``attention_mask`` ``[B, T]``, and optionally ``target`` ``[B]``,
``contrast`` ``[B]`` and ``labels`` ``[B, T]``.

A metric also carries its direction, ``maximize``: True where higher is better (a logit
difference, a log-probability), False where lower is better (a loss, a KL divergence), None
where unknown. Methods that optimise a metric (learned gates, greedy pruning) read it from the
metric, never from its name: a user's function named ``loss`` has no direction until it is given
one (``CallableMetric(fn, maximize=False)``, or ``maximize=`` of the method).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Union

from .vocabulary import METRIC_NAMES, METRIC_POSITIONS, MetricName, MetricPosition

import torch
import torch.nn.functional as F

__all__ = [
    "Metric",
    "LogitDiff",
    "LogProb",
    "Prob",
    "KLFromClean",
    "Loss",
    "CallableMetric",
    "logit_diff",
    "logprob",
    "prob",
    "kl_from_clean",
    "loss",
    "as_metric",
    "last_positions",
    "select_logits",
    "normalize",
    "METRIC_NAMES",
]

POSITIONS = METRIC_POSITIONS

TokenSpec = Union[str, int, torch.Tensor]


def _shape(x: torch.Tensor) -> list[int]:
    return list(x.shape)


# --------------------------------------------------------------------------- helpers


def last_positions(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Index of the last real (non-padding) token of each row.

    attention_mask: ``[B, T]`` (bool, int or float; nonzero = real token).
    Works for right padding (real tokens first) and left padding (real tokens
    last, so every row gives ``T - 1``). Returns a LongTensor ``[B]`` on the
    mask's device. A row with no real token is an error.
    """
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor [B, T], got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask has shape {_shape(attention_mask)}; expected 2 dims [B, T]")
    real = attention_mask != 0
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(real)
    last = torch.where(real, idx, torch.full_like(idx, -1)).max(dim=1).values if T > 0 else None
    if last is None or bool((last < 0).any()):
        empty = [] if last is None else (last < 0).nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask (shape {_shape(attention_mask)}) has rows with no real token: {empty or 'all (T = 0)'}"
        )
    return last


def _batch_size(batch: dict) -> int:
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict of per-example tensors, got {type(batch).__name__}")
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        got = _shape(ids) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"batch['input_ids'] must be a tensor [B, T]; got {got}")
    return ids.shape[0]


def _batch_mask(batch: dict) -> torch.Tensor:
    """``batch['attention_mask']`` ``[B, T]``, or all ones when the batch has none."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(ids)
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        got = _shape(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"batch['attention_mask'] must have the shape of input_ids {_shape(ids)}; got {got}")
    return mask


def _resolve_ids(spec: TokenSpec, batch: dict, what: str) -> torch.LongTensor:
    """Turn a token spec (batch key, int id or ``[B]`` tensor) into ids ``[B]``."""
    B = _batch_size(batch)
    device = batch["input_ids"].device
    source = what
    if isinstance(spec, str):
        if spec not in batch:
            raise KeyError(f"{what}={spec!r} names a batch key, but the batch has only {sorted(batch)}")
        source = f"batch[{spec!r}] ({what})"
        spec = batch[spec]
    if isinstance(spec, bool):
        raise TypeError(f"{what} must be a batch key, an int token id or a [B] tensor; got a bool")
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"{what} token id must be >= 0, got {spec}")
        return torch.full((B,), spec, dtype=torch.long, device=device)
    if not isinstance(spec, torch.Tensor):
        spec = torch.as_tensor(spec)
    if spec.dtype.is_floating_point or spec.dtype.is_complex or spec.dtype == torch.bool:
        raise TypeError(f"{source} must hold integer token ids, got dtype {spec.dtype}")
    if spec.dim() == 0:
        spec = spec.expand(B)
    if spec.dim() != 1 or spec.shape[0] != B:
        raise ValueError(f"{source} has shape {_shape(spec)}; expected [B] with B={B}")
    if spec.numel() and bool((spec < 0).any()):
        raise ValueError(f"{source} has negative token ids: {spec.tolist()}")
    return spec.to(device=device, dtype=torch.long)


def _check_logits(logits: Any, expected: str, name: str = "logits") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating, got {logits.dtype}")
    return logits


def _last_logits(logits: torch.Tensor, batch: dict, name: str = "logits") -> torch.Tensor:
    """Logits of a position-"last" metric as ``[B, V_or_K]``.

    Accepts the ``[B, V]`` / ``[B, K]`` layout as is, and, for convenience, full
    ``[B, T, V]`` model logits, from which each example's last real token is taken.
    """
    logits = _check_logits(logits, "[B, V], [B, K] or [B, T, V]", name)
    B = _batch_size(batch)
    if logits.dim() == 3:
        if logits.shape[:2] != batch["input_ids"].shape:
            raise ValueError(
                f"{name} has shape {_shape(logits)}; expected [B, T, V] with [B, T] = {_shape(batch['input_ids'])}"
            )
        pos = last_positions(_batch_mask(batch)).to(logits.device)
        logits = logits[torch.arange(B, device=logits.device), pos]
    if logits.dim() != 2 or logits.shape[0] != B:
        raise ValueError(f"{name} has shape {_shape(logits)}; expected [B, V] or [B, K] with B={B}")
    return logits


def _gather(logits: torch.Tensor, ids: torch.Tensor, what: str) -> torch.Tensor:
    """``logits[b, ids[b]]`` for ``logits`` ``[B, V]`` and ``ids`` ``[B]``; returns ``[B]``."""
    V = logits.shape[-1]
    ids = ids.to(logits.device)
    if ids.numel() and int(ids.max()) >= V:
        raise ValueError(
            f"{what} token id {int(ids.max())} is out of range for logits of shape {_shape(logits)} (V={V}); "
            "were selected [B, K] logits passed to a full-vocabulary metric?"
        )
    return logits.gather(-1, ids[:, None])[:, 0]


def _check_values(values: Any, B: int, who: str) -> torch.Tensor:
    """Validate a metric's output: ``[B]`` float32."""
    if not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(values)
        except Exception:
            raise TypeError(f"{who} must return a tensor [B], got {type(values).__name__}") from None
    if values.dim() != 1 or values.shape[0] != B:
        raise ValueError(f"{who} returned shape {_shape(values)}; expected per-example values [B] with B={B}")
    return values.to(torch.float32)


# --------------------------------------------------------------------------- base class


class Metric:
    """A per-example score of a batch, computed from (a selection of) the logits.

    Subclasses set ``name``, ``position`` (``"last"`` or ``"all"``),
    ``needs_clean`` and ``maximize`` (True: higher is better; False: lower is better;
    None: unknown), and implement :meth:`__call__`; they override :meth:`token_ids` when a
    few vocabulary columns suffice.
    """

    name: str = "metric"
    position: MetricPosition = "last"
    needs_clean: bool = False
    maximize: bool | None = None

    def batch_keys(self) -> tuple[str, ...]:
        """The batch entries (besides ``input_ids`` / ``attention_mask``) this metric reads by name."""
        return ()

    def token_ids(self, batch: dict) -> torch.LongTensor | None:
        """``[B, K]`` vocabulary ids whose logits are enough to compute the metric, or None for the full vocabulary."""
        return None

    def __call__(
        self, logits: torch.Tensor, batch: dict, clean_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-example values ``[B]`` (float32).

        logits: ``[B, K]`` (position "last", token_ids given: column k is id
        ``token_ids[:, k]``), ``[B, V]`` (position "last", full vocabulary) or
        ``[B, T, V]`` (position "all"). clean_logits has the same layout.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, position={self.position!r}, needs_clean={self.needs_clean})"


def _check_token_spec(spec: Any, what: str) -> TokenSpec:
    if isinstance(spec, bool) or not isinstance(spec, (str, int, torch.Tensor)):
        raise TypeError(f"{what} must be a batch key (str), an int token id or a [B] tensor; got {type(spec).__name__}")
    return spec


def _spec_text(spec: TokenSpec) -> str:
    return f"tensor{_shape(spec)}" if isinstance(spec, torch.Tensor) else repr(spec)


# --------------------------------------------------------------------------- built-ins


class LogitDiff(Metric):
    """``logit[target] - logit[contrast]`` at each example's last real token.

    target / contrast: a batch key (``[B]`` ids), an int id or a ``[B]`` tensor.
    ``token_ids`` is ``[B, 2]`` (target, contrast), so the scan needs only two
    logits per example. ``__call__`` accepts those ``[B, 2]`` selected logits, full
    ``[B, V]`` last-position logits or ``[B, T, V]`` model logits; a width of
    exactly 2 is read as the selected layout.
    """

    name: MetricName = "logit_diff"
    position = "last"
    needs_clean = False
    maximize = True

    def __init__(self, target: TokenSpec = "target", contrast: TokenSpec = "contrast"):
        self.target = _check_token_spec(target, "target")
        self.contrast = _check_token_spec(contrast, "contrast")

    def batch_keys(self) -> tuple[str, ...]:
        return tuple(s for s in (self.target, self.contrast) if isinstance(s, str))

    def token_ids(self, batch: dict) -> torch.LongTensor:
        """``[B, 2]``: column 0 the target id, column 1 the contrast id."""
        t = _resolve_ids(self.target, batch, "target")
        c = _resolve_ids(self.contrast, batch, "contrast")
        return torch.stack([t, c], dim=1)

    def __call__(self, logits, batch, clean_logits=None):
        logits = _last_logits(logits, batch)
        if logits.shape[1] == 2:
            diff = logits[:, 0].float() - logits[:, 1].float()
        else:
            ids = self.token_ids(batch)
            diff = _gather(logits, ids[:, 0], "target").float() - _gather(logits, ids[:, 1], "contrast").float()
        return diff.to(torch.float32)

    def __repr__(self) -> str:
        return f"LogitDiff(target={_spec_text(self.target)}, contrast={_spec_text(self.contrast)})"


class LogProb(Metric):
    """``log_softmax(logits)[target]`` at each example's last real token (full vocabulary)."""

    name: MetricName = "logprob"
    position = "last"
    needs_clean = False
    maximize = True

    def __init__(self, target: TokenSpec = "target"):
        self.target = _check_token_spec(target, "target")

    def batch_keys(self) -> tuple[str, ...]:
        return (self.target,) if isinstance(self.target, str) else ()

    def _logprob(self, logits, batch) -> torch.Tensor:
        logits = _last_logits(logits, batch)
        logp = torch.log_softmax(logits.float(), dim=-1)
        return _gather(logp, _resolve_ids(self.target, batch, "target"), "target")

    def __call__(self, logits, batch, clean_logits=None):
        return self._logprob(logits, batch).to(torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={_spec_text(self.target)})"


class Prob(LogProb):
    """``softmax(logits)[target]`` at each example's last real token (full vocabulary)."""

    name: MetricName = "prob"

    def __call__(self, logits, batch, clean_logits=None):
        return self._logprob(logits, batch).exp().to(torch.float32)


class KLFromClean(Metric):
    """``KL(clean || patched)`` of the next-token distributions at the last real token.

    ``sum_v p_clean(v) * (log p_clean(v) - log p_patched(v))``, in nats, per example.
    Needs the clean run's logits (full vocabulary, same layout as ``logits``).
    """

    name: MetricName = "kl"
    position = "last"
    needs_clean = True
    maximize = False

    def __call__(self, logits, batch, clean_logits=None):
        if clean_logits is None:
            raise ValueError("KLFromClean needs clean_logits (the clean run's logits, same layout as logits); got None")
        logits = _last_logits(logits, batch)
        clean_logits = _last_logits(clean_logits, batch, "clean_logits")
        if clean_logits.shape != logits.shape:
            raise ValueError(
                f"clean_logits has shape {_shape(clean_logits)}; expected the shape of logits {_shape(logits)}"
            )
        logq = torch.log_softmax(logits.float(), dim=-1)
        logp = torch.log_softmax(clean_logits.to(logits.device).float(), dim=-1)
        p = logp.exp()
        terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
        return terms.sum(dim=-1).to(torch.float32)

    def __repr__(self) -> str:
        return "KLFromClean()"


class Loss(Metric):
    """Mean next-token cross-entropy per example over real positions (position "all").

    Targets are ``batch['labels']`` when present (aligned with ``input_ids``, i.e.
    ``logits[:, t]`` predicts ``labels[:, t + 1]``, entries ``-100`` ignored),
    else ``input_ids``. A prediction counts when both its own and its target's
    position are real tokens (``attention_mask`` nonzero), so left and right
    padding are both ignored. An example with no counted prediction is an error.
    """

    name: MetricName = "loss"
    position = "all"
    needs_clean = False
    maximize = False

    ignore_index = -100

    def __call__(self, logits, batch, clean_logits=None):
        logits = _check_logits(logits, "[B, T, V]")
        B = _batch_size(batch)
        ids = batch["input_ids"]
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(f"logits has shape {_shape(logits)}; expected [B, T, V] with [B, T] = {_shape(ids)}")
        targets = batch.get("labels")
        if targets is None:
            targets = ids
        elif not isinstance(targets, torch.Tensor) or targets.shape != ids.shape:
            got = _shape(targets) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"batch['labels'] must have the shape of input_ids {_shape(ids)}; got {got}")
        device = logits.device
        real = _batch_mask(batch).to(device) != 0
        targets = targets[:, 1:].to(device=device, dtype=torch.long)
        valid = real[:, 1:] & real[:, :-1] & (targets != self.ignore_index)
        counts = valid.sum(dim=1)
        if bool((counts == 0).any()):
            rows = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"Loss: examples {rows} have no next-token prediction over real, non-ignored positions "
                f"(need at least 2 real tokens; attention_mask shape {_shape(real)})"
            )
        V = logits.shape[-1]
        pred = logits[:, :-1].float().reshape(-1, V)
        ce = F.cross_entropy(pred, targets.masked_fill(~valid, 0).reshape(-1), reduction="none").view(B, -1)
        ce = ce.masked_fill(~valid, 0.0)
        return (ce.sum(dim=1) / counts).to(torch.float32)

    def __repr__(self) -> str:
        return "Loss()"


def _takes_batch(fn: Callable) -> bool:
    """Whether ``fn`` accepts a second positional argument (the batch)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 2


class CallableMetric(Metric):
    """Wrap a user callable ``fn(logits) -> [B]`` or ``fn(logits, batch) -> [B]``.

    By default ``fn`` receives full ``[B, T, V]`` logits (position "all", full
    vocabulary). ``position="last"`` hands it ``[B, V]`` last-position logits
    instead (cheaper for scans). With ``needs_clean=True`` it is called as
    ``fn(logits, batch, clean_logits)``.

    ``maximize``: the metric's direction (True: higher is better, False: lower is better),
    which learned gates and greedy pruning need; None (the default) leaves it unknown, whatever
    the function's name (a function named ``loss`` is not taken to be minimised).

    ``probe_last``: scans check on their base runs whether a position-"all" ``fn`` reads only
    the last real token's logits (:func:`headint.scans.metric_logits.last_position_form`) and
    then compute only those; one that then only selects a few vocabulary columns gets only those
    columns unembedded (:func:`headint.scans.metric_logits.column_form`; ``settings["metric_logits"]``
    says which path ran and why).
    The check is a test on the base runs' data, not a proof: a ``fn`` that depends on other
    positions only through, say, a threshold those runs never cross would pass it. Set
    ``probe_last=False`` to always hand ``fn`` the full logits.
    """

    def __init__(
        self,
        fn: Callable,
        name: str | None = None,
        *,
        position: str = "all",
        needs_clean: bool = False,
        probe_last: bool = True,
        maximize: bool | None = None,
    ):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if maximize is not None and not isinstance(maximize, bool):
            raise TypeError(f"maximize must be True, False or None, got {maximize!r}")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        self.fn = fn
        if name is None:
            name = getattr(fn, "__name__", None)
            if not name or name == "<lambda>":
                name = "custom"
        self.name = str(name)
        self.position = position
        self.needs_clean = bool(needs_clean)
        self.probe_last = bool(probe_last)
        self.maximize = maximize
        self._with_batch = needs_clean or _takes_batch(fn)

    def __call__(self, logits, batch, clean_logits=None):
        if self.needs_clean:
            if clean_logits is None:
                raise ValueError(f"metric {self.name!r} needs clean_logits; got None")
            out = self.fn(logits, batch, clean_logits)
        elif self._with_batch:
            out = self.fn(logits, batch)
        else:
            out = self.fn(logits)
        return _check_values(out, logits.shape[0], f"metric {self.name!r}")

    def __repr__(self) -> str:
        return f"CallableMetric({self.name!r}, position={self.position!r}, needs_clean={self.needs_clean}, maximize={self.maximize})"


# --------------------------------------------------------------------------- factories


def logit_diff(target: TokenSpec = "target", contrast: TokenSpec = "contrast") -> LogitDiff:
    """``LogitDiff(target, contrast)``."""
    return LogitDiff(target, contrast)


def logprob(target: TokenSpec = "target") -> LogProb:
    """``LogProb(target)``."""
    return LogProb(target)


def prob(target: TokenSpec = "target") -> Prob:
    """``Prob(target)``."""
    return Prob(target)


def kl_from_clean() -> KLFromClean:
    """``KLFromClean()``."""
    return KLFromClean()


def loss() -> Loss:
    """``Loss()``."""
    return Loss()


_REGISTRY: dict[str, Callable[..., Metric]] = {cls.name: cls for cls in (LogitDiff, LogProb, Prob, KLFromClean, Loss)}
# (tests/test_vocabulary.py checks that these names are exactly headint.vocabulary.METRIC_NAMES)
_ALIASES = {
    "logitdiff": "logit_diff",
    "logit-diff": "logit_diff",
    "log_prob": "logprob",
    "log-prob": "logprob",
    "kl_from_clean": "kl",
    "kl_div": "kl",
    "ce": "loss",
    "cross_entropy": "loss",
}


def as_metric(x: Metric | Callable | str, **kwargs: Any) -> Metric:
    """Convert ``x`` into a :class:`Metric`.

    x: a Metric (returned as is), a string name (``"logit_diff"``, ``"logprob"``,
    ``"prob"``, ``"kl"``, ``"loss"``; ``kwargs`` go to its constructor, e.g.
    ``as_metric("logprob", target="answer")``) or a callable (wrapped in
    :class:`CallableMetric`, ``kwargs`` passed along).
    """
    if isinstance(x, Metric):
        if kwargs:
            raise TypeError(f"as_metric got keyword arguments {sorted(kwargs)} with an already built {x!r}")
        return x
    if isinstance(x, str):
        key = x.strip().lower()
        key = _ALIASES.get(key, key)
        if key not in _REGISTRY:
            raise ValueError(f"unknown metric name {x!r}; expected one of {list(METRIC_NAMES)}")
        try:
            return _REGISTRY[key](**kwargs)
        except TypeError as e:
            raise TypeError(f"metric {key!r}: {e}") from None
    if callable(x):
        return CallableMetric(x, **kwargs)
    raise TypeError(f"metric must be a Metric, a callable or a name in {list(METRIC_NAMES)}; got {type(x).__name__}")


# --------------------------------------------------------------------------- layouts


def select_logits(full_logits: torch.Tensor, metric: Metric | Callable | str, batch: dict) -> torch.Tensor:
    """Reduce full model logits ``[B, T, V]`` to the layout ``metric`` expects.

    Returns ``[B, T, V]`` (position "all", unchanged), ``[B, V]`` (position "last",
    the logits at each example's last real token) or ``[B, K]`` (position "last"
    with ``metric.token_ids(batch)`` ``[B, K]``: column k holds id ``token_ids[:, k]``).
    """
    metric = as_metric(metric)
    full_logits = _check_logits(full_logits, "[B, T, V]", "full_logits")
    B = _batch_size(batch)
    if full_logits.dim() != 3 or full_logits.shape[:2] != batch["input_ids"].shape:
        raise ValueError(
            f"full_logits has shape {_shape(full_logits)}; expected [B, T, V] with [B, T] = "
            f"{_shape(batch['input_ids'])}"
        )
    if metric.position == "all":
        return full_logits
    if metric.position != "last":
        raise ValueError(f"metric {metric.name!r} has position {metric.position!r}; expected one of {POSITIONS}")
    device = full_logits.device
    pos = last_positions(_batch_mask(batch)).to(device)
    last = full_logits[torch.arange(B, device=device), pos]  # [B, V]
    ids = metric.token_ids(batch)
    if ids is None:
        return last
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != B:
        got = _shape(ids) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"metric {metric.name!r}: token_ids returned {got}; expected [B, K] with B={B}")
    ids = ids.to(device=device, dtype=torch.long)
    V = full_logits.shape[-1]
    if ids.numel() and (int(ids.max()) >= V or int(ids.min()) < 0):
        raise ValueError(f"metric {metric.name!r}: token_ids out of range [0, {V}) for vocabulary size V={V}")
    return last.gather(1, ids)


# --------------------------------------------------------------------------- normalization


def normalize(values, clean, corrupt):
    """``(values - corrupt) / (clean - corrupt)``: 1 = clean behaviour, 0 = corrupted.

    values: a tensor (any shape) or number; clean / corrupt: numbers or tensors
    broadcastable to values. Floating tensors keep their dtype; anything else
    becomes float32. Raises ValueError where ``clean == corrupt``.
    """
    v = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if not v.is_floating_point():
        v = v.to(torch.float32)
    c = torch.as_tensor(clean, dtype=v.dtype, device=v.device)
    r = torch.as_tensor(corrupt, dtype=v.dtype, device=v.device)
    denom = c - r
    if bool((denom == 0).any()):
        raise ValueError(
            f"cannot normalize: clean ({_value_text(clean)}) equals corrupt ({_value_text(corrupt)}), "
            "so (clean - corrupt) is zero"
        )
    if bool(torch.isnan(denom).any()):
        raise ValueError(f"cannot normalize: clean ({_value_text(clean)}) or corrupt ({_value_text(corrupt)}) is NaN")
    return (v - r) / denom


def _value_text(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.item():g}" if x.numel() == 1 else f"tensor{_shape(x)}"
    return f"{x:g}" if isinstance(x, (int, float)) else repr(x)
