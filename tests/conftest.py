"""Shared test setup.

- Makes the helper modules in tests/ (tiny_models, scan_oracles, backend_model_checks,
  attention_cases) importable from the test subdirectories.
- Runs every test module with one torch thread: pytest-xdist already runs one worker per
  core, and tiny shapes only gain contention from more threads.
- Tiny GPT-2 / Llama (GQA) fixtures for the scan tests, built lazily.

Imports nothing heavy at collection time: tests/backends/conftest.py and tests/triton/conftest.py
must set TRITON_INTERPRET before triton is imported.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def gpt2():
    from scan_oracles import tiny_gpt2

    return tiny_gpt2()


@pytest.fixture(scope="module")
def llama():
    from scan_oracles import tiny_llama

    return tiny_llama()


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    return request.getfixturevalue(request.param)
