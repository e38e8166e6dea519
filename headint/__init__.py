"""headint: causal interpretability of transformers through attention-head interventions.

Op level: :func:`attention` (intervened attention with pluggable backends).
Model level: :func:`intervene`, :func:`record` and the intervention objects
(:class:`Ablate`, :class:`Patch`, :class:`Scale`, :class:`Knockout`, :class:`PatchQKV`).
"""

from .integration.hf import UnsupportedModelError, intervene
from .interventions import Ablate, Patch, PatchQKV, Scale
from .ops import BackendUnavailable, Knockout, attention, available_backends, last_backend
from .plan import InterventionPlan, ModelShape, Plan, TensorPlan
from .record import ActivationCache, record

__version__ = "0.1.0"

__all__ = [
    "attention", "Knockout", "Ablate", "Patch", "Scale", "PatchQKV",
    "intervene", "record", "ActivationCache", "Plan", "InterventionPlan", "TensorPlan", "ModelShape",
    "available_backends", "last_backend", "BackendUnavailable", "UnsupportedModelError",
]
