"""The engine behind every scan: a clean pass cached once, then batched variant runs.

A :class:`VariantRunner` holds one set of examples (a "base run") and can evaluate a
metric for many intervened variants at once: each batch row is one (variant, example)
pair carrying its own per-row plan. Three reuses make it cheaper than one forward per
intervention, all exact:

- depth reuse: a run whose interventions start at layer ``l`` replays the cached
  clean outputs of blocks ``< l`` instead of recomputing them;
- position reuse: on causal models, a run whose interventions start at position ``p``
  feeds only tokens ``>= p``, with the clean keys/values of positions ``< p`` as a KV cache;
- logit restriction: only the final position's hidden state is unembedded, and only for
  the token ids the metric asks for;
- last-query final block (``last_query=True``, last-position metrics on causal models whose
  rows all end at position ``T - 1``): the final block computes keys/values at every position
  but everything else at the last one only (see
  :class:`~headint.integration.blocks.LastQueryBlock`); checked once per base run against
  its clean output before any variant uses it;
- clean attention at the first intervened layer (``clean_attention=True``, plans that only
  replace head outputs): that layer's inputs are the clean run's, so its attention output is
  the cached clean one, blended with the replacement, and attention is not recomputed there;
  for whole rows (no position reuse) its attention module's work before the attention call
  (q/k/v projections, q/k norms: the direct children that ran once, on whole rows) is replayed
  from one capture of the clean rows per layer (:meth:`VariantRunner.children_before_attention`),
  so only the output projection and what follows run there.

``cost`` counts what actually ran, in layer-forwards (one block over one row) and
token-layer-forwards (one block over one token of one row).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..integration.hf import intervene
from ..integration.adapter import ModelParts, model_parts
from ..integration.structure import model_shape, model_structure
from ..integration.blocks import (AttentionReached, capture_block_outputs, capture_children_before_attention, last_query_block,
                                  map_tensors, replay_blocks, replay_children)
from ..metrics import Metric, last_position_form, last_positions, select_logits
from ..plan import Plan
from ..interventions.call import CallPlan
from ..integration.record import Recorder


@dataclass
class Cost:
    """Work done, counted per transformer block applied to one row (and to one token)."""

    runs: int = 0
    rows: int = 0
    layer_forwards: int = 0
    token_layer_forwards: int = 0
    last_query_rows: int = 0  # rows whose final block ran for the last query only (two calls: see LastQueryBlock)
    clean_attention_rows: int = 0  # rows whose first intervened layer took the clean run's attention
    replayed_projection_rows: int = 0  # ... and its attention module's work before attention (q/k/v projections)
    captures: int = 0  # forwards stopped at an attention call to capture that work (see children_before_attention)

    def add(self, rows: int, layers: int, tokens: int) -> None:
        self.runs += 1
        self.rows += rows
        self.layer_forwards += rows * layers
        self.token_layer_forwards += rows * layers * tokens

    def add_final_second_call(self, rows: int, tokens: int, last_query: bool) -> None:
        """The final block's second call (see ``LastQueryBlock``), over ``tokens`` tokens of
        ``rows`` rows: the last one (``last_query``), or all of them where a sliding window
        dropped keys. Its first call, over every fed token and stopped after the keys/values,
        is counted by :meth:`add`."""
        self.last_query_rows += rows if last_query else 0
        self.layer_forwards += rows
        self.token_layer_forwards += rows * tokens

    def add_capture(self, rows: int, tokens: int) -> None:
        """A forward stopped at one layer's attention call (see ``children_before_attention``),
        counted as one layer-forward of ``rows`` rows; not a run."""
        self.captures += 1
        self.layer_forwards += rows
        self.token_layer_forwards += rows * tokens

    def as_dict(self) -> dict:
        return dict(runs=self.runs, rows=self.rows, layer_forwards=self.layer_forwards, token_layer_forwards=self.token_layer_forwards,
                    last_query_rows=self.last_query_rows, clean_attention_rows=self.clean_attention_rows,
                    replayed_projection_rows=self.replayed_projection_rows, captures=self.captures)


def as_batch(inputs: Any) -> dict[str, torch.Tensor]:
    """Normalise scan inputs to a dict of ``[N, ...]`` tensors with ``input_ids`` ``[N, T]`` and
    ``attention_mask`` ``[N, T]`` (all ones when missing); other tensors (``target``, ``contrast``,
    ``labels``, ``position_ids``, ...) are kept."""
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        raise TypeError("inputs must be a [N, T] tensor of token ids or a dict with 'input_ids' (and e.g. 'attention_mask', 'target', 'contrast')")
    batch = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids has shape {list(ids.shape)}; expected [N, T]")
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.ones_like(ids)
    for k, v in batch.items():
        if v.shape[0] != ids.shape[0]:
            raise ValueError(f"inputs[{k!r}] has {v.shape[0]} rows (shape {list(v.shape)}), input_ids has {ids.shape[0]}")
    return batch


MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
SLICED_KEYS = ("input_ids", "token_type_ids", "position_ids")  # per fed token; the mask spans the cache too


@contextlib.contextmanager
def eval_mode(model):
    """Run the block with ``model.eval()``; the model's train/eval flag is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class CleanPass:
    """What a base run caches: block outputs, head outputs z ``[N, T, H, D]`` per layer,
    keys/values ``[N, Hkv, T, D]`` per layer, and the metric's logits."""

    block_outputs: list
    z: dict[int, torch.Tensor]
    k: dict[int, torch.Tensor]
    v: dict[int, torch.Tensor]
    logits: torch.Tensor  # the layout the metric takes
    full_last_logits: torch.Tensor | None  # [N, V] when a metric needs the clean distribution


