"""The engine behind every scan: a clean pass cached once, then batched variant runs, all in a
private replica of the model.

A :class:`VariantRunner` holds one set of examples (a "base run") and evaluates a metric for
many intervened variants at once: each batch row is one (variant, example) pair carrying its own
per-row plan. It never runs or changes the user's model: it runs the model's own forward code
on a :class:`~headint.integration.replica.Replica` (private module objects over the model's
own parameter and buffer tensors, in eval mode, with private configs switched to headint's
attention), and every speed shortcut below changes that replica only, in the scanning thread.
The shortcuts, all exact (which edits each understands: :mod:`headint.scans.shortcuts`):

- depth reuse: a run whose interventions start at layer ``l`` replays the cached clean outputs
  of blocks ``< l`` (stand-ins for those blocks in the replica) instead of recomputing them;
- position reuse: on causal models, a run whose interventions start at position ``p`` feeds only
  tokens ``>= p``, with what the clean run put in the KV cache for positions ``< p`` as its
  cache; checked once per base run against its clean output before any variant uses it;
- logit restriction: only the final position's hidden state is unembedded, and only for the
  token ids the metric asks for (:mod:`.metric_logits`);
- last-query final block (``Shortcuts.last_query``, last-position metrics on causal models whose
  rows all end at position ``T - 1``): the replica's final block computes keys/values at every
  position but everything else at the last one only (see
  :class:`~headint.integration.blocks.LastQueryBlock`); checked once per base run against its
  clean output before any variant uses it;
- clean attention at the first intervened layer (``Shortcuts.clean_attention``, plans that only
  replace head outputs): that layer's inputs are the clean run's, so its attention output is the
  cached clean one, blended with the replacement; for whole rows (no position reuse) the work of
  its attention module before the attention call (q/k/v projections, q/k norms: the direct
  children that ran once, on whole rows) is replayed from one capture of the clean rows per
  layer (:meth:`VariantRunner.children_before_attention`), so only the output projection and
  what follows run there.

``cost`` counts what actually ran (:class:`~headint.scans.cost.Cost`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, replace

import torch

from ..integration.blocks import (AttentionReached, capture_block_outputs, capture_children_before_attention, frozen_outputs,
                                  last_query_block, map_tensors, replay_blocks, replay_children)
from ..integration.final_norm import FinalNorm, FinalNormError, final_norm_candidates, frozen_final_norm, observe_formula
from ..integration.record import Recorder
from ..integration.replica import Replica
from ..integration.structure import model_replica
from ..metrics import Metric, last_positions, select_logits
from ..plan import Plan
from .cost import Cost
from .inputs import InputLayout, input_layout, rows_of
from .metric_logits import ColumnsOf, column_form, column_values, last_position_form, model_logits, restricted_logits
from .shortcuts import NONE, PER_POSITION_EDITS, AllowedEdits, CleanAttentionPlan, Shortcuts


@dataclass(frozen=True)
class CleanPass:
    """What a base run caches: each block's output, head outputs z ``[N, T, H, D]`` per layer,
    keys/values ``[N, Hkv, T, D]`` per layer, the metric's logits (its layout), the last
    position's logits ``[N, V]`` where a metric needs the clean distribution, whether the model's
    logits are its base model's output unembedded (``restricted``: then variants unembed only
    what the metric reads) with that output's last position ``[N, d]``, whether the model is
    causal, and what each layer put in the KV cache (see :func:`clean_pass`)."""

    block_outputs: list
    z: dict[int, torch.Tensor]
    k: dict[int, torch.Tensor]
    v: dict[int, torch.Tensor]
    logits: torch.Tensor
    full_last_logits: torch.Tensor | None
    restricted: bool
    last_hidden: torch.Tensor | None
    causal: bool
    cached: dict | None = None  # {layer: (keys, values)} as the model caches them: the prefix of position reuse
    layout: InputLayout | None = None  # how the batch reaches the model's forward (headint.scans.inputs)


def is_causal(replica: Replica) -> bool:
    """Whether the model's blocks attend causally (decoder blocks have causal attention modules)."""
    return any(getattr(m, "is_causal", False) for m in replica.parts.blocks[0].modules())


