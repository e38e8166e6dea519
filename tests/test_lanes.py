"""The two test lanes (tests/conftest.py): the Triton interpreter's variable stays out of the
native lane, and every test folder belongs to exactly one lane."""

from __future__ import annotations

import os
import sys

from lanes import INTERPRETER_DIRS, TESTS, in_interpreter_lane


def test_the_native_lane_runs_without_the_interpreter():
    """Nothing set TRITON_INTERPRET in this process: the interpreter lane's conftests did not leak
    into this session (they used to set it at import, for every test collected with them)."""
    assert os.environ.get("TRITON_INTERPRET") is None
    config = sys.modules.get("headint_kernels.config")
    assert config is None or not config.INTERPRET


def test_lane_of_a_path():
    for d in INTERPRETER_DIRS:
        assert (TESTS / d).is_dir() and in_interpreter_lane(TESTS / d) and in_interpreter_lane(TESTS / d / "test_x.py")
    for p in ("test_cli.py", "cpu_kernel/test_cpu_kernel.py", "compat/test_matrix.py", "distributed"):
        assert not in_interpreter_lane(TESTS / p), p
    assert not in_interpreter_lane(TESTS) and not in_interpreter_lane(TESTS.parent / "headint" / "ops")
