"""Model structure the scans need, found generically in ``transformers`` models.

- the list of transformer blocks (to start a run at block ``l`` from cached hidden states),
- the base model and the unembedding (to compute only the logits a metric needs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..plan import ModelShape


@dataclass
class ModelParts:
    """``blocks``: the ``nn.ModuleList`` of transformer blocks; ``base``: the model without its
    head (returns ``last_hidden_state``); ``unembed``: the output embedding (``Linear``) or None."""

    model: nn.Module
    blocks: nn.ModuleList
    base: nn.Module
    unembed: nn.Module | None
    shape: ModelShape


def model_parts(model) -> ModelParts:
    shape = ModelShape.from_config(model.config)
    blocks = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == shape.n_layers:
            blocks = mod
            break
    if blocks is None:
        raise TypeError(f"{type(model).__name__}: found no ModuleList of its {shape.n_layers} transformer blocks")
    base = getattr(model, "base_model", model)
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is model or not isinstance(unembed, nn.Linear):
        unembed = None
    return ModelParts(model, blocks, base, unembed, shape)


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
    """Stands in for a block: returns a cached output instead of computing it."""

    def __init__(self, output: Any):
        super().__init__()
        self.output = output

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
            parts.blocks[i] = _Replay(outputs[i] if i == upto - 1 else outputs[upto - 1])
        yield
    finally:
        for i, block in enumerate(originals):
            parts.blocks[i] = block