def shares_kv(parts) -> bool:
    """Whether the model's blocks hand keys/values to later blocks within one forward (cross-layer
    KV sharing: Gemma 4's ``num_kv_shared_layers``, Kolibri; their blocks take ``shared_kv_states``,
    filled by a source layer's attention and read by later layers'). Such a model's variants run
    whole forwards: a replayed source block (depth reuse) or a cached prefix (position reuse)
    would leave its readers without their keys."""
    for block in parts.blocks:
        try:
            if "shared_kv_states" in inspect.signature(block.forward).parameters:
                return True
        except (TypeError, ValueError):
            continue
    return False


def cache_kwarg(module) -> str:
    """Newer ``transformers`` models take the KV cache as ``cache``, older as ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def clean_pass(replica: Replica, batch: dict, metric: Metric, backend: str, cost: Cost) -> CleanPass:
    """Run ``batch`` once through the replica, caching what variant runs reuse.

    A causal decoder runs with an empty KV cache that keeps every position (no sliding-window
    layers): afterwards it holds what each layer hands its cache, as the model itself would feed
    it back (per-head keys/values, or e.g. DeepSeek-V3's compressed latents), the prefix of
    position reuse. Should the model not run so, it runs without (then the prefix is the recorded
    keys/values, and :meth:`VariantRunner.check_position_reuse` decides)."""
    parts = replica.parts
    L = parts.shape.n_layers
    N, T = batch["input_ids"].shape
    causal = is_causal(replica)
    layout = input_layout(replica.root)
    with_cache = causal and not layout.encoder_decoder
    while True:
        store: list = [None] * L
        rec = Recorder(("z", "k", "v"))
        base_out: list = []
        kwargs = layout.model_inputs(batch)
        cache = None
        if with_cache:
            from transformers import DynamicCache

            cache = kwargs[cache_kwarg(replica.root)] = DynamicCache()
            kwargs["use_cache"] = True
        elif causal:
            kwargs["use_cache"] = False
        capture = parts.base.register_forward_hook(lambda _m, _a, out: base_out.append(out))  # the replica's: private
        try:
            with replica.session(None, backend, rec), capture_block_outputs(parts, store):
                out = replica.root(**kwargs)
            break
        except Exception:
            if not with_cache:
                raise
            with_cache = False  # e.g. a model that takes no such cache: run as before
        finally:
            capture.remove()
    cost.add(N, L, T)
    full = out.logits if hasattr(out, "logits") else out.last_hidden_state
    # Variants take the restricted path (final hidden state -> only the logits the metric needs)
    # only if unembedding the base model's output reproduces the model's own logits.
    restricted, last_hidden = False, None
    if parts.unembed is not None and hasattr(out, "logits") and base_out:
        hidden = getattr(base_out[-1], "last_hidden_state", None)
        if isinstance(hidden, torch.Tensor) and hidden.shape[-1] == parts.unembed.in_features:  # e.g. ELECTRA: a head sits between
            # (not when its weight is offloaded to the meta device: only the module's own forward loads it)
            restricted = parts.unembed.weight.device.type != "meta" and torch.allclose(
                parts.unembed(hidden[:1]), full[:1], rtol=1e-4, atol=1e-4)
            last_hidden = hidden[:, -1].detach()
    logits = select_logits(full, metric, batch) if metric.position == "last" else full
    full_last = None
    if metric.needs_clean or metric.token_ids(batch) is None:
        full_last = full[torch.arange(N), last_positions(batch["attention_mask"])]
    att = parts.shape.attention_layers  # layers without attention (hybrid models) record nothing
    missing = [l for l in att if ("z", l) not in rec.tensors]
    if missing:
        raise RuntimeError(f"{type(replica.model).__name__}: the attention of layers {missing} did not run in the scan's private "
                           "replica of the model (a module runs code bound to the model itself, e.g. an instance-level forward "
                           "that calls the model's own module), so headint cannot scan it without changing the model")
    return CleanPass(store, {l: rec.tensors[("z", l)] for l in att}, {l: rec.tensors[("k", l)] for l in att},
                     {l: rec.tensors[("v", l)] for l in att}, logits, full_last, bool(restricted), last_hidden, causal,
                     _cache_contents(cache, att, N, T), layout)


def _cache_contents(cache, layers: list[int], N: int, T: int) -> dict | None:
    """``{layer: (keys, values)}`` as the model put them in ``cache`` (``[N, ..., T, ...]``,
    positions on dim -2; the same storage as the recorded keys/values where they are those), or
    None unless every layer's are there."""
    out = {}
    for l in layers:
        layer = cache.layers[l] if cache is not None and l < len(getattr(cache, "layers", ())) else None
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not all(isinstance(x, torch.Tensor) and x.dim() >= 3 and x.shape[0] == N and x.shape[-2] == T for x in (k, v)):
            return None
        out[l] = (k.detach(), v.detach())
    return out


class VariantRunner:
    """Evaluates ``metric`` on intervened variants of one base run, in ``replica``.

    Args:
        replica: the model's private :class:`~headint.integration.replica.Replica` (with its structure).
        batch: the base run's inputs (see :func:`~headint.scans.inputs.as_batch`), N examples.
        base: the base run's :class:`CleanPass` (:func:`clean_pass`), its logits in ``metric``'s layout.
        metric: a :class:`~headint.metrics.Metric`.
        clean_logits: the clean run's logits in the metric's layout (for metrics that need them).
        cost: where the work is counted (the clean pass's included).
    """

    def __init__(self, replica: Replica, batch: dict, base: CleanPass, metric: Metric, *, backend: str = "auto",
                 clean_logits=None, cost: Cost | None = None):
        self.replica = replica
        self.model = replica.root
        self.parts = replica.parts
        self.batch = batch
        self.base = base
        self.metric = metric
        self.backend = backend
        self.clean_logits = clean_logits
        self.cost = cost if cost is not None else Cost()
        self.N, self.T = batch["input_ids"].shape
        self.causal = base.causal
        self.restricted = base.restricted
        self.layout = base.layout if base.layout is not None else input_layout(self.model)
        self.shares_kv = shares_kv(self.parts)
        self.all_attention = self.parts.shape.attention_layers == list(range(self.parts.shape.n_layers))
        self._children = None  # (layer, attention module, captured outputs): see children_before_attention
        self._last_query: tuple[bool, str] | None = None  # see check_last_query
        self._position_reuse: tuple[bool, str] | None = None  # see check_position_reuse
        self._base_values: torch.Tensor | None = None
        self._final_norm: FinalNorm | None = None
        self._mlp_outputs: dict[int, tuple[str, torch.Tensor]] | None = None

    @classmethod
    def start(cls, model_or_replica, batch: dict, metric: Metric, *, backend: str = "auto") -> "VariantRunner":
        """A runner of ``batch`` with its clean pass done (``model_or_replica``: a model, run in a
        new replica of it, or a :class:`~headint.integration.replica.Replica`)."""
        replica = model_or_replica if isinstance(model_or_replica, Replica) else model_replica(model_or_replica)
        cost = Cost()
        return cls(replica, batch, clean_pass(replica, batch, metric, backend, cost), metric, backend=backend, cost=cost)

    def rows(self, ex: torch.Tensor) -> dict:
        return rows_of(self.batch, ex)

    def base_values(self) -> torch.Tensor:
        """Metric values ``[N]`` of the unintervened base run (computed once)."""
        if self._base_values is None:
            self._base_values = self.metric(self.base.logits, self.batch, clean_logits=self.clean_logits).float()
        return self._base_values

    @property
    def last_query_note(self) -> str:
        """Whether variant runs may run the final block for the last query only, and why not."""
        return "not checked" if self._last_query is None else self._last_query[1]

    # -- runs -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, ex: torch.Tensor, plan: Plan | None, start_layer: int = 0, start_pos: int = 0, *,
            shortcuts: Shortcuts = NONE, freeze_final_norm: bool = False, freeze_mlps_from: int | None = None) -> torch.Tensor:
        """Like :meth:`run_differentiable`, without building a graph, with the optional ``shortcuts``
        (:class:`~headint.scans.shortcuts.Shortcuts`; values are the same with or without):
        ``clean_attention``: the plan only edits head outputs at ``start_layer``, so that layer's
        attention output is the clean run's (its inputs are), blended with the replacement;
        ``last_query``: the final block runs for the last query only where
        :meth:`check_last_query` allows it (last-position metrics; no effect otherwise).
        ``freeze_final_norm``: the model's final norm divides by the base run's per-token scale
        instead of recomputing it (:meth:`final_norm`). ``freeze_mlps_from``: the MLPs of layers
        ``>= freeze_mlps_from`` return the base run's outputs (:meth:`mlp_outputs`)."""
        return self._run(ex, plan, start_layer, start_pos, None, shortcuts, freeze_final_norm, freeze_mlps_from)

    def run_differentiable(self, ex: torch.Tensor, plan: Plan | None, start_layer: int = 0, start_pos: int = 0, recorder=None) -> torch.Tensor:
        """Metric values ``[R]`` for rows ``ex`` (example indices) under the per-row ``plan``.

        ``start_layer``: the plan intervenes at no layer below it (blocks below are replayed).
        ``start_pos``: the plan changes no position below it (causal models only; earlier
        positions come from the clean keys/values).
        """
        return self._run(ex, plan, start_layer, start_pos, recorder, NONE)

    def _run(self, ex, plan, start_layer, start_pos, recorder, shortcuts: Shortcuts, freeze_final_norm: bool = False,
             freeze_mlps_from: int | None = None) -> torch.Tensor:
        if plan is not None and start_layer and any(l < start_layer for l in plan.layers()):
            raise ValueError(f"depth reuse: the plan intervenes at layers {sorted(plan.layers())}, below start_layer {start_layer}")
        if self.shares_kv:
            start_layer = start_pos = 0  # later layers read earlier layers' keys/values within the forward (see shares_kv)
        if start_pos and not (self.causal and self.metric.position == "last" and self.all_attention
                              and self.layout.reusable(self.batch) and self.check_position_reuse(start_pos)):
            start_pos = 0  # position reuse needs every layer's state as keys/values, fed back right, and inputs cut alike
        children = None
        if shortcuts.clean_attention and plan is not None:
            z = self.base.z[start_layer]
            plan = CleanAttentionPlan(plan, start_layer, z[ex.to(z.device)].transpose(1, 2))
            if start_pos == 0:  # the captured outputs are of whole rows
                children = self.children_before_attention(start_layer)
        last_query = shortcuts.last_query and recorder is None and self.T - start_pos >= 2 and self.check_last_query()
        if plan is not None and start_pos:
            plan = AllowedEdits(plan, PER_POSITION_EDITS, "position reuse")
        elif plan is not None and last_query:
            plan = AllowedEdits(plan, PER_POSITION_EDITS, "last_query", {self.parts.shape.n_layers - 1})
        norm = self.final_norm() if freeze_final_norm else None
        mlps = None
        if freeze_mlps_from is not None:
            mlps = {path: out[ex.to(out.device)] for l, (path, out) in self.mlp_outputs().items() if l >= freeze_mlps_from}
        fw = self._variant_forward(ex, plan, start_layer, start_pos, recorder, last_query, children, norm, mlps)
        L = self.parts.shape.n_layers
        self.cost.add(len(ex), L - start_layer, self.T - start_pos)
        if fw.second_call_tokens:
            self.cost.add_final_second_call(len(ex), fw.second_call_tokens, fw.last_query_ran)
        if shortcuts.clean_attention and plan is not None:
            self.cost.clean_attention_rows += len(ex)
        if fw.children_replayed:
            self.cost.replayed_projection_rows += len(ex)
        rows = fw.rows
        clean = None
        if self.metric.needs_clean:
            clean = self.clean_logits[ex] if self.clean_logits is not None else None
        if fw.is_hidden and isinstance(self.metric, ColumnsOf):  # only the columns the metric reads
            values = column_values(self.metric, fw.out, rows, start_pos, self.parts.unembed, clean).float()
        else:
            if fw.is_hidden:
                logits = restricted_logits(self.metric, fw.out, rows, start_pos, self.parts.unembed)
            else:
                logits = model_logits(self.metric, fw.out, rows, start_pos)
            values = self.metric(logits, rows, clean_logits=clean).float()
        if start_pos:
            # rows whose metric position lies before start_pos are unaffected: their base value
            before = last_positions(rows["attention_mask"]) < start_pos
            if before.any():
                values = torch.where(before, self.base_values()[ex], values)
        return values

    def _variant_forward(self, ex, plan, start_layer: int, start_pos: int, recorder, last_query: bool,
                         children: tuple | None = None, norm: FinalNorm | None = None, mlps: dict | None = None) -> "_Forward":
        """One forward of rows ``ex`` under ``plan``, in the replica. ``children``: ``(attention
        module, {name: captured output})`` of layer ``start_layer`` (see
        :meth:`children_before_attention`), replayed for these rows."""
        rows = self.rows(ex)
        inputs = self.layout.model_inputs(rows, start_pos)
        # Blocks below start_layer are replayed; only the last one's output reaches a computed block.
        replayed = [None] * start_layer
        if start_layer:
            replayed[-1] = map_tensors(self.base.block_outputs[start_layer - 1],
                                       lambda t: t[ex.to(t.device)][:, start_pos:] if t.dim() >= 2 and t.shape[0] == self.N else t)
        past = None
        if start_pos:
            from transformers import DynamicCache

            past = DynamicCache(config=self.model.config)
            for l in range(self.parts.shape.n_layers):
                k, v = self.base.cached[l] if self.base.cached is not None else (self.base.k[l], self.base.v[l])
                past.update(k[ex.to(k.device)][..., :start_pos, :], v[ex.to(v.device)][..., :start_pos, :], l)
        final = last_query_block(self.parts, self.T) if last_query else contextlib.nullcontext()
        replay = replay_children(*children, ex, self.N, self.T) if children is not None and children[1] else contextlib.nullcontext()
        frozen = frozen_final_norm(self.parts, norm, ex) if norm is not None else contextlib.nullcontext()
        frozen_mlps = frozen_outputs(self.model, mlps) if mlps else contextlib.nullcontext()
        # the frozen stand-ins go in first: their paths lead through the model's own blocks, not through stand-ins
        with frozen_mlps, frozen, self.replica.session(plan, self.backend, recorder), replay_blocks(self.parts, start_layer, replayed), \
                final as stand_in, replay as replay_stand_ins:
            out, is_hidden = self._forward(inputs, past)
        if last_query and not stand_in.second_call_tokens:
            raise RuntimeError("the final block did not run in two steps although check_last_query() allowed it")
        return _Forward(out, is_hidden, rows,
                        last_query_ran=bool(last_query and stand_in.ran_shortcut),
                        second_call_tokens=stand_in.second_call_tokens if last_query else 0,
                        children_replayed=bool(replay_stand_ins) and all(r.replayed for r in replay_stand_ins))

    def _forward(self, inputs: dict, past=None):
        """Final hidden states (restricted path) or logits; returns (tensor, is_hidden)."""
        kwargs = dict(inputs)
        if past is not None:
            kwargs[self._cache_kwarg] = past
            kwargs["use_cache"] = True
        elif self.causal:
            kwargs["use_cache"] = False
        if self.restricted:
            out = self.parts.base(**kwargs)
            return out.last_hidden_state, True
        out = self.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return logits, False

    @functools.cached_property
    def _cache_kwarg(self) -> str:
        return cache_kwarg(self.parts.base if self.restricted else self.model)

    # -- what the shortcuts need, found once -------------------------------------------------------

    @torch.no_grad()
    def mlp_outputs(self) -> dict[int, tuple[str, torch.Tensor]]:
        """``{layer: (path of its MLP in the model, its output [N, T, d] in the base run)}`` for
        every block with an MLP (cached). Which module is a block's MLP comes from the circuit
        probe (:func:`headint.circuits.structure.circuit_structure`: the block's child whose
        output completes ``block output = input + attention + MLP``), which refuses models whose
        residual stream is not such a sum (naming why); one forward of the base rows records the
        outputs. An MLP whose output is not one ``[N, T, d]`` tensor (e.g. a mixture of experts
        returning router logits too) is refused."""
        if self._mlp_outputs is not None:
            return self._mlp_outputs
        from ..circuits.structure import circuit_structure  # the circuit probe (imported when used)

        with torch.enable_grad():  # the probe differentiates (once per model, cached)
            st = circuit_structure(self.replica.model)
        paths = {id(m): name for name, m in self.replica.model.named_modules()}
        found = {lp.layer: paths[id(lp.mlp)] for lp in st.layers if lp.mlp is not None}
        seen: dict[int, torch.Tensor] = {}
        handles = []
        for l, path in found.items():
            def hook(_m, _a, out, l=l):
                seen[l] = out
            handles.append(self.model.get_submodule(path).register_forward_hook(hook))
        self._base_rows_forward(handles)
        out = {}
        for l, path in found.items():
            y = seen.get(l)
            if not isinstance(y, torch.Tensor) or y.dim() != 3 or y.shape[:2] != (self.N, self.T):
                what = type(y).__name__ if not isinstance(y, torch.Tensor) else f"shape {list(y.shape)}"
                raise RuntimeError(f"{type(self.replica.model).__name__}: the MLP of layer {l} ({path}) returned {what}, not one "
                                   f"[{self.N}, {self.T}, d] tensor; headint cannot freeze it")
            out[l] = (path, y.detach())
        self._mlp_outputs = out
        return out

    def _base_rows_forward(self, handles: list) -> None:
        """One forward of the base rows with the hooks ``handles`` installed (removed after, also
        when it raises), counted in the cost."""
        try:
            ex = torch.arange(self.N, device=self.batch["input_ids"].device)
            self._variant_forward(ex, None, 0, 0, None, False)
        finally:
            for h in handles:
                h.remove()
        self.cost.add(self.N, self.parts.shape.n_layers, self.T)

    @torch.no_grad()
    def final_norm(self) -> FinalNorm:
        """The model's final norm with the base run's per-token scale ``[N, T]`` (cached; see
        :mod:`headint.integration.final_norm`): one forward of the base rows records the input and
        output of every norm-like module of the base model outside its blocks; the final norm is
        the one that runs last, after the last block, and its formula is the one that reproduces
        its output. :class:`~headint.integration.final_norm.FinalNormError` names what is missing."""
        if self._final_norm is not None:
            return self._final_norm
        candidates = final_norm_candidates(self.parts)
        model = type(self.replica.model).__name__
        if not candidates:
            raise FinalNormError(f"{model}: no normalisation module outside the transformer blocks (a final norm); "
                                 "effect='direct_frozen_ln' needs one")
        order: list = []
        seen: dict[str, tuple] = {}

        def hook(name):
            def fn(_m, args, out):
                if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                    seen[name] = (args[0].detach(), out.detach())
                order.append(name)
            return fn

        handles = [m.register_forward_hook(hook(name)) for name, m in candidates]
        handles.append(self.parts.blocks[len(self.parts.blocks) - 1].register_forward_hook(lambda *_: order.append(None)))
        self._base_rows_forward(handles)
        last = order[-1] if order else None
        if last is None or None not in order or order.count(last) != 1 or order.index(last) < order.index(None):
            raise FinalNormError(f"{model}: no norm module runs once after the last transformer block (norm-like modules "
                                 f"outside the blocks: {[n for n, _ in candidates]}); effect='direct_frozen_ln' needs a final norm")
        if last not in seen or seen[last][0].shape != (self.N, self.T, seen[last][0].shape[-1]):
            raise FinalNormError(f"{model}: the final norm {last!r} does not map a [N, T, d] tensor to a tensor; cannot freeze its scale")
        x, y = seen[last]
        module = self.parts.base.get_submodule(last)
        formula = observe_formula(module, x, y)
        self._final_norm = FinalNorm(last, formula, formula.scale(x))
        return self._final_norm

    @torch.no_grad()
    def children_before_attention(self, layer: int) -> tuple:
        """``(attention module, {name: output})`` for ``layer`` (the replica's): the outputs, on
        the clean rows, of the module's direct children that ran (once each, on whole rows)
        before its attention call - its q/k/v projections and the like (see
        :func:`~headint.integration.blocks.capture_children_before_attention`). Captured by one
        forward of the clean rows stopped at that call; one layer is held at a time."""
        if self._children is not None and self._children[0] == layer:
            return self._children[1:]
        self._children = None
        site = next((s for s in self.replica.structure.sites.values()
                     if s.stack == self.parts.shape.default_stack and s.layer == layer), None)
        module = None if site is None else self.model.get_submodule(site.path)
        outputs: dict = {}
        if module is not None:
            ex = torch.arange(self.N, device=self.batch["input_ids"].device)
            reached = False
            with capture_children_before_attention(module, self.N, self.T) as outputs:
                try:
                    self._variant_forward(ex, None, layer, 0, _StopAtAttention(layer), False)
                except AttentionReached:
                    reached = True
            self.cost.add_capture(self.N, self.T)
            if not reached:
                outputs = {}
        self._children = (layer, module, outputs)
        return module, outputs

    @property
    def position_reuse_ok(self) -> bool:
        """Whether position reuse ran right where it was checked (True: not refused so far)."""
        return self._position_reuse is None or self._position_reuse[0]

    @torch.no_grad()
    def check_position_reuse(self, start_pos: int) -> bool:
        """Whether variant runs may feed tokens ``>= start_pos`` with the clean run's cache before
        them (cached): the base run's first rows whose metric position is at or after
        ``start_pos`` are run so, without interventions, and the logits the metric reads must
        agree with the clean pass's to float tolerance (e.g. a model whose cache holds something
        the prefix is not fed back as fails here and runs whole rows instead)."""
        if self._position_reuse is not None or start_pos <= 0:
            return self._position_reuse is None or self._position_reuse[0]
        eligible = (last_positions(self.batch["attention_mask"]) >= start_pos).nonzero().flatten()[:2]
        if not len(eligible):
            return True  # every row ends before start_pos: each keeps its base value
        ex = eligible.to(self.batch["input_ids"].device)
        why = None
        try:
            fw = self._variant_forward(ex, None, 0, start_pos, None, False)
        except Exception as e:
            why = f"a forward fed from position {start_pos} failed ({type(e).__name__}: {e})"
        else:
            self.cost.add(len(ex), self.parts.shape.n_layers, self.T - start_pos)
            if fw.is_hidden:
                got = restricted_logits(self.metric, fw.out, fw.rows, start_pos, self.parts.unembed)
            else:
                got = model_logits(self.metric, fw.out, fw.rows, start_pos)
            want = self.base.logits[ex.to(self.base.logits.device)]
            err = float((got.float() - want.float()).abs().max())
            tol = 1e-4 * (1.0 + float(want.float().abs().max()))
            if not err <= tol:
                why = f"fed from position {start_pos} it differs from the clean run by {err:.3g} (tolerance {tol:.3g})"
        self._position_reuse = (why is None, "position reuse" if why is None else f"whole rows ({why})")
        return self._position_reuse[0]

    @torch.no_grad()
    def check_last_query(self) -> bool:
        """Whether variant runs may compute the final block for the last query only (cached).

        Needs: a last-position metric on the restricted path (final hidden states, unembedded at
        the last position), a causal model, every row's last real token at position ``T - 1``
        (left-padded or unpadded batches) and ``T >= 2``. Then the base run's first rows are run
        through the final block both ways (no intervention) and the final hidden states at the
        last position must agree with the clean pass's to float tolerance; ``last_query_note``
        says why not otherwise.
        """
        if self._last_query is not None:
            return self._last_query[0]
        why = None
        if not (self.metric.position == "last" and self.restricted and self.base.last_hidden is not None):
            why = "the metric does not read the last position's final hidden state only"
        elif not self.causal:
            why = "the model is not causal"
        elif self.T < 2:
            why = "the inputs have one token"
        elif not bool((last_positions(self.batch["attention_mask"]) == self.T - 1).all()):
            why = "some rows end before position T - 1 (right padding)"
        if why is None:
            ex = torch.arange(min(self.N, 2), device=self.batch["input_ids"].device)
            L = self.parts.shape.n_layers
            try:
                fw = self._variant_forward(ex, None, 0 if self.shares_kv else L - 1, 0, None, True)
            except Exception as e:  # e.g. a block whose arguments cannot be cut to the last query
                why = f"the final block failed on the last query only ({type(e).__name__}: {e})"
            else:
                self.cost.add(len(ex), 1, self.T)
                self.cost.add_final_second_call(len(ex), fw.second_call_tokens, fw.last_query_ran)
                got, want = fw.out[:, -1].float(), self.base.last_hidden[ex].float()
                err = float((got - want).abs().max())
                tol = 1e-4 * (1.0 + float(want.abs().max()))
                if not fw.last_query_ran:
                    why = "the final block's keys do not cover every position"
                elif not err <= tol:
                    why = f"the final block on the last query only differs from the clean run by {err:.3g} (tolerance {tol:.3g})"
        self._last_query = (why is None, "final block for the last query only" if why is None else f"full final block ({why})")
        return self._last_query[0]


