"""Causal scans over attention heads: exact (batched), attribution patching, path patching."""

from .exact import scan
from .variants import Variant, all_pairs

__all__ = ["scan", "all_pairs", "Variant"]
