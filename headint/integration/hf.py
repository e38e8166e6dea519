"""Hugging Face ``transformers`` drop-in: :func:`intervene`.

headint registers an attention function named ``"headint"`` in ``transformers``'
``AttentionInterface`` (and the matching entry in ``AttentionMaskInterface``, so causal,
padding and sliding-window masks are built as for SDPA), then, inside
:func:`intervene`, switches the model's configs to it. Every model that dispatches its
attention through that registry is supported without per-model code; a model class
that does not is refused with an error naming it.

The attention function itself only translates: it finds the layer of the calling
module, asks the active :class:`~headint.plan.Plan` for this call's tensors, applies
q/k/v edits and calls :func:`headint.attention`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Sequence

import torch

from ..interventions import INTERVENTION_TYPES
from ..ops.attention import attention
from ..ops.arguments import prepare
from ..ops.reference import reference_probs
from ..plan import InterventionPlan, ModelShape, Plan

ATTN_NAME = "headint"
_LOCK = threading.RLock()
_SESSIONS: list["_Session"] = []  # innermost last
_CALLS = [0]  # attention calls through headint, all sessions (to detect models that bypass it)


class UnsupportedModelError(TypeError):
    """The model does not route its attention through ``transformers``' AttentionInterface."""


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, headint_attention_forward)
    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


class _Session:
    def __init__(self, model, plan: Plan | None, backend: str, recorder=None):
        self.model = model
        self.plan = plan
        self.backend = backend
        self.recorder = recorder
        self.module_ids = {id(m) for m in model.modules()}
        self.order: dict[int, int] = {}
        self.q_start: int | None = None  # absolute position of the current forward's first query
        self.n_layers = ModelShape.from_config(model.config).n_layers
        # If the model's attention modules carry `layer_idx`, those are the layers interventions
        # name; attention modules without one (e.g. a vision tower) are left alone.
        self.indexed = any(isinstance(getattr(m, "layer_idx", None), int) for m in model.modules() if "Attention" in type(m).__name__)

    def layer_of(self, module) -> int | None:
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int):
            return idx
        if self.indexed:
            return None
        key = id(module)
        if key not in self.order:  # modules without layer_idx: numbered in order of first call
            self.order[key] = len(self.order)
        return self.order[key]

    def set_q_start(self, _module, args, kwargs) -> None:
        """Forward pre-hook: where this forward's queries sit in the whole sequence.

        Read from ``cache_position``, else the 2D attention mask (which covers past and new
        tokens in ``generate``), else the KV cache's length; a sliding-window cache may hold
        fewer keys than that, so the attention call alone cannot tell.
        """
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        n_new = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else (emb.shape[1] if isinstance(emb, torch.Tensor) else None)
        cp = kwargs.get("cache_position")
        mask = kwargs.get("attention_mask")
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        if isinstance(cp, torch.Tensor) and cp.numel():
            self.q_start = int(cp.reshape(-1)[0])
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2 and n_new is not None:
            self.q_start = mask.shape[1] - n_new
        elif past is not None and hasattr(past, "get_seq_length"):
            self.q_start = int(past.get_seq_length())
        else:
            self.q_start = None


def _session_for(module) -> "_Session | None":
    with _LOCK:
        for s in reversed(_SESSIONS):
            if id(module) in s.module_ids:
                return s
    return None


def model_configs(model) -> list:
    """Every distinct config object reachable from the model (its modules and sub-configs)."""
    from transformers import PretrainedConfig

    seen: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen[id(c)] = c
        for key in getattr(c, "sub_configs", {}) or {}:
            sub = getattr(c, key, None)
            if isinstance(sub, PretrainedConfig):
                stack.append(sub)
    return list(seen.values())


