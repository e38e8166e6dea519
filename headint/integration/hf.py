"""Hugging Face ``transformers`` drop-in: :func:`intervene`.

headint registers an attention function named ``"headint"`` in ``transformers``'
``AttentionInterface`` (:mod:`.attention_function`, with the matching entry in
``AttentionMaskInterface``, so causal, padding and sliding-window masks are built as for
SDPA), then, inside :func:`intervene`, switches the model's configs to it
(:mod:`.session`). Every model that dispatches its attention through that registry is
supported without per-model code; one probe forward per model (:mod:`.structure`) finds its
attention modules and refuses, naming the reason, a model whose attention headint cannot
intervene in faithfully.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..interventions import Intervention
from ..ops.knockout import EdgeKnockout
from ..plan import InterventionPlan, Plan
from ..shape import ModelShape
from .attention_function import register
from .modes import warn_active_dropout
from .session import Session, close_session, open_session
from .structure import check_supported, model_shape


def make_plan(model, interventions: Any, shape: ModelShape | None = None) -> Plan | None:
    """Turn what the user passed to :func:`intervene` into a :class:`~headint.plan.Plan`
    (validating every intervention against ``shape``, default the model's probed shape)."""
    if interventions is None:
        return None
    if isinstance(interventions, Plan):
        return interventions
    if isinstance(interventions, (Intervention, EdgeKnockout)):
        interventions = [interventions]
    if not isinstance(interventions, Sequence) or isinstance(interventions, str):
        raise TypeError(f"interventions must be a list of intervention objects, a list of per-row lists, or a Plan; got {type(interventions).__name__}")
    items = list(interventions)
    if not items:
        return None
    shape = model_shape(model) if shape is None else shape
    if all(isinstance(x, (list, tuple)) for x in items):
        return InterventionPlan(shape, rows=items)
    return InterventionPlan(shape, shared=items)


class InterventionBlock:
    """The context manager :func:`intervene` returns; enter it once (``with``), it yields the model."""

    def __init__(self, model, plan: Plan | None, backend: str, recorder=None, structure=None):
        self.session = Session(model, plan, backend, recorder, structure)

    def __enter__(self):
        register()
        warn_active_dropout(self.session.model)
        open_session(self.session)
        return self.session.model

    def __exit__(self, *exc) -> None:
        close_session(self.session)


def intervene(model, interventions: Any = (), *, backend: str = "auto", recorder=None) -> InterventionBlock:
    """Run ``model``'s attention through headint with ``interventions`` inside the block.

    Args:
        model: a ``transformers`` model (any ``attn_implementation``; it is switched to
            headint's attention inside the block and restored exactly when the last block on
            it exits, also on error).
        interventions: a list of :class:`~headint.Intervention` objects (:class:`~headint.Ablate`,
            :class:`~headint.Patch`, :class:`~headint.Scale`, :class:`~headint.Knockout`,
            :class:`~headint.PatchQKV`, or your own subclass) applied to every row; or a list of
            such lists, one per batch row (row ``i`` gets ``interventions[i]``); or a
            :class:`~headint.plan.Plan`. They are validated here, before the model is touched.
        backend: attention backend (see :func:`headint.attention`).

    Interventions name a layer of one attention stack (``stack=None``: the model's default,
    ``"self"``, or ``"decoder.self"`` in an encoder-decoder model; see :mod:`headint.shape`).
    On first use headint probes the model with one small forward pass and refuses (with
    :class:`~headint.UnsupportedModelError` naming the model and the reason) a model where head
    interventions would not mean what they say (see :mod:`headint.integration.structure`).

    Works around ``model(...)`` and ``model.generate(...)`` (with a KV cache; positions
    stay absolute across decoding steps, also with sliding-window caches). Nested blocks on
    the same model: the innermost open block of the calling thread applies; blocks may close
    in any order. Blocks belong to the thread that enters them (see the README, "Threads and
    nested blocks"). The returned block can be entered once; ``with`` yields the model.
    """
    structure = check_supported(model)
    if recorder is not None:
        structure.shape.resolve_stack(getattr(recorder, "stack", None), "record stack")
    plan = make_plan(model, interventions, structure.shape)
    return InterventionBlock(model, plan, backend, recorder, structure)
