"""Running parts of a model: capture each block's output, replay cached outputs in place of blocks
(depth reuse in scans), run the final block for the last query only (:class:`LastQueryBlock`),
replay an attention module's work before its attention call, and map over nested outputs.

Everything here that installs a stand-in or a hook does so only in a private
:class:`~headint.integration.replica.Replica` of a model (checked: a user's model is refused),
so no other caller of the model ever sees it.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .adapter import ModelParts
from .replica import require_replica


def map_tensors(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside ``x`` (tensors, tuples, lists, dicts)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(map_tensors(v, fn) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    return x


@contextlib.contextmanager
def capture_block_outputs(parts: ModelParts, store: list) -> Iterator[None]:
    """Put each block's output (detached) in ``store[layer]`` during the block (``parts`` of a replica)."""
    require_replica(parts.blocks, "capture_block_outputs")
    handles = []
    for i, block in enumerate(parts.blocks):
        def hook(_m, _a, out, i=i):
            store[i] = map_tensors(out, lambda t: t.detach())
        handles.append(block.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _StandIn(nn.Module):
    """Base of the modules that stand in for a model's module (``original``) during a run: every
    attribute the model's code reads from it (e.g. ModernBERT's ``attention_type``, a
    projection's ``weight``) that the stand-in lacks is the original's."""

    def __init__(self, original: nn.Module):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: its parameters are not this module's

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


class _Replay(_StandIn):
    """Stands in for ``block``: returns a cached output instead of computing it."""

    def __init__(self, output: Any, block: nn.Module):
        super().__init__(block)
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


@contextlib.contextmanager
def replay_blocks(parts: ModelParts, upto: int, outputs: list) -> Iterator[None]:
    """Within the block, blocks ``0 .. upto-1`` return ``outputs[i]`` without computing.

    Only the output of block ``upto - 1`` reaches block ``upto``; the earlier ones are
    replayed too so that no work is done for them. The original blocks are put back on exit.
    """
    require_replica(parts.blocks, "replay_blocks")
    originals = [parts.blocks[i] for i in range(upto)]
    try:
        for i in range(upto):
            parts.blocks[i] = _Replay(outputs[i] if i == upto - 1 else outputs[upto - 1], originals[i])
        yield
    finally:
        for i, block in enumerate(originals):
            parts.blocks[i] = block


# ---------------------------------------------------------------------------------------------
# The final block for the last query only (the scans' last-block shortcut).
#
# A last-position metric needs the final block's output at the last position only. That output
# needs the block's keys and values at every position, but its queries, output projection, MLP
# and residual adds only at the last one. Every ``transformers`` attention module hands its new
# keys/values to the KV cache (``cache.update(k, v, layer_idx)``) before attending, so without
# per-model code the block is run twice: over all positions with a cache that records the keys
# and values and stops the block there, then over the last position with a cache that puts the
# recorded keys/values of the earlier positions before its own.


class _KeysValuesRecorded(Exception):
    """Raised by :class:`_RecordingCache` to stop a block once its keys/values are known."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__("keys/values recorded")
        self.keys, self.values = keys, values


class _RecordingCache:
    """Stands in for a block's KV cache: the block's first ``update`` records the keys/values
    ``[B, Hkv, Tk, D]`` its attention would read (what the block's own ``cache`` returns, e.g.
    cached positions first or a sliding window's, or the new ones when it has none) and stops
    the block."""

    def __init__(self, cache: Any):
        self.cache = cache

    def update(self, key_states, value_states, *args, **kwargs):
        if self.cache is not None:
            key_states, value_states = self.cache.update(key_states, value_states, *args, **kwargs)
        raise _KeysValuesRecorded(key_states, value_states)


class _PrefixCache:
    """Stands in for a block's KV cache: ``update`` returns the given earlier keys/values
    ``[B, Hkv, P, D]`` followed by the new ones."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


CACHE_PARAMS = ("cache", "past_key_values", "layer_past", "past_key_value")


def block_cache_param(block: nn.Module) -> str | None:
    """The name of ``block.forward``'s KV-cache parameter, or None if it takes none."""
    try:
        params = inspect.signature(block.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((p for p in CACHE_PARAMS if p in params), None)


def to_last_query(x: Any, T: int) -> Any:
    """A block's per-query arguments cut to the last of ``T`` queries: 4-D masks
    ``[B, 1, T, Tk]`` keep their last query row, ``[B, T, ...]`` tensors (position ids,
    rotary cos/sin) their last position, ``[T]`` tensors (cache positions) their last entry;
    anything else is passed as is."""

    def cut(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4 and t.shape[-2] == T:
            return t[..., -1:, :]
        if t.dim() in (2, 3) and t.shape[1] == T:
            return t[:, -1:]
        if t.dim() == 1 and t.shape[0] == T:
            return t[-1:]
        return t

    return map_tensors(x, cut)


class LastQueryBlock(nn.Module):
    """Stands in for a causal block; returns its output ``[B, T, d]`` correct at the last
    position only (the last position's output, expanded without a copy over all ``T``).

    The first call runs the block over all ``T`` fed tokens up to its cache update (through the
    block's own cache, if it was given one, so cached earlier positions and sliding windows are
    as in a full call) and records the keys/values its attention would read; the second runs it
    over the last token with those keys/values before its own.

    ``n_positions``: the absolute length of the sequence (cached and fed positions). The
    attention function places a call's queries at the end of its keys, so the second call is
    made for the last token only when the recorded keys cover all ``n_positions`` (no sliding
    window dropped any); otherwise it runs over all ``T`` tokens with the recorded earlier keys,
    i.e. exactly the full block. ``ran_shortcut`` tells whether the last call took the
    one-token path and ``second_call_tokens`` how many tokens its second call ran; a block that
    never calls its cache (e.g. an encoder block) simply runs in full (``second_call_tokens`` 0).
    """

    def __init__(self, block: nn.Module, n_positions: int):
        super().__init__()
        self.block = block
        self.n_positions = n_positions
        self.cache_param = block_cache_param(block)
        self.ran_shortcut = False
        self.second_call_tokens = 0

    def forward(self, *args, **kwargs):
        self.ran_shortcut = False
        self.second_call_tokens = 0
        if self.cache_param is None:
            return self.block(*args, **kwargs)
        bound = inspect.signature(self.block.forward).bind(*args, **kwargs)
        names = list(bound.arguments)
        hidden = bound.arguments[names[0]]
        extra = bound.arguments.get("kwargs") if isinstance(bound.arguments.get("kwargs"), dict) else {}
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] < 2 or any(p in extra for p in CACHE_PARAMS):
            return self.block(*args, **kwargs)
        B, T, d = hidden.shape
        bound.arguments[self.cache_param] = _RecordingCache(bound.arguments.get(self.cache_param))
        try:
            out = self.block(*bound.args, **bound.kwargs)
        except _KeysValuesRecorded as rec:
            keys, values = rec.keys, rec.values
        else:
            return out  # the block never used its cache: it ran in full
        if keys.shape[-2] != self.n_positions:  # e.g. a sliding window: run every query, as the full block
            bound.arguments[self.cache_param] = _PrefixCache(keys[:, :, : keys.shape[-2] - T], values[:, :, : values.shape[-2] - T])
            self.second_call_tokens = T
            return self.block(*bound.args, **bound.kwargs)
        for name in names[1:]:
            if name != self.cache_param:
                bound.arguments[name] = to_last_query(bound.arguments[name], T)
        bound.arguments[names[0]] = hidden[:, -1:]
        bound.arguments[self.cache_param] = _PrefixCache(keys[:, :, :-1], values[:, :, :-1])
        out = self.block(*bound.args, **bound.kwargs)
        self.ran_shortcut = True
        self.second_call_tokens = 1
        return map_tensors(out, lambda t: t.expand(B, T, *t.shape[2:]) if t.dim() == 3 and t.shape[:2] == (B, 1) else t)


@contextlib.contextmanager
def last_query_block(parts: ModelParts, n_positions: int) -> Iterator[LastQueryBlock]:
    """Within the block, the final transformer block is a :class:`LastQueryBlock` (for sequences
    of ``n_positions`` absolute positions); the original is put back on exit."""
    require_replica(parts.blocks, "last_query_block")
    L = len(parts.blocks)
    original = parts.blocks[L - 1]
    stand_in = LastQueryBlock(original, n_positions)
    try:
        parts.blocks[L - 1] = stand_in
        yield stand_in
    finally:
        parts.blocks[L - 1] = original


# ---------------------------------------------------------------------------------------------
# An attention module's work before its attention call, replayed (the scans' intervened layer).
#
# A scan variant whose first intervened layer is ``l`` feeds that layer the clean run's inputs,
# so whatever layer ``l``'s attention module computes before its attention call (its q/k/v
# projections, q/k norms, ...) is what the clean run computed. The module's direct children that
# ran, once each, before the call are captured on the clean rows and then stand in for
# themselves in the variant runs. Everything after the call (the output projection onwards) is
# computed.


class AttentionReached(Exception):
    """Raised (by the caller's recorder) when the captured module reaches its attention call."""


@contextlib.contextmanager
def capture_children_before_attention(module: nn.Module, n_rows: int, T: int) -> Iterator[dict]:
    """Within the block, record the outputs of ``module``'s direct children as they finish:
    ``{name: output}`` for children called exactly once on a batch of ``n_rows`` rows of ``T``
    tokens whose every output tensor is ``[n_rows, T, ...]`` (others are left out: one cached
    output could not stand in for two calls, and only row-major outputs can be cut to a variant
    run's rows). The caller stops the forward at the attention call (:class:`AttentionReached`),
    so what is recorded finished before it."""
    require_replica(module, "capture_children_before_attention")
    outputs: dict[str, Any] = {}
    calls: dict[str, int] = {}
    handles = []
    for name, child in module.named_children():
        def hook(_m, _a, out, name=name):
            calls[name] = calls.get(name, 0) + 1
            outputs[name] = map_tensors(out, lambda t: t.detach())
        handles.append(child.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()
        for name, n in calls.items():
            tensors: list = []
            map_tensors(outputs.get(name), lambda t: tensors.append(t) or t)
            if n != 1 or not tensors or any(t.dim() < 2 or tuple(t.shape[:2]) != (n_rows, T) for t in tensors):
                outputs.pop(name, None)


class _ReplayedChild(_StandIn):
    """Stands in for a child module: for a call on rows ``ex`` of the captured batch (its first
    tensor argument ``[len(ex), T, ...]``, the captured ``T``) it returns the captured output's
    rows ``ex``; any other call runs the child."""

    def __init__(self, child: nn.Module, output: Any, ex: torch.Tensor, n_rows: int, T: int):
        super().__init__(child)
        self.output, self.ex, self.n_rows, self.T = output, ex, n_rows, T
        self.replayed = 0

    def forward(self, *args, **kwargs):
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and tuple(x.shape[:2]) == (len(self.ex), self.T):
            self.replayed += 1
            return map_tensors(self.output, lambda t: t[self.ex.to(t.device)])
        return object.__getattribute__(self, "_original")(*args, **kwargs)


@contextlib.contextmanager
def replay_children(module: nn.Module, outputs: dict, ex: torch.Tensor, n_rows: int, T: int) -> Iterator[list]:
    """Within the block, ``module``'s children named in ``outputs`` (captured on ``n_rows`` rows
    of ``T`` tokens by :func:`capture_children_before_attention`) return those outputs' rows
    ``ex`` when called on ``len(ex)`` rows of ``T`` tokens; the originals are put back on exit.
    Yields the stand-ins (``replayed`` counts the calls they answered)."""
    require_replica(module, "replay_children")
    originals = {name: getattr(module, name) for name in outputs}
    stand_ins = []
    try:
        for name, out in outputs.items():
            stand_in = _ReplayedChild(originals[name], out, ex, n_rows, T)
            setattr(module, name, stand_in)
            stand_ins.append(stand_in)
        yield stand_ins
    finally:
        for name, child in originals.items():
            setattr(module, name, child)


# ---------------------------------------------------------------------------------------------
# Modules frozen at a base run's outputs (direct-path scans freeze later MLPs).


class _FrozenOutput(_StandIn):
    """Stands in for ``module``: returns the base run's output of each row's example
    (``output`` ``[R, T, d]``), for the last ``T_in`` positions of its input (rows fed from a
    later position, or the last query only, end at the same last position)."""

    def __init__(self, module: nn.Module, output: torch.Tensor, what: str):
        super().__init__(module)
        self.output = output
        self.what = what

    def forward(self, x, *args, **kwargs):
        out = self.output
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != out.shape[0] or x.shape[1] > out.shape[1]:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise RuntimeError(f"{self.what}: input of shape {shape}; the frozen output is [{out.shape[0]}, <= {out.shape[1]}, d]")
        return out[:, out.shape[1] - x.shape[1]:].to(device=x.device, dtype=x.dtype)


@contextlib.contextmanager
def frozen_outputs(root: nn.Module, outputs: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, each module of ``root`` (a replica's) at path ``p`` returns
    ``outputs[p]`` ``[R, T, d]`` (see :class:`_FrozenOutput`) instead of computing. Put back on exit."""
    require_replica(root, "frozen_outputs")
    put = []
    try:
        for path, out in outputs.items():
            parent_path, _, attr = path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            original = getattr(parent, attr)
            setattr(parent, attr, _FrozenOutput(original, out, path))
            put.append((parent, attr, original))
        yield
    finally:
        for parent, attr, original in reversed(put):
            setattr(parent, attr, original)
