"""Errors of the op level that more than one module raises."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run these tensors on this machine (the message says why)."""


class UnsupportedDtype(BackendUnavailable, TypeError):
    """The backend does not take the inputs' dtype."""


class UnsupportedShape(BackendUnavailable, ValueError):
    """The inputs' shape is outside what the backend's kernels take (e.g. the head dim)."""
