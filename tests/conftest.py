"""Shared test setup.

- Two lanes. The Triton kernels run on CPU only under the Triton interpreter, which
  ``TRITON_INTERPRET=1`` switches on for the whole process (``triton.jit`` reads it when a kernel
  is defined). The tests that need it (:data:`INTERPRETER_DIRS`: the backend conformance suite,
  the Triton-specific and the op-level tests) form the *interpreter lane*; every other test runs
  in the *native lane*, without the variable, so it sees the environment a user has (e.g. the
  test that the Triton backend refuses CPU tensors without the interpreter runs there).
  A session is in the interpreter lane when ``TRITON_INTERPRET=1`` is set, or when every path
  it was given lies in those folders (``pytest tests/backends`` then sets the variable itself,
  before anything imports triton); it collects only its lane's tests and says what it left out.
  ``bash scripts/test.sh`` runs both lanes, one after the other.
- Makes the helper modules in tests/ (tiny_models, scan_oracles, backend_model_checks,
  attention_cases) importable from the test subdirectories.
- Runs every test module with one torch thread: pytest-xdist already runs one worker per
  core, and tiny shapes only gain contention from more threads.
- Tiny GPT-2 / Llama (GQA) fixtures for the scan tests, built lazily once per process and checked
  after each test to be left as they were (``tests/shared_models.py``).

Imports nothing heavy at collection time: the lane is decided, and ``TRITON_INTERPRET`` set,
in :func:`pytest_configure`, before any test module imports headint or triton.
"""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from lanes import INTERPRETER_DIRS, in_interpreter_lane, lane_dir  # noqa: E402

_LANE = pytest.StashKey[bool]()


def pytest_configure(config):
    given = [Path(str(a).split("::")[0]) for a in config.args]
    interpreter = os.environ.get("TRITON_INTERPRET") == "1" or (
        bool(given) and all(in_interpreter_lane(p) for p in given))
    if interpreter:
        os.environ["TRITON_INTERPRET"] = "1"  # before any test module imports triton's kernels
    config.stash[_LANE] = interpreter


def pytest_ignore_collect(collection_path, config):
    """Each lane collects only its own tests (see the module docstring)."""
    path = Path(collection_path)
    if path.resolve() == TESTS or lane_dir(path) is None and path.resolve().parent != TESTS:
        return None
    if config.stash[_LANE]:
        return True if not in_interpreter_lane(path) else None
    return True if in_interpreter_lane(path) else None


def pytest_collection_modifyitems(config, items):
    """Tests of the other lane that were named explicitly (not seen by pytest_ignore_collect) are
    deselected, as the header says."""
    interpreter = config.stash[_LANE]
    other = [it for it in items if in_interpreter_lane(Path(str(it.path))) != interpreter]
    if other:
        items[:] = [it for it in items if in_interpreter_lane(Path(str(it.path))) == interpreter]
        config.hook.pytest_deselected(items=other)


def pytest_report_header(config):
    dirs = ", ".join(f"tests/{d}" for d in INTERPRETER_DIRS)
    if config.stash[_LANE]:
        return f"headint: Triton interpreter lane (TRITON_INTERPRET=1): only {dirs}; the rest runs without the variable"
    return (f"headint: native lane (no TRITON_INTERPRET): {dirs} are left to the interpreter lane "
            f"(TRITON_INTERPRET=1 python -m pytest {' '.join('tests/' + d for d in INTERPRETER_DIRS)}; bash scripts/test.sh runs both)")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def _shared_models():
    from shared_models import SharedModels

    return SharedModels()


@pytest.fixture
def gpt2(_shared_models):
    """The tiny GPT-2 of ``scan_oracles`` (shared by the tests of a process; see ``tests/shared_models.py``)."""
    yield from _shared_models.lend("gpt2")


@pytest.fixture
def llama(_shared_models):
    """The tiny Llama (GQA) of ``scan_oracles`` (shared by the tests of a process; see ``tests/shared_models.py``)."""
    yield from _shared_models.lend("llama")


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    return request.getfixturevalue(request.param)
