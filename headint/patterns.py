"""Ground-truth attention-pattern scores, independent of any intervention.

These are the standard diagnostics of Elhage et al. (2021) and Olsson et al. (2022):

* **previous-token score** of a head: mean attention weight from position ``i`` to
  position ``i - 1``;
* **induction score** of a head: on sequences ``[r | r]`` made of a random half ``r``
  of length ``h`` repeated once, mean attention weight from each position ``i`` of
  the second half to position ``i - h + 1``, the token right after the earlier
  occurrence of the current token.

Scores are read directly off the attention probabilities of the model run with the
plain ``"eager"`` attention implementation, so they do not depend on (and are not
affected by) any custom attention backend or intervention installed on the model.
The model's attention implementation and train/eval mode are restored exactly
afterwards, even if the forward pass raises.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .integration.adapter import input_device, model_configs
from .integration.modes import eval_mode

__all__ = ["attention_patterns", "previous_token_scores", "induction_scores", "eager_attention"]


@contextmanager
def eager_attention(model):
    """Temporarily run ``model`` with eager attention in eval mode; restore everything after.

    The previous value of ``_attn_implementation`` of every reachable config is recorded
    and written back verbatim on exit (also on exception), as is ``model.training``.
    """
    configs = model_configs(model)
    saved = [(cfg, getattr(cfg, "_attn_implementation_internal", None)) for cfg in configs]
    try:
        model.set_attn_implementation("eager")
        with eval_mode(model):
            yield model
    finally:
        for cfg, value in saved:
            cfg._attn_implementation_internal = value


@torch.no_grad()
def attention_patterns(model, tokens: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of every head.

    Args:
        model: a ``transformers`` causal LM (e.g. ``GPT2LMHeadModel``).
        tokens: [batch, seq] int64 token ids.

    Returns:
        [n_layers, batch, n_heads, seq(query), seq(key)] float32 tensor on the CPU.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    device = input_device(model)
    with eager_attention(model):
        out = model(input_ids=tokens.to(device), output_attentions=True)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise RuntimeError("model did not return attention probabilities with eager attention")
    return torch.stack([a.detach().float().cpu() for a in attentions])


def previous_token_scores(model, tokens: torch.Tensor) -> torch.Tensor:
    """Previous-token score of every head.

    Args:
        model: a ``transformers`` causal LM.
        tokens: [batch, seq] int64 token ids (``seq >= 2``); any text or random tokens.

    Returns:
        [n_layers, n_heads] float32: attention from position ``i`` to ``i - 1``,
        averaged over positions ``i = 1 .. seq-1`` and the batch.
    """
    if tokens.shape[-1] < 2:
        raise ValueError("need at least 2 positions for previous-token scores")
    patterns = attention_patterns(model, tokens)  # [L, B, H, T, T]
    prev = patterns.diagonal(offset=-1, dim1=-2, dim2=-1)  # [L, B, H, T-1]
    return prev.mean(dim=(1, 3))


def induction_scores(model, tokens: torch.Tensor, half_len: int | None = None) -> torch.Tensor:
    """Induction score of every head on repeated random tokens.

    Args:
        model: a ``transformers`` causal LM.
        tokens: [batch, 2 * half_len] int64 sequences ``[r | r]`` (see
            :func:`headint.tasks.induction.repeated_random_tokens`).
        half_len: length ``h`` of the repeated half; defaults to ``seq // 2``.

    Returns:
        [n_layers, n_heads] float32: attention from position ``i`` to ``i - h + 1``,
        averaged over the second-half positions ``i = h .. 2h-1`` and the batch.

    Raises:
        ValueError: if ``tokens`` is not of the form ``[r | r]``.
    """
    seq = tokens.shape[-1]
    h = seq // 2 if half_len is None else int(half_len)
    if h < 1 or 2 * h > seq:
        raise ValueError(f"half_len={h} incompatible with sequence length {seq}")
    if not torch.equal(tokens[:, :h], tokens[:, h : 2 * h]):
        raise ValueError("tokens must be a random half repeated once: tokens[:, :h] == tokens[:, h:2h]")
    patterns = attention_patterns(model, tokens)  # [L, B, H, T, T]
    # query i in [h, 2h) -> key i - h + 1, i.e. the diagonal at offset -(h - 1)
    diag = patterns.diagonal(offset=-(h - 1), dim1=-2, dim2=-1)  # [L, B, H, T-h+1], entry j: query j+h-1
    ind = diag[..., 1 : h + 1]  # queries h .. 2h-1
    return ind.mean(dim=(1, 3))
