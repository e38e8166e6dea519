"""headint: causal interpretability of transformers through attention-head interventions.

Op level: :func:`attention` (intervened attention with pluggable backends; knockouts as
:class:`headint.ops.EdgeKnockout`).
Model level: :func:`intervene`, :func:`record` and the intervention objects
(:class:`Ablate`, :class:`Patch`, :class:`Scale`, :class:`Knockout`, :class:`PatchQKV`;
:class:`Intervention` to define your own).
Scans: :func:`scan` (exact, batched), :func:`attribution_scan`, :func:`path_patch`,
returning :class:`ScanResult` tables and heatmaps; :func:`learn_gates`, :func:`prune_curve`,
:func:`knockout_scan`.
"""

from .activations import ActivationCache
from .integration.adapter import UnsupportedModelError
from .integration.modes import DropoutWarning
from .integration.hf import intervene
from .integration.record import record
from .interventions import Ablate, Intervention, Knockout, Patch, PatchQKV, Scale
from .ops import BackendUnavailable, EdgeKnockout, attention, available_backends, last_backend
from .plan import InterventionPlan, Plan, TensorPlan
from .shape import LayerShape, ModelShape
from .results import NaNMetricWarning, ScanResult
from .scans import all_pairs, attribution_scan, path_patch, scan
from .scans import DirectTotal, direct_vs_total
from .tokens import to_str_tokens
from .scans import knockout_scan, learn_gates, prune_curve
from .scans import circuit_faithfulness, faithfulness_across, faithfulness_curve, route_knockout_scan
from . import metrics, models

__version__ = "0.1.0"

__all__ = [
    "attention", "EdgeKnockout", "Intervention", "Knockout", "Ablate", "Patch", "Scale", "PatchQKV",
    "intervene", "record", "ActivationCache", "Plan", "InterventionPlan", "TensorPlan", "ModelShape", "LayerShape",
    "available_backends", "last_backend", "BackendUnavailable", "UnsupportedModelError", "DropoutWarning",
    "scan", "attribution_scan", "path_patch", "all_pairs", "learn_gates", "prune_curve", "knockout_scan", "circuit_faithfulness", "faithfulness_curve", "faithfulness_across", "route_knockout_scan", "direct_vs_total", "DirectTotal", "ScanResult", "NaNMetricWarning", "metrics", "models",
    "to_str_tokens",
]
