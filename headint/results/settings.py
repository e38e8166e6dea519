"""The settings of a scan result, typed (their words come from :mod:`headint.vocabulary`), and
what an ``effect`` is measured from.

:class:`ScanSettings` is the read-only record of how a :class:`~headint.results.ScanResult`
was made. Its fields are the settings the result itself interprets, each checked against its
vocabulary when the result is built or loaded (a wrong value is an error naming the field);
everything else a scan records (model, backend, cost, ...) stays readable as a mapping,
``result.settings["cost"]`` (a :class:`ScanSettings` is a read-only dict of the whole record).

What ``effect`` means (:attr:`ScanSettings.reference`): every intervention is applied to one
run, the *base* run, and its effect is the change from that run's baseline:

* ablations (``method`` ``"zero"``, ``"mean"``, ``"resample"``), ``"noising"`` patching and
  path patching run the clean inputs: ``effect = value - clean baseline`` (what the
  intervention destroys; negative for a head the behaviour needs, for a metric that is high
  on clean inputs);
* ``"denoising"`` patching runs the corrupted inputs with clean activations patched in:
  ``effect = value - corrupt baseline`` (what patching the head restores; positive for a head
  the behaviour needs);
* normalised results (values ``(v - corrupt) / (clean - corrupt)``: 0 = corrupt, 1 = clean)
  follow the same rule on that scale: a denoising effect is the fraction of the clean-corrupt
  gap the head restores, a noising or ablation effect minus the fraction it destroys.

``effect_stderr`` pairs each example's value with the same base run's value of that example.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..vocabulary import (DIRECTIONS, EFFECTS, HEAD_KINDS, RESULT_METHODS, SCAN_KINDS, TARGETS, Direction, Effect, HeadKind,
                          Reference, ResultMethod, ScanKind, Target)

__all__ = ["Normalization", "ScanSettings", "effect_definition"]


@dataclass(frozen=True)
class Normalization:
    """The raw baselines a normalised result was divided by: values are
    ``(v - corrupt_baseline) / (clean_baseline - corrupt_baseline)``."""

    clean_baseline: float
    corrupt_baseline: float


def _choice(record: Mapping, key: str, choices: tuple[str, ...]) -> Any:
    value = record.get(key)
    if value is not None and (not isinstance(value, str) or value not in choices):
        raise ValueError(f"settings[{key!r}] must be one of {list(choices)} or null, got {value!r}")
    return value


def _flag(record: Mapping, key: str) -> bool | None:
    value = record.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"settings[{key!r}] must be true, false or null, got {value!r}")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"settings['normalization'][{key!r}] must be a number, got {value!r}")
    return float(value)


def _normalization(record: Mapping) -> Normalization | None:
    value = record.get("normalization")
    if value is None:
        return None
    if not isinstance(value, Mapping) or not {"clean_baseline", "corrupt_baseline"} <= set(value):
        raise ValueError("settings['normalization'] must be {\"clean_baseline\": number, \"corrupt_baseline\": number} "
                         f"or null, got {value!r}")
    return Normalization(_number(value["clean_baseline"], "clean_baseline"), _number(value["corrupt_baseline"], "corrupt_baseline"))


def _warnings(record: Mapping) -> tuple[str, ...]:
    value = record.get("warnings")
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) for w in value):
        raise ValueError(f"settings['warnings'] must be a list of strings, got {value!r}")
    return tuple(value)


_FIELDS = ("kind", "method", "direction", "effect", "target", "head_kind", "per_position", "normalization", "warnings",
           "metric")


class ScanSettings(dict):
    """How a result was made: a read-only dict of the whole (JSON-able) record, with typed
    attributes for the fields the result interprets, checked against their vocabularies.

    kind: the scan (``"exact"``, ``"attribution"``, ``"path_patch"``; None for a result built
    by hand). method: :data:`~headint.vocabulary.ResultMethod`. direction: :data:`~headint.vocabulary.Direction` for patching, None
    otherwise. effect: :data:`~headint.vocabulary.Effect` (exact scans). target: :data:`~headint.vocabulary.Target` (exact scans).
    head_kind: whether the ``head`` axis indexes query or key/value heads. per_position:
    whether the grid has a position axis. normalization: the raw baselines of a normalised
    result. warnings: lines a report shows. metric: the metric's description. A key that is
    absent reads as None (``()`` for warnings).

    Read-only: ``settings["method"] = ...`` raises TypeError; derive a changed copy with
    :meth:`replace`. It is a dict otherwise (``json.dumps``, ``dict(settings, key=value)``).
    """

    kind: ScanKind | None
    method: ResultMethod | None
    direction: Direction | None
    effect: Effect | None
    target: Target | None
    head_kind: HeadKind | None
    per_position: bool | None
    normalization: Normalization | None
    warnings: tuple[str, ...]
    metric: str | None

    def __init__(self, record: Mapping | None = None):
        record = {} if record is None else dict(record)
        method, direction = _choice(record, "method", RESULT_METHODS), _choice(record, "direction", DIRECTIONS)
        if direction is not None and method not in (None, "patch"):
            raise ValueError(f"settings['direction'] is {direction!r}, but a direction applies to method 'patch' only "
                             f"(settings['method'] is {method!r}); it must be null")
        metric = record.get("metric")
        typed = dict(
            kind=_choice(record, "kind", SCAN_KINDS), method=method, direction=direction,
            effect=_choice(record, "effect", EFFECTS), target=_choice(record, "target", TARGETS),
            head_kind=_choice(record, "head_kind", HEAD_KINDS), per_position=_flag(record, "per_position"),
            normalization=_normalization(record), warnings=_warnings(record),
            metric=metric if isinstance(metric, str) else None,
        )
        super().__init__(record)
        for name, value in typed.items():
            object.__setattr__(self, name, value)

    @property
    def reference(self) -> Reference:
        """The run effects are measured from: ``"corrupt"`` for denoising (the corrupted
        inputs with clean activations patched in), else ``"clean"``."""
        return "corrupt" if self.direction == "denoising" else "clean"

    def replace(self, **changes: Any) -> "ScanSettings":
        """A copy with ``changes`` (checked again)."""
        return ScanSettings({**self, **changes})

    def to_dict(self) -> dict:
        """The whole record as a plain dict (a deep copy)."""
        return copy.deepcopy(dict(self))

    def __repr__(self) -> str:
        return f"ScanSettings({dict.__repr__(self)})"

    def __reduce__(self):
        return (ScanSettings, (dict(self),))

    def __copy__(self) -> "ScanSettings":
        return self

    def __deepcopy__(self, memo) -> "ScanSettings":
        return ScanSettings(copy.deepcopy(dict(self), memo))

    def _read_only(self, *args, **kwargs):
        raise TypeError("a result's settings are read-only; use settings.replace(key=value) or dict(settings) for a copy")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _read_only
    update = pop = popitem = clear = setdefault = __ior__ = _read_only


def effect_definition(settings: ScanSettings, normalized: bool = False) -> str:
    """One line saying what ``effect`` is for a result with ``settings``, e.g.
    ``"effect = value - corrupt baseline: what patching in the clean activation restores"``."""
    what = {
        ("corrupt", False): "value - corrupt baseline: what patching in the clean activation restores",
        ("corrupt", True): "value - 0 (corrupt): the fraction of the clean - corrupt gap that patching in the clean "
                           "activation restores",
        ("clean", True): "value - 1 (clean): minus the fraction of the clean - corrupt gap that the intervention destroys",
    }.get((settings.reference, normalized))
    if what is None:
        change = "patching in the corrupted activation" if settings.direction == "noising" else "the intervention"
        what = f"value - clean baseline: the change {change} causes"
    return f"effect = {what}"
