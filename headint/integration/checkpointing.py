"""Gradient checkpointing inside ``intervene``: recomputation sees the same interventions.

With ``model.gradient_checkpointing_enable()`` a checkpointed layer's forward is run again
during ``backward()``, which may come after the ``intervene`` block has exited (the loss is
computed inside, ``loss.backward()`` outside). Without care that recomputation would run the
model's own attention (reentrant checkpoints: wrong gradients) or differ from the forward
(non-reentrant: ``CheckpointError``).

While a model is switched to headint's attention, every ``GradientCheckpointingLayer``'s
``_gradient_checkpointing_func`` is wrapped (:func:`wrap`; restored when the last block on the
model exits). A checkpointed call made inside a session keeps that session and the positions
of its forward with the graph; when the layer is recomputed, the session is resumed for the
recomputation only (:func:`~headint.integration.session.resumed`): the model switched again if
the block has exited, the session on the recomputing thread's stack, the same plan and positions,
no recording. So gradients are those of the intervened forward, whenever ``backward`` runs.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

ATTR = "_gradient_checkpointing_func"


class _KeepSession:
    """Stands in for one layer's checkpointing function; see the module docstring."""

    def __init__(self, module: nn.Module, original: Callable, find: Callable, resume: Callable):
        self.module = module
        self.original = original
        self.find, self.resume = find, resume

    def __call__(self, function: Callable, *args: Any, **kwargs: Any):
        session = self.find(self.module)
        if session is None:
            return self.original(function, *args, **kwargs)
        state = session.position_state()
        runs = [0]

        def run(*a, **k):
            runs[0] += 1
            if runs[0] == 1:  # the forward itself, inside the session
                return function(*a, **k)
            with self.resume(session, state):  # a recomputation during backward
                return function(*a, **k)

        return self.original(run, *args, **kwargs)


def wrap(model: nn.Module, find: Callable, resume: Callable) -> list[tuple[nn.Module, Callable]]:
    """Wrap every layer's checkpointing function; ``find(module)``: the session a call belongs to
    (or None), ``resume(session, state)``: a context that applies it again for a recomputation.
    Returns what :func:`unwrap` puts back."""
    saved = []
    for m in model.modules():
        f = m.__dict__.get(ATTR)
        if f is not None and not isinstance(f, _KeepSession):
            saved.append((m, f))
            setattr(m, ATTR, _KeepSession(m, f, find, resume))
    return saved


def unwrap(saved: list[tuple[nn.Module, Callable]]) -> None:
    for m, f in saved:
        if isinstance(m.__dict__.get(ATTR), _KeepSession):
            setattr(m, ATTR, f)
