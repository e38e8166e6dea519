"""The words headint's scans, metrics and command line accept: one typed home for each.

Each vocabulary is a ``Literal`` alias (for annotations and type checkers) and a tuple derived
from it with :func:`typing.get_args` (for validation, error messages, ``argparse`` choices and
docs). Code that accepts one of these words imports it from here; nothing else spells the list.

Checking a word: :func:`check_choice` raises ``ValueError`` naming the argument, what it got
and what it accepts, so every entry point words the mistake the same way.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

__all__ = [
    "HeadTensor", "HEAD_TENSORS", "Method", "METHODS", "Direction", "DIRECTIONS", "Target", "TARGETS", "Effect", "EFFECTS",
    "AttributionMethod", "ATTRIBUTION_METHODS", "Ablation", "ABLATIONS", "GateKind", "GATE_KINDS",
    "PruneOrder", "PRUNE_ORDERS", "MetricName", "METRIC_NAMES", "MetricPosition", "METRIC_POSITIONS",
    "ScanKind", "SCAN_KINDS", "ResultMethod", "RESULT_METHODS", "HeadKind", "HEAD_KINDS", "Reference", "REFERENCES",
    "check_choice",
]

# Exact scans (:func:`headint.scan`): what replaces a head's value.
Method = Literal["zero", "mean", "resample", "patch"]
# Activation patching: which run is the base and which the source.
#   "denoising": the corrupt run with clean values patched in; "noising": the reverse.
Direction = Literal["denoising", "noising"]
# A head's tensors that can be recorded (:func:`headint.record`) and replaced (a scan's target):
# its output z, its query / key / value, or its attention pattern.
HeadTensor = Literal["z", "q", "k", "v", "pattern"]
Target = HeadTensor
# "total": every later component recomputes; "direct": later heads keep the base run's outputs
# (the final norm recomputes its scale); "direct_frozen_ln": later heads keep the base run's
# outputs and the final norm divides by its base-run scale (TransformerLens's direct logit
# attribution convention); "direct_path": also every MLP from the head's layer on keeps the
# base run's output (the head's path straight to the unembedding). See headint.scan's ``effect``.
Effect = Literal["total", "direct", "direct_frozen_ln", "direct_path"]
# Attribution scans: the first-order estimate of the exact scan with the same replacement
# ("zero", "mean", "resample", "patch"), or gradient head importance ("mask", Michel et al. 2019:
# the zero-ablation estimate under its own name).
AttributionMethod = Literal["patch", "mask", "zero", "mean", "resample"]
# What an ablated head's output becomes (Ablate.kind; learned gates' and pruning curves' ablation).
Ablation = Literal["zero", "mean"]
# Learned gates' parameterisation.
GateKind = Literal["hard_concrete", "sigmoid"]
# Greedy orders of a pruning curve.
PruneOrder = Literal["importance", "exact"]
# The built-in metrics (:mod:`headint.metrics`), by the name each class carries.
MetricName = Literal["logit_diff", "logprob", "prob", "kl", "loss"]
# Which logits a metric reads: each example's last real token, or every position.
MetricPosition = Literal["last", "all"]
# Which scan made a result: headint.scan, headint.attribution_scan, headint.path_patch.
ScanKind = Literal["exact", "attribution", "path_patch"]
# A result's method: an exact scan's or an attribution scan's.
ResultMethod = Literal[Method, AttributionMethod]
# Whether a result's head axis indexes query heads or key/value heads.
HeadKind = Literal["query", "key/value"]
# The run an effect is measured from (the base run the interventions were applied to).
Reference = Literal["clean", "corrupt"]

HEAD_TENSORS: tuple[str, ...] = get_args(HeadTensor)
METHODS: tuple[str, ...] = get_args(Method)
DIRECTIONS: tuple[str, ...] = get_args(Direction)
TARGETS: tuple[str, ...] = get_args(Target)
EFFECTS: tuple[str, ...] = get_args(Effect)
ATTRIBUTION_METHODS: tuple[str, ...] = get_args(AttributionMethod)
ABLATIONS: tuple[str, ...] = get_args(Ablation)
GATE_KINDS: tuple[str, ...] = get_args(GateKind)
PRUNE_ORDERS: tuple[str, ...] = get_args(PruneOrder)
METRIC_NAMES: tuple[str, ...] = get_args(MetricName)
METRIC_POSITIONS: tuple[str, ...] = get_args(MetricPosition)
SCAN_KINDS: tuple[str, ...] = get_args(ScanKind)
RESULT_METHODS: tuple[str, ...] = get_args(ResultMethod)
HEAD_KINDS: tuple[str, ...] = get_args(HeadKind)
REFERENCES: tuple[str, ...] = get_args(Reference)


def check_choice(value: Any, choices: tuple[str, ...], name: str, who: str | None = None) -> str:
    """``value`` if it is one of ``choices``; else ``ValueError`` ("``who``: ``name`` must be one
    of ..., got ...")."""
    if isinstance(value, str) and value in choices:
        return value
    prefix = f"{who}: " if who else ""
    raise ValueError(f"{prefix}{name} must be one of {choices}, got {value!r}")
