"""Setup of the op-level tests: every backend, the Triton one under its CPU interpreter.

These tests run in the Triton interpreter lane: ``TRITON_INTERPRET=1`` is set by tests/conftest.py
before anything imports triton's kernels, and only in a session that runs this lane.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _interpreter_lane():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("tests/ops runs in the Triton interpreter lane (TRITON_INTERPRET=1, set by tests/conftest.py)")
