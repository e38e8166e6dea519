"""Shared setup of the pytest-benchmark suites in ``bench/``.

    pytest bench/ --benchmark-only                      # everything (a few minutes on 2 cores)
    pytest bench/test_bench_attention.py --benchmark-only -k "T128"
    pytest bench/ --benchmark-only --benchmark-json bench/results/pytest_bench.json

``bench/`` is outside the repository's ``testpaths`` (``tests``), so a plain ``pytest`` never
collects it. Threads: ``HEADINT_BENCH_THREADS`` (default 2), set once for the session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the suites import helpers from scan_vs_hooks.py
    sys.path.insert(0, str(HERE))

THREADS = int(os.environ.get("HEADINT_BENCH_THREADS", "2"))


def pytest_configure(config):
    torch.set_num_threads(THREADS)


def pytest_report_header(config):
    import headint

    return (f"headint bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"headint backends on cpu: {headint.available_backends('cpu')}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """Correctness gate run before a benchmark times anything."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    assert bool((diff <= bound).all()), f"{what}: max abs diff {float(diff.max()):.3g} exceeds atol={atol}, rtol={rtol}"


@pytest.fixture
def check():
    return assert_close
