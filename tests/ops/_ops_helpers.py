"""Helpers of the op-level tests."""

from __future__ import annotations

import shutil

import pytest
import torch

from headint.ops import backends

BACKENDS = ("reference", "sdpa", "cpu", "triton")


def require_backend(name: str) -> None:
    """Skip when a backend cannot run on this machine (the CPU one needs a C++ compiler, the Triton
    one the triton package); a compiler that exists but fails to build is a failure."""
    reason = backends.unavailable_reason(name, torch.device("cpu"))
    if reason is None:
        return
    if name == "cpu" and (shutil.which("c++") or shutil.which("g++")):
        pytest.fail(f"the CPU backend is unavailable although a compiler exists: {reason}")
    pytest.skip(f"backend {name!r} unavailable: {reason}")
