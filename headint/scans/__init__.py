"""Causal scans over attention heads: exact (batched), attribution patching, path patching."""

from .attribution import attribution_scan
from .checkpoint import CheckpointError
from .exact import scan
from .path import path_patch
from .variants import Variant, all_pairs

__all__ = ["scan", "attribution_scan", "path_patch", "all_pairs", "Variant", "CheckpointError"]
