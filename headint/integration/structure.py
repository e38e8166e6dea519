"""What a model's attention looks like, found by running it once (the *probe*).

headint does not guess a model's attention from its config or class name: on the first
:func:`headint.intervene` (or :func:`model_shape`) for a model it runs one small forward pass
(a few tokens, ``torch.no_grad``, eval mode, in a private replica: the model is only read) twice: with
the model's own attention implementation, and with headint's attention function, watching
every call. From that run it learns, per attention module:

- its *site*: the stack (``"self"``, ``"cross"``, ``"encoder.self"``, ``"decoder.self"``,
  ``"decoder.cross"``; see :mod:`headint.shape`) and the layer index;
- its shape: query heads, key/value heads, query/key head dim and value head dim, read from
  the query/key/value tensors it passes (so per-layer head counts and head dims are exact);

and it refuses (:class:`~headint.integration.adapter.UnsupportedModelError`, naming the model,
the module and the reason) a model where headint's head-level interventions would not mean
what they say:

- no attention call goes through ``transformers``' attention registry;
- a module calls attention more than once per forward (two calls per layer, as in DiffLlama, or
  one module shared by several layers, as in ALBERT);
- the head outputs the attention function returns are not the input of the output projection
  (a per-head gate or a norm sits between them, as in Laguna or BitNet): headint's ``z`` is
  defined as the per-head input of the output projection;
- with headint's attention (no interventions) the model's output differs from its own, also with
  every attention mask built in full: its attention calls are not the whole attention (e.g. a
  bias passed as an extra keyword). (A model that matches only with full masks, such as
  PEGASUS-X, whose decoder modules do not say they are causal, is supported with its masks
  always built in full: :mod:`.masks`.)
- a module's keys are neither its own positions nor the encoder's (merged self- and
  cross-attention, as in T5Gemma2's decoder, or extra memory keys);
- two modules claim the same site.

The result is cached per model (:func:`model_structure`).
"""

from __future__ import annotations

import inspect
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..shape import LayerShape, ModelShape
from . import masks
from .adapter import UnsupportedModelError, check_transformers_version, config_shape, input_device, model_configs, text_config
from .attention_function import register
from .replica import Replica
from .session import Session, close_session, open_session, switched_by_any_session

PROBE_LEN = 5  # encoder / decoder-only probe length
PROBE_DECODER_LEN = 3  # decoder probe length of encoder-decoder models (differs, so cross-attention shows)
# Largest normalised difference (max |a - b| / max(1, max |b|)) between the model's output with
# its own attention and with headint's, per parameter dtype.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
HALF_TOLERANCE = 5e-2

_CACHE: "weakref.WeakKeyDictionary[nn.Module, ModelStructure]" = weakref.WeakKeyDictionary()
_PROBE_LOCK = threading.RLock()


@dataclass
class Site:
    """One attention module: its dotted ``path`` in the model, ``stack``, ``layer``, ``shape``,
    and the module that received its head outputs (``out_proj``: its path, None if none did)."""

    path: str
    module_type: str
    stack: str
    layer: int
    shape: LayerShape
    calls: int = 0
    out_proj: str | None = None


@dataclass
class ModelStructure:
    """The probe's findings: ``sites`` (by ``id(module)``), the :class:`~headint.shape.ModelShape`,
    and ``problems`` (why the model is refused; empty if supported)."""

    model_type: str
    sites: dict[int, Site] = field(default_factory=dict)
    shape: ModelShape | None = None
    problems: list[str] = field(default_factory=list)
    full_masks: bool = False  # its masks are always built in full (see headint.integration.masks)

    def site_of(self, module) -> tuple[str, int] | None:
        """``(stack, layer)`` of an attention module, or None (a module the probe did not see)."""
        s = self.sites.get(id(module))
        return None if s is None else (s.stack, s.layer)

    @property
    def supported(self) -> bool:
        return not self.problems

    def check(self) -> None:
        """Raise :class:`UnsupportedModelError` listing the problems, if any."""
        if self.problems:
            raise UnsupportedModelError(f"headint cannot intervene in {self.model_type}: " + "; ".join(self.problems))


