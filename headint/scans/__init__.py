"""Causal scans over attention heads: exact (batched), attribution patching, path patching; learned
head gates, pruning curves and attention-knockout scans."""

from .attribution import attribution_scan
from .checkpoint import CheckpointError
from .exact import scan
from .effects import DirectTotal, direct_vs_total
from .path import path_patch
from .variants import Variant, all_pairs
from .gates import learn_gates
from .knockout import knockout_scan
from .prune import prune_curve
from .faithfulness import circuit_faithfulness, faithfulness_across, faithfulness_curve
from .route import route_knockout_scan

__all__ = ["scan", "attribution_scan", "path_patch", "all_pairs", "Variant", "CheckpointError", "learn_gates", "prune_curve", "knockout_scan", "direct_vs_total", "DirectTotal",
           "circuit_faithfulness", "faithfulness_curve", "faithfulness_across", "route_knockout_scan"]