@dataclass
class _Forward:
    """One variant forward: the final hidden states (``is_hidden``) or logits, the rows it ran,
    whether the final block ran for the last query only and its second call's tokens (0: one
    call), and whether the captured children of the first intervened layer answered every call."""

    out: torch.Tensor
    is_hidden: bool
    rows: dict
    last_query_ran: bool = False
    second_call_tokens: int = 0
    children_replayed: bool = False


class _StopAtAttention(Recorder):
    """A recorder that stops the forward (:class:`AttentionReached`) at ``layer``'s attention call."""

    def __init__(self, layer: int):
        super().__init__(("z",))
        self.layer = layer

    def add(self, layer: int, what: str, x: torch.Tensor, concat_dim: int | None) -> None:
        if layer == self.layer:
            raise AttentionReached(f"layer {layer}")


# ---------------------------------------------------------------------------------------------
# The base runs every scan starts from


@dataclass
class BaseRuns:
    """The clean run and the (optional) corrupted run every scan starts from, with their
    per-example metric values ``[N]``."""

    clean: VariantRunner
    corrupt: VariantRunner | None
    clean_values: torch.Tensor
    corrupt_values: torch.Tensor | None
    metric_path: str = "declared"  # see headint.scans.metric_logits.last_position_form

    def cost(self) -> dict:
        runners = [r for r in (self.clean, self.corrupt) if r is not None]
        return {k: sum(r.cost.as_dict()[k] for r in runners) for k in Cost().as_dict()}


