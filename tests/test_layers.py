"""The import picture of the rooms: cli/demo/experiments -> scans -> integration -> plan/interventions
-> ops; results beside the scans and below them; models and tasks never reach a scan.

The data path (README, "The rooms"): intervention objects -> a plan -> the attention function
registered with transformers (integration) -> ``headint.attention`` (ops) -> a backend -> a kernel.
So ``ops`` imports no other room and no ``transformers`` (kernels know tensors and strides, not
models); ``interventions`` know shapes and recorded activations, not plans, the integration or the
attention op; ``integration`` knows transformers and reaches the op through ``headint.ops.attention``
and its argument/reference helpers, never a backend or a kernel; the kernel package
``headint_kernels`` imports nothing of headint and no transformers.

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


def _room_files(room: str) -> list[Path]:
    files = sorted((PACKAGE / room).rglob("*.py")) if (PACKAGE / room).is_dir() else [PACKAGE / f"{room}.py"]
    assert files, room
    return files


def _room_imports(room: str) -> dict[str, set[str]]:
    return {str(f.relative_to(PACKAGE.parent)): _imports(f) for f in _room_files(room)}


def _top_level_modules(text: str) -> set[str]:
    """Top-level names of the absolute imports in ``text`` (``transformers``, ``torch``, ...)."""
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


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


# what each room of the data path may import (prefixes); anything else of headint is forbidden
ALLOWED = {
    "ops": ("headint.ops",),
    "interventions": ("headint.interventions", "headint.shape", "headint.activations", "headint.vocabulary",
                      "headint.ops.knockout"),  # EdgeKnockout: a data type of the op, not the op
    "integration": ("headint.integration", "headint.interventions", "headint.plan", "headint.shape", "headint.activations",
                    "headint.distributed", "headint.vocabulary", "headint.tokens",
                    "headint.ops.attention", "headint.ops.arguments", "headint.ops.reference", "headint.ops.knockout",
                    "headint.ops.errors"),
}
# third-party packages a room must not import: models (transformers) below the integration, kernels above ops
FORBIDDEN_PACKAGES = {"ops": ("transformers", "accelerate"),
                      "interventions": ("transformers", "accelerate", "triton", "headint_kernels"),
                      "integration": ("triton", "headint_kernels")}


def _outside(names: set[str], allowed: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if not any(n == a or n.startswith(a + ".") for a in allowed))


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_data_path_room_imports_only_what_is_below_it(room):
    bad = {f: _outside(names, ALLOWED[room]) for f, names in _room_imports(room).items()}
    bad = {f: n for f, n in bad.items() if n}
    assert not bad, f"{room} imports what it must not: {bad}"
    for f in _room_files(room):
        tops = _top_level_modules(f.read_text()) & set(FORBIDDEN_PACKAGES[room])
        assert not tops, f"{f.relative_to(PACKAGE.parent)} imports {sorted(tops)}, which {room} must not"


def test_kernels_know_tensors_not_models():
    kernels = PACKAGE.parent / "kernels" / "headint_kernels"
    files = sorted(kernels.rglob("*.py"))
    assert files
    for f in files:
        tops = _top_level_modules(f.read_text())
        assert not tops & {"headint", "transformers", "accelerate"}, (f.name, sorted(tops))


def test_the_room_rules_can_fail():
    """The checks above can fail: a scan import in ops, a kernel backend in the integration, a plan in
    an intervention, transformers in ops."""
    assert _outside({"headint.scans.exact"}, ALLOWED["ops"]) == ["headint.scans.exact"]
    assert _outside({"headint.ops.backends", "headint.ops.attention"}, ALLOWED["integration"]) == ["headint.ops.backends"]
    assert _outside({"headint.plan.TensorPlan", "headint.ops.knockout.EdgeKnockout"}, ALLOWED["interventions"]) == [
        "headint.plan.TensorPlan"]
    assert _top_level_modules("def f():\n    from transformers import AutoModel\n") == {"transformers"}
    assert _top_level_modules("from .x import y\nimport torch.nn as nn\n") == {"torch"}


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
