"""The modes a model runs in under headint: train/eval flags, dropout, gradients.

- :func:`eval_mode`: eval mode for a block (scans, patterns); on exit every module gets back its
  *own* train/eval flag (``model.train(flag)`` would reset every submodule to the model's).
- :func:`active_dropout` / :func:`warn_active_dropout`: a model in train mode with dropout
  ``p > 0`` gives random results; ``intervene`` (and ``record``) warn, naming the modules and
  rates (:class:`DropoutWarning`), since training with interventions is a legitimate use.
  Attention dropout itself is refused by the attention function (headint's kernels do not
  implement it).
- :func:`require_autograd`: gradient methods (attribution patching, learned gates, importance
  pruning) cannot run under ``torch.inference_mode()``; they say so instead of failing deep
  inside autograd. ``torch.no_grad()`` is fine: they enable gradients where they need them.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model.eval()``; on exit (also on error) each module's own train/eval
    flag is restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


class DropoutWarning(UserWarning):
    """A model runs with active dropout inside ``headint.intervene``: results are random."""


def active_dropout(model: nn.Module) -> list[str]:
    """``"name (p=...)"`` for every module in train mode that drops out: an ``nn.Dropout``-like
    module with ``p > 0``, or a module holding a float attribute named ``*dropout*`` / ``*pdrop``
    ``> 0`` (models that call ``F.dropout(x, p=self.dropout, training=self.training)``). Attention
    dropout (modules or attributes named ``attn_dropout``, ``attention_dropout``, ``attn_pdrop``,
    ...) is left out: the attention function refuses it itself."""
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd):
            last = name.rsplit(".", 1)[-1].lower()
            if m.p > 0 and "attn" not in last and "attention" not in last:
                found.append(f"{name or type(m).__name__} (p={m.p:g})")
            continue
        for key, value in vars(m).items():
            low = key.lower()
            if isinstance(value, float) and value > 0 and ("dropout" in low or low.endswith("pdrop")) \
                    and "attn" not in low and "attention" not in low:
                found.append(f"{name or type(m).__name__}.{key} (p={value:g})")
    return found


def warn_active_dropout(model: nn.Module, what: str = "headint.intervene") -> None:
    """Warn (:class:`DropoutWarning`) if ``model`` runs with active dropout."""
    found = active_dropout(model)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        warnings.warn(
            f"{what}: {type(model).__name__} is in train mode with dropout active ({shown}), so every forward "
            "drops different activations and intervention results are random; call model.eval() for reproducible "
            "effects (scans do this themselves)", DropoutWarning, stacklevel=3,
        )


def require_autograd(method: str) -> None:
    """Refuse a gradient method under ``torch.inference_mode()``, naming it."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{method} computes gradients, which cannot run under torch.inference_mode() (tensors made there can never "
            "require grad); call it outside the inference_mode block (torch.no_grad() is fine: headint enables gradients "
            "where it needs them)"
        )
