"""Make the shared test helpers in tests/ (tiny_models, backend_model_checks, scan_oracles)
importable from the test subdirectories. Imports nothing else: tests/kernels/conftest.py must
set TRITON_INTERPRET before triton is imported."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
