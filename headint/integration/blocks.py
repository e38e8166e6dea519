"""Running parts of a model: capture each block's output, replay cached outputs in place of blocks
(depth reuse in scans), and map over nested outputs."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .adapter import ModelParts


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
    """Append each block's output (detached) to ``store[layer]`` during the block."""
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


class _Replay(nn.Module):
    """Stands in for ``block``: returns a cached output instead of computing it. Every other
    attribute the model's forward reads from the block (e.g. ModernBERT's ``attention_type``) is
    the original block's."""

    def __init__(self, output: Any, block: nn.Module):
        super().__init__()
        self.output = output
        object.__setattr__(self, "_block", block)  # not a submodule: its parameters are not this module's

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        return self.output


@contextlib.contextmanager
def replay_blocks(parts: ModelParts, upto: int, outputs: list) -> Iterator[None]:
    """Within the block, blocks ``0 .. upto-1`` return ``outputs[i]`` without computing.

    Only the output of block ``upto - 1`` reaches block ``upto``; the earlier ones are
    replayed too so that no work is done for them. The original blocks are put back on exit.
    """
    originals = [parts.blocks[i] for i in range(upto)]
    try:
        for i in range(upto):
            parts.blocks[i] = _Replay(outputs[i] if i == upto - 1 else outputs[upto - 1], originals[i])
        yield
    finally:
        for i, block in enumerate(originals):
            parts.blocks[i] = block
