"""The clone's root as a user's working directory: nothing there may shadow an installed package.

Python puts the working directory first on ``sys.path`` for ``python -c``, ``python -m``,
``python -m pytest``, notebooks and ``torchrun -m`` started in the clone. A regular package or
module at the root then wins over the installed one of the same name: the Triton package once
lived in ``kernels/__init__.py`` and hid the PyPI package ``kernels`` that transformers 5.25
imports, so loading any model failed from the root (949 tests of a fresh clone).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_SUFFIXES = (".py", ".pyc", ".pyw", ".so", ".pyd", ".pth")


def test_model_loads_from_the_repo_root():
    """The issue's command, run where a user runs it."""
    code = "import headint; headint.models.load('induction-2l'); print('loaded')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-3000:]


def test_only_headint_is_an_importable_package_at_the_root():
    """Static: ``headint`` is the one regular package at the root; no module files there (a folder
    without ``__init__.py``, like ``kernels/``, is at most a namespace package, which never wins
    over an installed package of the same name)."""
    packages = sorted(p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert packages == ["headint"], packages
    modules = sorted(p.name for p in REPO.iterdir() if p.is_file() and p.name.endswith(MODULE_SUFFIXES))
    assert modules == [], modules
    assert (REPO / "kernels" / "headint_kernels" / "__init__.py").exists()  # the Triton sources keep their home


_RESOLVE = r"""
import importlib.util, json, os, sys
names = json.loads(sys.argv[1])
root = os.getcwd()
def where(name):
    sys.modules.pop(name, None)
    importlib.invalidate_caches()
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    return spec.origin if spec.origin not in (None, "namespace") else "namespace"
with_root = {n: where(n) for n in names}
sys.path = [p for p in sys.path if p not in ("", root)]
without_root = {n: where(n) for n in names}
print(json.dumps([with_root, without_root]))
"""


def test_no_root_folder_shadows_an_installed_package():
    """Dynamic: every name at the root resolves, with the root first on ``sys.path``, to what it
    resolves to without the root (an installed package stays itself; e.g. ``kernels``)."""
    names = sorted({p.name if p.is_dir() else p.name.split(".")[0] for p in REPO.iterdir()
                    if not p.name.startswith(".") and p.name.split(".")[0].isidentifier()} | {"kernels"})
    proc = subprocess.run([sys.executable, "-c", _RESOLVE, json.dumps(names)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with_root, without_root = json.loads(proc.stdout)
    for name in names:
        installed = without_root[name]
        if name == "headint" or installed in (None, "namespace"):
            continue  # nothing installed under that name to shadow (headint is this clone, installed editable)
        assert with_root[name] == installed, f"{REPO / name} shadows the installed {name!r} ({installed})"


# ------------------------------------------------------------------------ the versions the suite ran against


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_readme_states_the_constrained_versions():
    import re

    pins = _constraints()
    text = (REPO / "README.md").read_text()
    section = text[text.index("**Versions.**"):]
    section = section[: section.index("\n\n")]
    stated = dict((n.lower(), v) for n, v in re.findall(r"\b([A-Za-z][\w-]*) (\d+\.\d+(?:\.\d+)?)\b", section))
    stated.pop("python", None)
    assert {"torch", "transformers", "triton", "numpy", "pandas", "matplotlib"} <= set(stated), stated
    for name, version in stated.items():
        assert pins.get(name) == version, f"README states {name} {version}; constraints.txt pins {pins.get(name)}"
    # setup.sh installs with them, and CI goes through setup.sh
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup and "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_installed_versions_are_the_constrained_ones():
    """Where the suite runs in .venv (not HEADINT_CONSTRAINTS=latest), it runs against exactly the
    versions constraints.txt (and the README) state."""
    import os
    from importlib.metadata import PackageNotFoundError, version

    import pytest

    if os.environ.get("HEADINT_CONSTRAINTS") == "latest":
        pytest.skip("HEADINT_CONSTRAINTS=latest: running against the newest releases")
    wrong = []
    for name, pinned in _constraints().items():
        try:
            have = version(name).split("+")[0]
        except PackageNotFoundError:
            continue  # an optional extra not installed here
        if have != pinned:
            wrong.append(f"{name} {have} (constraints.txt: {pinned})")
    assert not wrong, f"installed versions differ from constraints.txt: {', '.join(wrong)}; run bash scripts/setup.sh"
