"""The import picture of the rooms: cli/demo/experiments -> scans -> integration -> plan/interventions
-> ops; results beside the scans and below them; models and tasks never reach a scan.

Read statically from the sources (imports inside functions count), since importing any
``headint`` submodule runs ``headint/__init__.py``, which imports everything.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "headint"


def _imports_of_source(text: str, package: list[str]) -> set[str]:
    """Absolute names of the headint modules (or names in them) that source ``text`` imports,
    for a module inside the package ``package`` (e.g. ``["headint", "results"]``)."""
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.update(f"{module}.{a.name}" for a in node.names)
            names.add(module)
    return {n for n in names if n == "headint" or n.startswith("headint.")}


def _imports(path: Path) -> set[str]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return _imports_of_source(path.read_text(), parts[:-1])


def _room_imports(room: str) -> dict[str, set[str]]:
    files = sorted((PACKAGE / room).rglob("*.py")) if (PACKAGE / room).is_dir() else [PACKAGE / f"{room}.py"]
    assert files, room
    return {str(f.relative_to(PACKAGE.parent)): _imports(f) for f in files}


ABOVE_SCANS = ("headint.scans", "headint.experiments", "headint.demo", "headint.cli")


@pytest.mark.parametrize(
    "room, forbidden",
    [
        ("models", ABOVE_SCANS + ("headint.tasks", "headint.results", "headint.integration", "headint.ops")),
        ("tasks", ABOVE_SCANS + ("headint.results",)),
        ("results", ABOVE_SCANS + ("headint.models", "headint.tasks", "headint.integration", "headint.ops",
                                   "headint.plan", "headint.activations", "headint.interventions", "headint.patterns")),
        ("patterns", ABOVE_SCANS + ("headint.models", "headint.tasks", "headint.results")),
    ],
)
def test_room_imports_nothing_above_it(room, forbidden):
    bad = {
        f: sorted(n for n in names if n == "headint" or n.startswith(forbidden))
        for f, names in _room_imports(room).items()
    }
    bad = {f: n for f, n in bad.items() if n}
    assert not bad, f"{room} imports what it must not: {bad}"


def test_the_checker_sees_relative_and_function_level_imports():
    """The check above can fail: it finds relative imports, also inside functions."""
    text = "import headint.ops\ndef f():\n    from ..scans import scan\n    from . import stats\n"
    names = _imports_of_source(text, ["headint", "results"])
    assert {"headint.ops", "headint.scans", "headint.scans.scan", "headint.results.stats"} <= names
    assert _imports_of_source("from .. import cli\n", ["headint", "tasks"]) >= {"headint.cli"}


def test_every_subpackage_is_packaged():
    """pyproject.toml lists every package under headint/ (a missing one is absent from the wheel)."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(p.parent.relative_to(PACKAGE.parent).parts)
        for p in PACKAGE.rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= set(config["packages"]), sorted(found - set(config["packages"]))
    assert "*/*.safetensors" in config["package-data"]["headint.models"]
