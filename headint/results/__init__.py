"""Scan results: :class:`ScanResult` and what it is made of.

``result.py``  the container and its tables (``to_frame``, ``top``);
``stats.py``   NaN-aware means, standard errors, paired effect standard errors, and
               :class:`NaNMetricWarning`;
``plots.py``   heatmaps and bar charts (matplotlib imported lazily, there only);
``io.py``      save / load (safetensors + standard-JSON sidecar with a content hash) and CSV;
``grid.py``    the grid's axes and the names of head sets and cells;
``report.py``  the interactive HTML report (``report_data.py`` its data, ``viewer/`` its viewer,
               ``circuit_graph.py`` circuits as it draws them).

Results know tables, plots and files; they import no scan.
"""

from .circuit_graph import CircuitGraph, circuit_graph
from .grid import AXES_CHOICES, head_set_name
from .report_data import RelatedScan
from .result import ScanResult
from .stats import NaNMetricWarning

__all__ = ["ScanResult", "NaNMetricWarning", "AXES_CHOICES", "head_set_name", "RelatedScan", "CircuitGraph", "circuit_graph"]