def check_supported(model) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` uses the attention registry."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"headint.intervene needs a transformers PreTrainedModel, got {type(model).__name__}")
    if not getattr(type(model), "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
            "so headint cannot intervene in it (no per-model fallback is provided)"
        )


def make_plan(model, interventions: Any) -> Plan | None:
    """Turn what the user passed to :func:`intervene` into a :class:`Plan`."""
    if interventions is None:
        return None
    if isinstance(interventions, Plan):
        return interventions
    if isinstance(interventions, INTERVENTION_TYPES):
        interventions = [interventions]
    if not isinstance(interventions, Sequence):
        raise TypeError(f"interventions must be a list of intervention objects, a list of per-row lists, or a Plan; got {type(interventions).__name__}")
    items = list(interventions)
    if not items:
        return None
    shape = ModelShape.from_config(model.config)
    if all(isinstance(x, (list, tuple)) for x in items):
        return InterventionPlan(shape, rows=items)
    return InterventionPlan(shape, shared=items)


@contextlib.contextmanager
def intervene(model, interventions: Any = (), *, backend: str = "auto", recorder=None) -> Iterator[Any]:
    """Run ``model``'s attention through headint with ``interventions`` inside the block.

    Args:
        model: a ``transformers`` model (any ``attn_implementation``; it is switched to
            headint's attention inside the block and restored exactly on exit, also on error).
        interventions: a list of :class:`~headint.Ablate`, :class:`~headint.Patch`,
            :class:`~headint.Scale`, :class:`~headint.Knockout`, :class:`~headint.PatchQKV`
            applied to every row; or a list of such lists, one per batch row (row ``i`` gets
            ``interventions[i]``); or a :class:`~headint.plan.Plan`.
        backend: attention backend (see :func:`headint.attention`).

    Works around ``model(...)`` and ``model.generate(...)`` (with a KV cache; positions
    stay absolute across decoding steps, also with sliding-window caches). Nested blocks on
    the same model: the innermost block's interventions apply. Yields the model.
    """
    check_supported(model)
    plan = make_plan(model, interventions)  # validates before the model is touched
    _register()
    session = _Session(model, plan, backend, recorder)
    configs = model_configs(model)
    saved = [(c, c.__dict__.get("_attn_implementation_internal", None), "_attn_implementation_internal" in c.__dict__) for c in configs]

    start_calls = []

    def before_forward(_module, _args):
        start_calls.append(_CALLS[0])

    def after_forward(_module, _args, _output):
        start = start_calls.pop() if start_calls else 0
        if _CALLS[0] == start:
            raise UnsupportedModelError(
                f"{type(model).__name__} ran a forward pass without calling the registered attention function; "
                "it bypasses transformers' AttentionInterface, so headint cannot intervene in it"
            )

    from transformers import PreTrainedModel

    handles = []
    try:
        with _LOCK:
            _SESSIONS.append(session)
        for c in configs:
            c._attn_implementation_internal = ATTN_NAME
        handles.append(model.register_forward_pre_hook(before_forward))
        handles.append(model.register_forward_hook(after_forward))
        for m in model.modules():
            if isinstance(m, PreTrainedModel):
                handles.append(m.register_forward_pre_hook(session.set_q_start, with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()
        for c, value, had in saved:
            if had:
                c._attn_implementation_internal = value
            else:
                c.__dict__.pop("_attn_implementation_internal", None)
        with _LOCK:
            if session in _SESSIONS:
                _SESSIONS.remove(session)


def _apply_qkv_edits(edits, q, k, v):
    tensors = {"q": q, "k": k, "v": v}
    for which, sel, values in edits:
        x = tensors[which]
        tensors[which] = torch.where(sel.to(x.device)[..., None], values.to(x.device, x.dtype), x)
    return tensors["q"], tensors["k"], tensors["v"]


def headint_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``"headint"`` (query ``[B, Hq, Tq, D]``, key/value
    ``[B, Hkv, Tk, D]``; returns ``([B, Tq, Hq, D], None)`` as ``transformers`` expects)."""
    session = _session_for(module)
    if session is None:
        raise RuntimeError(
            f"{type(module).__name__} called headint's attention outside headint.intervene(); "
            "set the model's attn_implementation back to a transformers one"
        )
    if dropout and dropout > 0:
        raise ValueError(f"headint attention does not implement attention dropout (dropout={dropout}); call model.eval()")
    if softcap is not None:
        raise NotImplementedError(f"{type(session.model).__name__} uses attention logit soft-capping, which headint does not implement")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{type(session.model).__name__} uses attention sinks, which headint does not implement")
    _CALLS[0] += 1
    layer = session.layer_of(module)
    B, Hq, Tq, D = query.shape
    Tk = key.shape[2]

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    window = None
    if mask is not None:
        mask = mask[:, :, :, :Tk]
        causal = False  # the mask already carries causality and windows
    else:
        window = sliding_window

    q_start = session.q_start
    if q_start is not None and q_start + Tq < Tk:  # not a forward we saw the start of
        q_start = None
    plan = None
    if session.plan is not None and layer is not None:
        plan = session.plan.for_call(layer, B, Tq, Tk, query.device, query.dtype, q_start=q_start)
    kw: dict[str, Any] = {}
    if plan is not None:
        if plan.qkv_edits:
            query, key, value = _apply_qkv_edits(plan.qkv_edits, query, key, value)
        kw = dict(head_mask=plan.head_mask, head_patch=plan.head_patch, score_scale=plan.score_scale, knockout=plan.knockouts or None)
    if plan is not None and plan.output is not None:  # known from a clean run (see CallPlan.output)
        if tuple(plan.output.shape) != (B, Hq, Tq, D):
            raise ValueError(f"the plan's output for layer {layer} has shape {list(plan.output.shape)}; expected {[B, Hq, Tq, D]}")
        out = plan.output.to(query.dtype)
    else:
        out = attention(query, key, value, causal=causal, attn_mask=mask, scale=scaling, window=window, backend=session.backend, **kw)

    rec = session.recorder
    if rec is not None and layer is not None:
        rec.add(layer, "z", out.transpose(1, 2), concat_dim=1)
        rec.add(layer, "q", query, concat_dim=2)
        rec.add(layer, "k", key, concat_dim=None)
        rec.add(layer, "v", value, concat_dim=None)
        if "pattern" in rec.what:
            args = prepare(query, key, value, causal=causal, attn_mask=mask, scale=scaling, window=window,
                           knockout=kw.get("knockout"), score_scale=kw.get("score_scale"))
            rec.add(layer, "pattern", reference_probs(args), concat_dim=None)
    return out.transpose(1, 2).contiguous(), None
