"""Setup of the op-level tests: every backend, the Triton one under its CPU interpreter.

``TRITON_INTERPRET=1`` must be in the environment before anything imports triton's kernels, so
it is set here, at the top of the conftest, like ``tests/kernels/conftest.py`` does. (A session
that collects this directory therefore runs every test with the variable set.)
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"