# ---------------------------------------------------------------------------------------------------------
# probe inputs and outputs


def _avoid_ids(config) -> set[int]:
    """Token ids the probe must not use (special tokens: image/audio placeholders, pad, ...)."""
    ids: set[int] = set()
    for cfg in (config, text_config(config)):
        for k, v in vars(cfg).items():
            if (k.endswith("_token_id") or k.endswith("_token_index") or k.endswith("_token_ids")) and v is not None:
                for x in v if isinstance(v, (list, tuple)) else [v]:
                    if isinstance(x, int):
                        ids.add(x)
    return ids


def _token_ids(config, n: int, device) -> torch.Tensor:
    vocab = int(getattr(text_config(config), "vocab_size", None) or getattr(config, "vocab_size", None) or 0)
    if vocab < 2:
        raise UnsupportedModelError(f"{type(config).__name__} has no usable vocab_size; headint probes a model with token ids")
    avoid = _avoid_ids(config)
    ids, t = [], 3
    while len(ids) < n and t < 3 + 4 * vocab:
        x = t % vocab
        if x not in avoid:
            ids.append(x)
        t += 7
    while len(ids) < n:
        ids.append(ids[-1] if ids else 0)
    return torch.tensor([ids], device=device)


def probe_inputs(model) -> dict[str, torch.Tensor]:
    """The probe's keyword inputs: ``input_ids [1, 5]`` (and ``decoder_input_ids [1, 3]`` for an
    encoder-decoder model), all-ones attention masks, no KV cache; for an image model (main input
    ``pixel_values``) one random image of the config's ``image_size``."""
    device = input_device(model)
    cfg = model.config
    params = inspect.signature(model.forward).parameters
    if getattr(model, "main_input_name", "input_ids") == "pixel_values" and "input_ids" not in params:
        vision = getattr(cfg, "vision_config", None) or cfg
        size = getattr(vision, "image_size", None)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if not all(isinstance(s, int) for s in size):
            raise UnsupportedModelError(f"{type(model).__name__} takes pixel_values but its config has no image_size to probe it with")
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(1, int(getattr(vision, "num_channels", 3)), *size, generator=g)
        return {"pixel_values": pixels.to(device, next(model.parameters()).dtype)}
    inputs = {"input_ids": _token_ids(cfg, PROBE_LEN, device)}
    if "attention_mask" in params:
        inputs["attention_mask"] = torch.ones(1, PROBE_LEN, dtype=torch.long, device=device)
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = _token_ids(cfg, PROBE_DECODER_LEN, device)
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def _main_output(out: Any) -> torch.Tensor | None:
    for name in ("logits", "last_hidden_state"):
        x = getattr(out, name, None)
        if isinstance(x, torch.Tensor):
            return x
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, torch.Tensor):
        return out
    return None


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("inf")
    finite = torch.isfinite(b)
    if not bool((torch.isfinite(a) == finite).all()):
        return float("inf")
    if not bool(finite.any()):
        return 0.0
    return float((a - b)[finite].abs().max() / b[finite].abs().max().clamp_min(1.0))


# ---------------------------------------------------------------------------------------------------------
# the probe


@dataclass
class _Call:
    module: nn.Module
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    out: torch.Tensor  # [B, Tq, H * Dv]
    keywords: list[str]
    matched: str | None = None
    reached: str | None = None  # a module that got the head outputs unchanged but is not a projection


