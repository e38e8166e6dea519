"""Shared fixtures of the C++-kernel-specific tests (conformance of the CPU backend is in tests/backends/).

Every test runs with ``headint.ops.cpu_backend.POISON_OUTPUTS`` on: outputs start NaN-filled,
so an element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from headint.ops import backends


def _cpu_reason() -> str | None:
    return backends.unavailable_reason("cpu", torch.device("cpu"))


@pytest.fixture(autouse=True)
def cpu_kernel():
    reason = _cpu_reason()
    if reason is not None:
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip(f"no C++ compiler: {reason}")
        pytest.fail(f"the CPU backend is unavailable although a compiler exists: {reason}")
    from headint.ops import cpu_backend

    old = cpu_backend.POISON_OUTPUTS
    cpu_backend.POISON_OUTPUTS = True
    try:
        yield cpu_backend
    finally:
        cpu_backend.POISON_OUTPUTS = old
