"""Op level: the intervened attention operator and its backends."""

from .attention import attention
from .backends import BackendUnavailable, available_backends, backend_names, last_backend
from .knockout import EdgeKnockout

__all__ = ["attention", "EdgeKnockout", "BackendUnavailable", "available_backends", "backend_names", "last_backend"]