class _Watcher:
    """Collects the attention calls of the probe forward and which module received each output."""

    def __init__(self, model):
        self.calls: list[_Call] = []
        self.names = {id(m): n for n, m in model.named_modules()}

    def observe(self, module, query, key, value, out, kwargs) -> None:
        B, Tq, H, Dv = out.shape
        extra = sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in _BENIGN_KEYWORDS)
        self.calls.append(_Call(module, tuple(query.shape), tuple(key.shape), tuple(value.shape),
                                out.detach().reshape(B, Tq, H * Dv), extra))

    def pre_hook(self, module, args, kwargs) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states", kwargs.get("input"))
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return
        w = _projection_weight(module)
        name = self.names.get(id(module), type(module).__name__)
        for c in self.calls:
            if c.matched is None and c.out.shape == x.shape and torch.equal(c.out, x.detach()):
                if w is not None and w.dim() == 2 and x.shape[-1] in tuple(w.shape):
                    c.matched = name  # only a projection (a 2-D weight taking this width) counts as the output projection
                elif w is None and c.reached is None and list(module.children()) == []:  # no weight at all (a norm has one)
                    c.reached = f"{name} ({type(module).__module__}.{type(module).__name__})"


def _projection_weight(module) -> torch.Tensor | None:
    """A module's weight matrix: its ``weight`` tensor, or what a ``weight()`` method returns (the
    packed weight of dynamically quantized ``torch.ao`` linear layers); None if it has neither."""
    w = getattr(module, "weight", None)
    if callable(w) and not isinstance(w, torch.Tensor):
        try:
            w = w()
        except Exception:  # not an accessor
            return None
    return w if isinstance(w, torch.Tensor) else None


# Keywords a model passes to its attention function that carry no attention semantics headint ignores.
_BENIGN_KEYWORDS = {"position_ids", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k",
                    "max_length_q", "max_length_k", "position_embeddings", "output_attentions", "token_type_ids"}


def _site_name(path: str, cross: bool, parts: set[str]) -> str:
    kind = "cross" if cross else "self"
    part = _part(path)
    if len(parts) > 1 and part:
        return f"{part}.{kind}"
    return kind


def _part(path: str) -> str:
    """``"encoder"`` / ``"decoder"``: the first path component naming one (``encoder``,
    ``text_decoder``, ...), else ``""``."""
    for comp in path.split("."):
        c = comp.lower()
        if "encoder" in c:
            return "encoder"
        if "decoder" in c:
            return "decoder"
    return ""


def _run(model, inputs) -> torch.Tensor | None:
    return _main_output(model(**inputs))


def probe(model) -> ModelStructure:
    """Run the probe forward (see the module docstring) and return its findings, uncached.

    Both forwards run in a private :class:`~headint.integration.replica.Replica` of the model (in
    eval mode, with the model's own attention implementation, then switched to headint's), so the
    model itself is only read: another thread using it meanwhile sees nothing. A model with
    instance-level forwards of its own (``Replica.foreign``: they may run the model's modules, not
    the replica's) is probed in place instead, as ``intervene`` runs it (eval mode and the switch
    for the length of the probe, restored after)."""
    st = ModelStructure(type(model).__name__)
    try:
        inputs = probe_inputs(model)
    except UnsupportedModelError as e:
        st.problems.append(str(e))
        return st
    replica = Replica(model)
    root = model if replica.foreign else replica.root
    flags = [(m, m.training) for m in root.modules()]
    reference = probed = None
    register()
    try:
        root.eval()
        with torch.no_grad():
            if root is not model or not switched_by_any_session(model):  # else the model's own attention is not reachable now
                reference = _run(root, inputs)
            watcher, probed = _probed_run(root, inputs)
            configs = model_configs(root)
            if reference is not None and probed is not None and not _difference(probed, reference) <= _tolerance(root) \
                    and not all(masks.is_marked(c) for c in configs):
                # a model that relies on its causal mask being built (eager-only models whose modules do not
                # say they are causal): headint's attention with every mask materialized may be exactly its own
                with masks.materialized_masks(configs):
                    full = _probed_run(root, inputs)
                if _difference(full[1], reference) <= _tolerance(root):
                    masks.mark(model_configs(model))  # replicas made from now on copy the mark (Replica._config)
                    watcher, probed = full
                    st.full_masks = True
    except (NotImplementedError, UnsupportedModelError) as e:
        st.problems.append(str(e))
        return st
    except Exception as e:  # the model cannot run on the probe inputs: nothing can be learnt about it
        st.problems.append(f"its probe forward (inputs {sorted(inputs)}) failed with {type(e).__name__}: {e}")
        return st
    finally:
        for m, training in flags:
            m.training = training
    _analyse(root, st, watcher, reference, probed)
    if root is not model:
        st.sites = {replica.original_id(mid): site for mid, site in st.sites.items()}  # the model's own modules
    return st