class VariantRunner:
    """Evaluates ``metric`` on intervened variants of one base run.

    Args:
        model: a ``transformers`` model.
        batch: the base run's inputs (see :func:`as_batch`), N examples.
        metric: a :class:`~headint.metrics.Metric`.
        clean_logits: the clean run's logits in the metric's layout (for metrics that need them).
    """

    def __init__(self, model, batch: dict, metric: Metric, *, backend: str = "auto", clean_logits=None, causal: bool | None = None):
        self.model = model
        self.batch = batch
        self.metric = metric
        self.backend = backend
        self.parts: ModelParts = model_parts(model, model_shape(model))
        self.cost = Cost()
        self.clean_logits = clean_logits
        self.N, self.T = batch["input_ids"].shape
        if causal is None:  # decoder blocks have causal attention modules
            causal = any(getattr(m, "is_causal", False) for m in self.parts.blocks[0].modules())
        self.causal = bool(causal)
        self.restricted = False
        self.all_attention = self.parts.shape.attention_layers == list(range(self.parts.shape.n_layers))
        self._children = None  # (layer, attention module, captured outputs): see children_before_attention
        self.last_query_ok: bool | None = None  # None: not checked yet (see check_last_query)
        self.last_query_note = "not checked"
        self.base: CleanPass | None = None
        self._base_values: torch.Tensor | None = None

    # -- inputs ---------------------------------------------------------------------------------------------
    def rows(self, ex: torch.Tensor) -> dict:
        return {k: v[ex] for k, v in self.batch.items()}

    def model_inputs(self, rows: dict, start: int = 0) -> dict:
        """The model's keyword inputs for ``rows``; with ``start`` (position reuse) only the tokens
        ``>= start`` are fed, with their own position ids, and the mask still covers all ``T``."""
        out = {k: rows[k] for k in MODEL_KEYS if k in rows}
        if start:
            for k in SLICED_KEYS:
                if k in out:
                    out[k] = out[k][:, start:]
        return out

    # -- logits ---------------------------------------------------------------------------------------------
    def _metric_logits(self, out: torch.Tensor, rows: dict, start: int, is_hidden: bool) -> torch.Tensor:
        """The metric's logits from final hidden states (restricted path) or full logits ``[R, T', *]``."""
        last = (last_positions(rows["attention_mask"]) - start).clamp_min(0)
        if is_hidden and self.metric.position == "last":
            h = out[torch.arange(out.shape[0]), last]  # [R, d]: only the metric's position is unembedded
            ids = self.metric.token_ids(rows)
            W = self.parts.unembed.weight
            b = getattr(self.parts.unembed, "bias", None)
            if ids is None:
                return torch.nn.functional.linear(h, W, b)
            logits = torch.einsum("rd,rkd->rk", h, W[ids])  # only the K ids the metric reads
            return logits + b[ids] if b is not None else logits
        logits = self.parts.unembed(out) if is_hidden else out
        if self.metric.position == "all":
            return logits
        return self._select_last(logits, rows, last)

    def _select_last(self, logits: torch.Tensor, rows: dict, last: torch.Tensor) -> torch.Tensor:
        last = last.clamp_min(0)
        x = logits[torch.arange(logits.shape[0]), last]
        ids = self.metric.token_ids(rows)
        return x if ids is None else x.gather(1, ids)

    # -- runs -----------------------------------------------------------------------------------------------
    def _forward(self, inputs: dict, past=None):
        """Final hidden states (restricted path) or logits; returns (tensor, is_hidden)."""
        kwargs = dict(inputs)
        if past is not None:
            kwargs[self._cache_kwarg()] = past
            kwargs["use_cache"] = True
        elif self.causal:
            kwargs["use_cache"] = False
        if self.restricted:
            out = self.parts.base(**kwargs)
            return out.last_hidden_state, True
        out = self.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return logits, False

    def _cache_kwarg(self) -> str:
        """Newer ``transformers`` models take the KV cache as ``cache``, older as ``past_key_values``."""
        target = self.parts.base if self.restricted else self.model
        params = inspect.signature(target.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @torch.no_grad()
    def clean_pass(self) -> CleanPass:
        """Run the base inputs once, caching what variant runs reuse."""
        L = self.parts.shape.n_layers
        store: list = [None] * L
        rec = Recorder(("z", "k", "v"))
        inputs = self.model_inputs(self.batch)
        base_out: list = []
        capture = self.parts.base.register_forward_hook(lambda _m, _a, out: base_out.append(out))
        try:
            with intervene(self.model, (), backend=self.backend, recorder=rec), capture_block_outputs(self.parts, store):
                kwargs = dict(inputs)
                if self.causal:
                    kwargs["use_cache"] = False
                out = self.model(**kwargs)
        finally:
            capture.remove()
        self.cost.add(self.N, L, self.T)
        full = out.logits if hasattr(out, "logits") else out.last_hidden_state
        # Use the restricted path (final hidden state -> only the logits the metric needs) only if
        # unembedding the base model's output reproduces the model's own logits.
        self._clean_last_hidden = None
        if self.parts.unembed is not None and hasattr(out, "logits") and base_out:
            hidden = getattr(base_out[-1], "last_hidden_state", None)
            if isinstance(hidden, torch.Tensor) and hidden.shape[-1] == self.parts.unembed.in_features:  # e.g. ELECTRA: a head sits between
                # (not when its weight is offloaded to the meta device: only the module's own forward loads it)
                self.restricted = self.parts.unembed.weight.device.type != "meta" and torch.allclose(
                    self.parts.unembed(hidden[:1]), full[:1], rtol=1e-4, atol=1e-4)
                self._clean_last_hidden = hidden[:, -1].detach()
        logits = select_logits(full, self.metric, self.batch) if self.metric.position == "last" else full
        full_last = None
        if self.metric.needs_clean or self.metric.token_ids(self.batch) is None:
            full_last = full[torch.arange(self.N), last_positions(self.batch["attention_mask"])]
        att = self.parts.shape.attention_layers  # layers without attention (hybrid models) record nothing
        self.base = CleanPass(store, {l: rec.tensors[("z", l)] for l in att},
                              {l: rec.tensors[("k", l)] for l in att}, {l: rec.tensors[("v", l)] for l in att},
                              logits, full_last)
        return self.base

    def use_metric(self, metric: Metric) -> None:
        """Switch to ``metric`` (same values, another logit layout) before any variant runs;
        the base run's logits are re-laid out from the full ones it holds."""
        assert self.base is not None and self._base_values is None, "switch metrics after clean_pass(), before base_values()"
        if self.metric.position != "all":
            raise ValueError(f"use_metric: the base run holds {self.metric.position!r}-position logits, not the full ones")
        self.metric = metric
        if metric.position == "last":
            self.base.logits = select_logits(self.base.logits, metric, self.batch)

    def base_values(self) -> torch.Tensor:
        """Metric values ``[N]`` of the unintervened base run (computed once)."""
        assert self.base is not None
        if self._base_values is None:
            self._base_values = self.metric(self.base.logits, self.batch, clean_logits=self.clean_logits).float()
        return self._base_values

    @torch.no_grad()
    def run(self, ex: torch.Tensor, plan: Plan, start_layer: int = 0, start_pos: int = 0, *,
            clean_attention: bool = False, last_query: bool = False) -> torch.Tensor:
        """Like :meth:`run_differentiable`, without building a graph.

        ``clean_attention``: the plan only replaces head outputs (head mask/patch), so layer
        ``start_layer``'s attention output is the clean run's (its inputs are), blended with the
        replacement: attention is not recomputed there.
        ``last_query``: run the final block for the last query only where :meth:`check_last_query`
        allows it (last-position metrics; no effect otherwise). Both give the same values.
        """
        return self._run(ex, plan, start_layer, start_pos, None, clean_attention, last_query)

    def run_differentiable(self, ex: torch.Tensor, plan: Plan, start_layer: int = 0, start_pos: int = 0, recorder=None) -> torch.Tensor:
        """Metric values ``[R]`` for rows ``ex`` (example indices) under the per-row ``plan``.

        ``start_layer``: the plan intervenes at no layer below it (blocks below are replayed).
        ``start_pos``: the plan changes no position below it (causal models only; earlier
        positions come from the clean keys/values).
        """
        return self._run(ex, plan, start_layer, start_pos, recorder, False, False)

    def _run(self, ex, plan, start_layer, start_pos, recorder, clean_attention, last_query) -> torch.Tensor:
        assert self.base is not None, "call clean_pass() first"
        if start_pos and not (self.causal and self.metric.position == "last" and self.all_attention):
            start_pos = 0  # position reuse needs every layer's state as keys/values
        children = None
        if clean_attention:
            z = self.base.z[start_layer]
            plan = CleanAttentionPlan(plan, start_layer, z[ex.to(z.device)].transpose(1, 2))
            if start_pos == 0:  # the captured outputs are of whole rows
                children = self.children_before_attention(start_layer)
        last_query = last_query and recorder is None and self.T - start_pos >= 2 and self.check_last_query()
        fw = self._variant_forward(ex, plan, start_layer, start_pos, recorder, last_query, children)
        rows = fw.rows
        L = self.parts.shape.n_layers
        self.cost.add(len(ex), L - start_layer, self.T - start_pos)
        if fw.second_call_tokens:
            self.cost.add_final_second_call(len(ex), fw.second_call_tokens, fw.last_query_ran)
        if clean_attention:
            self.cost.clean_attention_rows += len(ex)
        if fw.children_replayed:
            self.cost.replayed_projection_rows += len(ex)
        logits = self._metric_logits(fw.out, rows, start_pos, fw.is_hidden)
        clean = None
        if self.metric.needs_clean:
            clean = self.clean_logits[ex] if self.clean_logits is not None else None
        values = self.metric(logits, rows, clean_logits=clean).float()
        if start_pos:
            # rows whose metric position lies before start_pos are unaffected: their base value
            before = last_positions(rows["attention_mask"]) < start_pos
            if before.any():
                values = torch.where(before, self.base_values()[ex], values)
        return values

    def _variant_forward(self, ex, plan, start_layer: int, start_pos: int, recorder, last_query: bool,
                         children: tuple | None = None) -> "_Forward":
        """One forward of rows ``ex`` under ``plan``. ``children``: ``(attention module, {name:
        captured output})`` of layer ``start_layer`` (see :meth:`children_before_attention`),
        replayed for these rows."""
        rows = self.rows(ex)
        inputs = self.model_inputs(rows, start_pos)
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
                past.update(self.base.k[l][ex.to(self.base.k[l].device)][:, :, :start_pos], self.base.v[l][ex.to(self.base.v[l].device)][:, :, :start_pos], l)
        final = last_query_block(self.parts, self.T) if last_query else contextlib.nullcontext()
        replay = replay_children(*children, ex, self.N, self.T) if children is not None and children[1] else contextlib.nullcontext()
        with intervene(self.model, plan, backend=self.backend, recorder=recorder), replay_blocks(self.parts, start_layer, replayed), \
                final as stand_in, replay as replay_stand_ins:
            out, is_hidden = self._forward(inputs, past)
        if last_query and not stand_in.second_call_tokens:
            raise RuntimeError("the final block did not run in two steps although check_last_query() allowed it")
        return _Forward(out, is_hidden, rows,
                        last_query_ran=bool(last_query and stand_in.ran_shortcut),
                        second_call_tokens=stand_in.second_call_tokens if last_query else 0,
                        children_replayed=bool(replay_stand_ins) and all(r.replayed for r in replay_stand_ins))

    @torch.no_grad()
    def children_before_attention(self, layer: int) -> tuple:
        """``(attention module, {name: output})`` for ``layer``: the outputs, on the clean rows, of
        the module's direct children that ran (once each, on whole rows) before its attention
        call - its q/k/v projections and the like (see
        :func:`~headint.integration.blocks.capture_children_before_attention`). Captured by one
        forward of the clean rows stopped at that call; one layer is held at a time."""
        if self._children is not None and self._children[0] == layer:
            return self._children[1:]
        self._children = None
        site = next((s for s in model_structure(self.model).sites.values()
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
        if self.last_query_ok is not None:
            return self.last_query_ok
        assert self.base is not None, "call clean_pass() first"
        why = None
        if not (self.metric.position == "last" and self.restricted and self._clean_last_hidden is not None):
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
                fw = self._variant_forward(ex, None, L - 1, 0, None, True)
                out, shortcut, second = fw.out, fw.last_query_ran, fw.second_call_tokens
            except Exception as e:  # e.g. a block whose arguments cannot be cut to the last query
                why = f"the final block failed on the last query only ({type(e).__name__}: {e})"
            else:
                self.cost.add(len(ex), 1, self.T)
                self.cost.add_final_second_call(len(ex), second, shortcut)
                got, want = out[:, -1].float(), self._clean_last_hidden[ex].float()
                err = float((got - want).abs().max())
                tol = 1e-4 * (1.0 + float(want.abs().max()))
                if not shortcut:
                    why = "the final block's keys do not cover every position"
                elif not err <= tol:
                    why = f"the final block on the last query only differs from the clean run by {err:.3g} (tolerance {tol:.3g})"
        self.last_query_ok = why is None
        self.last_query_note = "final block for the last query only" if why is None else f"full final block ({why})"
        return self.last_query_ok


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


class CleanAttentionPlan(Plan):
    """``plan`` with the attention output of ``layer`` known: ``m * clean + (1 - m) * patch``
    from the plan's own head mask ``m`` and replacement ``patch`` and the clean run's head
    outputs ``clean`` ``[R, H, T, D]`` (absolute positions), valid when that layer's inputs are
    the clean run's. The plan at ``layer`` may only replace head outputs (a head bias is kept:
    the attention function adds it to the known output as to a computed one)."""

    def __init__(self, plan: Plan, layer: int, clean: torch.Tensor):
        self.plan, self.layer, self.clean = plan, layer, clean

    def layers(self) -> set[int]:
        return self.plan.layers()

    def for_stack_call(self, stack, layer, B, Tq, Tk, device, dtype, q_start=None):
        return self.plan.for_stack_call(stack, layer, B, Tq, Tk, device, dtype, q_start=q_start)

    def for_call(self, layer, B, Tq, Tk, device, dtype, q_start=None):
        call = self.plan.for_call(layer, B, Tq, Tk, device, dtype, q_start=q_start)
        if layer != self.layer or call is None:
            return call
        if call.head_mask is None or call.score_scale is not None or call.knockouts or call.qkv_edits or call.pattern_edits:
            raise ValueError(f"clean_attention: the plan at layer {layer} must only replace head outputs (head_mask/head_patch)")
        q0 = Tk - Tq if q_start is None else q_start
        attn = self.clean[:, :, q0 : q0 + Tq].to(device=device, dtype=torch.float32)
        if attn.shape[0] != B or attn.shape[2] != Tq:
            raise ValueError(f"clean_attention: clean head outputs {list(self.clean.shape)} do not cover rows {B}, positions {q0}..{q0 + Tq - 1}")
        m = call.head_mask.to(device=device, dtype=torch.float32)[..., None]  # [Bp, H, Tq or 1, 1]
        out = m * attn
        if call.head_patch is not None:
            out = out + (1 - m) * call.head_patch.to(device=device, dtype=torch.float32)
        return CallPlan(output=out.to(dtype).expand(B, -1, Tq, -1), head_bias=call.head_bias)


def paired_batches(clean: Any, corrupt: Any, name: str = "inputs") -> tuple[dict, dict | None]:
    """Clean and (optional) corrupted inputs as batches of the same ``[N, T]``."""
    clean_b = as_batch(clean)
    corrupt_b = as_batch(corrupt) if corrupt is not None else None
    shape = tuple(clean_b["input_ids"].shape)
    if corrupt_b is not None and tuple(corrupt_b["input_ids"].shape) != shape:
        raise ValueError(f"corrupt input_ids has shape {list(corrupt_b['input_ids'].shape)}; expected {list(shape)} like {name}")
    return clean_b, corrupt_b


@dataclass
class BaseRuns:
    """The clean run and the (optional) corrupted run every scan starts from, with their
    per-example metric values ``[N]``."""

    clean: VariantRunner
    corrupt: VariantRunner | None
    clean_values: torch.Tensor
    corrupt_values: torch.Tensor | None
    metric_path: str = "declared"  # see headint.metrics.last_position_form

    def cost(self) -> dict:
        runners = [r for r in (self.clean, self.corrupt) if r is not None]
        return {k: sum(r.cost.as_dict()[k] for r in runners) for k in Cost().as_dict()}


def base_runs(model, clean_b: dict, corrupt_b: dict | None, metric: Metric, backend: str) -> BaseRuns:
    """Run the clean inputs (and the corrupted ones) once, caching what variant runs reuse.
    The clean run's logits are the reference of metrics that compare with it (e.g. KL).

    A callable metric on full logits is probed on these runs (:func:`~headint.metrics.last_position_form`):
    if it reads only the last real token's logits, every variant computes only those;
    ``BaseRuns.metric_path`` says which path runs."""
    clean = VariantRunner(model, clean_b, metric, backend=backend)
    clean.clean_pass()
    corrupt = None
    if corrupt_b is not None:
        corrupt = VariantRunner(model, corrupt_b, metric, backend=backend)
        corrupt.clean_pass()
    runners = [r for r in (clean, corrupt) if r is not None]
    refs = [clean.base.logits if metric.needs_clean else None for _ in runners]
    use, path = last_position_form(metric, [r.base.logits for r in runners], [r.batch for r in runners], refs)
    if use is not metric:
        for r in runners:
            r.use_metric(use)
    clean.clean_logits = clean.base.logits
    clean_values = clean.base_values()
    corrupt_values = None
    if corrupt is not None:
        corrupt.clean_logits = clean.base.logits
        corrupt_values = corrupt.base_values()
    return BaseRuns(clean, corrupt, clean_values, corrupt_values, path)