def base_runs(replica: Replica, clean_b: dict, corrupt_b: dict | None, metric: Metric, backend: str) -> BaseRuns:
    """Run the clean inputs (and the corrupted ones) once in ``replica``, caching what variant
    runs reuse. The clean run's logits are the reference of metrics that compare with it (e.g. KL).

    A callable metric on full logits is probed on these runs
    (:func:`~headint.scans.metric_logits.last_position_form`): if it reads only the last real
    token's logits, every variant computes only those; ``BaseRuns.metric_path`` says which path runs."""
    batches = [b for b in (clean_b, corrupt_b) if b is not None]
    costs = [Cost() for _ in batches]
    passes = [clean_pass(replica, b, metric, backend, c) for b, c in zip(batches, costs)]
    refs = [passes[0].logits if metric.needs_clean else None for _ in passes]
    use, path = last_position_form(metric, [p.logits for p in passes], batches, refs)
    if use is not metric:  # the passes hold full logits ("all" position): re-laid out for the cheap form
        passes = [replace(p, logits=select_logits(p.logits, use, b)) for p, b in zip(passes, batches)]
        refs = [passes[0].logits if metric.needs_clean else None for _ in passes]
        use, columns = column_form(use, [p.logits for p in passes], batches, refs, all(p.restricted for p in passes))
        path = f"{path}, {columns}"
    runners = [VariantRunner(replica, b, p, use, backend=backend, clean_logits=passes[0].logits, cost=c)
               for b, p, c in zip(batches, passes, costs)]
    clean = runners[0]
    corrupt = runners[1] if corrupt_b is not None else None
    return BaseRuns(clean, corrupt, clean.base_values(), None if corrupt is None else corrupt.base_values(), path)