def _tolerance(model) -> float:
    return TOLERANCE.get(next(model.parameters()).dtype, HALF_TOLERANCE)


def _watch(watcher: _Watcher):
    def hook(module, args, kwargs):
        return watcher.pre_hook(module, args, kwargs)

    hook._headint_hook = True  # a replica made meanwhile leaves it out
    return hook


def _probed_run(model, inputs) -> tuple[_Watcher, torch.Tensor | None]:
    """One forward of ``model`` (the probe's replica, or the model itself) with headint's
    attention (no interventions), every call watched."""
    watcher = _Watcher(model)
    session = Session(model, None, "auto")
    session.observer = watcher.observe
    handles = [m.register_forward_pre_hook(_watch(watcher), with_kwargs=True) for m in model.modules()]
    try:
        open_session(session)
        return watcher, _run(model, inputs)
    finally:
        close_session(session)
        for h in handles:
            h.remove()


def _analyse(model, st: ModelStructure, watcher: _Watcher, reference, probed) -> None:
    calls = watcher.calls
    if not calls:
        st.problems.append("no attention call goes through transformers' attention registry (AttentionInterface)")
        return
    names = watcher.names
    counts: dict[int, int] = {}
    first: dict[int, _Call] = {}
    for c in calls:
        counts[id(c.module)] = counts.get(id(c.module), 0) + 1
        first.setdefault(id(c.module), c)
    for mid, n in counts.items():
        if n > 1:
            m = first[mid].module
            st.problems.append(
                f"attention module {names.get(mid)} ({type(m).__name__}) calls attention {n} times in one forward pass "
                "(several attention calls per layer, as in DiffLlama, or one module shared by several layers, as in "
                "ALBERT), so a head of a layer is not one call"
            )
    for mid, c in first.items():
        if c.matched is None and c.reached is not None:
            st.problems.append(
                f"the head outputs of {names.get(mid)} ({type(c.module).__name__}) reach {c.reached} unchanged, but it has no "
                "weight matrix headint recognises as an output projection's (a 2-D `weight` tensor, or a `weight()` accessor "
                "returning one), so headint cannot tell that its input is the per-head z"
            )
        elif c.matched is None:
            m = c.module
            children = [n for n, _ in m.named_children()]
            st.problems.append(
                f"the head outputs of {names.get(mid)} ({type(m).__name__}) do not reach its output projection unchanged "
                f"(something between them, e.g. a per-head gate or a norm, alters them; the module's parts: {children}), "
                "so headint's z would not be the per-head input of the output projection"
            )
    if reference is not None and probed is not None:
        diff = _difference(probed, reference)
        tol = _tolerance(model)
        if not diff <= tol:
            extra = sorted({k for c in calls for k in c.keywords})
            hint = f"; its attention calls also pass {extra}, which headint does not apply" if extra else ""
            st.problems.append(
                f"with headint's attention and no interventions its output differs from its own attention implementation "
                f"by {diff:.3g} (tolerance {tol:g}): its attention calls are not the whole attention{hint}"
            )
    _sites(model, st, first, names)


def _sites(model, st: ModelStructure, first: dict[int, _Call], names: dict[int, str]) -> None:
    parts = {_part(names.get(mid, "")) for mid in first}
    by_stack: dict[str, list[tuple[int, _Call]]] = {}
    for mid, c in first.items():
        _, Hq, Tq, D = c.q_shape
        Tk = c.k_shape[2]
        cross = Tq != Tk or bool(getattr(c.module, "is_cross_attention", False))
        if Tq != Tk and not (Tq == PROBE_DECODER_LEN and Tk == PROBE_LEN):
            st.problems.append(
                f"attention module {names.get(mid)} ({type(c.module).__name__}) attends over {Tk} keys for {Tq} queries in "
                f"the probe (inputs of {PROBE_LEN} tokens, decoder inputs of {PROBE_DECODER_LEN}): its keys are neither its "
                "own positions (self-attention) nor the encoder's (cross-attention), e.g. merged self- and cross-attention "
                "or extra memory keys, so headint's absolute positions cannot name them"
            )
            continue
        by_stack.setdefault(_site_name(names.get(mid, ""), cross, parts), []).append((mid, c))
    text = text_config(model.config)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False)) or len(parts - {""}) > 1
    stacks: dict[str, tuple[LayerShape, ...]] = {}
    for stack, members in by_stack.items():
        indexed = all(isinstance(getattr(c.module, "layer_idx", None), int) for _, c in members)
        layers: dict[int, LayerShape] = {}
        for i, (mid, c) in enumerate(members):
            layer = int(c.module.layer_idx) if indexed else i
            shape = LayerShape(c.q_shape[1], c.k_shape[1], c.q_shape[3], c.v_shape[3])
            if layer in layers:
                other = next(names.get(m2) for m2, s2 in st.sites.items() if s2.stack == stack and s2.layer == layer)
                st.problems.append(f"attention modules {other} and {names.get(mid)} both sit at layer {layer} of the {stack!r} stack")
                continue
            layers[layer] = shape
            st.sites[mid] = Site(names.get(mid, ""), type(c.module).__name__, stack, layer, shape, 1, c.matched)
        n = max(layers) + 1
        if stack == "self" and not encoder_decoder:
            n = max(n, int(getattr(text, "num_hidden_layers", 0) or 0))
        kinds = getattr(text, "layer_types", None)
        full = []
        for l in range(n):
            if l in layers:
                full.append(layers[l])
            else:
                kind = kinds[l] if isinstance(kinds, (list, tuple)) and l < len(kinds) and isinstance(kinds[l], str) else ""
                full.append(LayerShape(0, 0, 0, 0, kind=kind if kind and "attention" not in kind else "no attention call"))
        stacks[stack] = tuple(full)
    if not stacks:
        return
    default = "self" if "self" in stacks else "decoder.self" if "decoder.self" in stacks else sorted(stacks)[0]
    st.shape = ModelShape.from_layers(stacks, default)


def model_structure(model) -> ModelStructure:
    """The probe's findings for ``model`` (probed once, then cached while the model lives)."""
    with _PROBE_LOCK:
        st = _CACHE.get(model)
        if st is None:
            st = _CACHE[model] = probe(model)
        return st


def check_supported(model) -> ModelStructure:
    """Raise :class:`UnsupportedModelError` (naming the model and the reason) unless headint's
    interventions mean what they say in ``model``; returns the model's structure."""
    from transformers import PreTrainedModel

    check_transformers_version()
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"headint.intervene needs a transformers PreTrainedModel, got {type(model).__name__}")
    st = model_structure(model)
    st.check()
    return st


def model_replica(model) -> Replica:
    """A private :class:`~headint.integration.replica.Replica` of a supported ``model``, with
    its structure (checked as by :func:`check_supported`). A model whose modules carry
    instance-level forwards of their own (``Replica.foreign``) is refused: they may run the
    model's modules instead of the replica's, and a scan must not change the model to run it."""
    rep = Replica(model, check_supported(model))
    if rep.foreign:
        shown = rep.foreign[:4] + (["..."] if len(rep.foreign) > 4 else [])
        raise UnsupportedModelError(
            f"{type(model).__name__}: modules {shown} carry an instance-level forward that is code of its own (not a "
            "bound method or functools.partial of the module), which may run the model's submodules instead of the scan's "
            "private replica of it; headint scans only run models they can run without changing them "
            "(headint.intervene still works)")
    return rep


def model_shape(model_or_config) -> ModelShape:
    """The attention geometry of a model (probed: exact per layer and per stack), or of a config
    (read from it: every layer alike, see :func:`~headint.integration.adapter.config_shape`)."""
    if isinstance(model_or_config, nn.Module):
        return check_supported(model_or_config).shape
    return config_shape(model_or_config)
