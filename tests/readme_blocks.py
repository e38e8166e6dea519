"""The README's fenced code blocks, and running one as a user does from the clone's root.

``blocks(language)`` lists the blocks (with their ``<!-- not-run: reason -->`` /
``<!-- needs: module -->`` markers). :func:`run_from_repo_root` executes a block the way a
user who starts Python in the clone does (``python -c``, a notebook, ``python -`` there): the
repository root first on ``sys.path``, so a folder or module at the root that shadows an
installed package (as ``kernels/`` once hid the PyPI package ``kernels`` from transformers)
breaks it. Used by tests/test_readme.py and by .ci/run::

    python -c "import sys; sys.path.insert(1, 'tests'); import readme_blocks; readme_blocks.main()" quick-start SCRATCH
"""

from __future__ import annotations

import json
import os
import re
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"(?:<!--\s*(not-run|needs):\s*(.*?)\s*-->\s*\n)?```(\w*)\n(.*?)```", re.S)


def blocks(language: str) -> list[dict]:
    """``[{index, marker, arg, code, line}]`` of the README's fenced blocks in ``language``."""
    text = README.read_text()
    found = []
    for n, m in enumerate(BLOCK.finditer(text)):
        marker, arg, lang, code = m.groups()
        if lang == language:
            found.append(dict(index=n, marker=marker, arg=arg, code=code, line=text[: m.start(3)].count("\n") + 1))
    return found


def quick_start() -> dict:
    """The quick start: the first python block that calls ``headint.scan(``."""
    return next(b for b in blocks("python") if "headint.scan(" in b["code"])


def run_from_repo_root(block: dict, scratch: str | os.PathLike) -> dict:
    """Execute ``block`` in this interpreter, started in the repository root, writing its files to
    ``scratch``: the root stays first on ``sys.path`` (as an absolute path, since the working
    directory moves to ``scratch``). Returns the block's namespace."""
    if Path.cwd().resolve() != REPO:
        raise RuntimeError(f"start Python in the repository root {REPO} (the working directory is {Path.cwd()})")
    if not sys.path or sys.path[0] not in ("", str(REPO)):
        raise RuntimeError(f"the repository root must be first on sys.path, as for `python -c` started there; got {sys.path[:2]}")
    sys.path[0] = str(REPO)
    os.chdir(scratch)
    module = types.ModuleType("__readme__")  # a real module: dataclasses defined in a block look it up
    sys.modules["__readme__"] = module
    exec(compile(block["code"], f"README.md block at line {block['line']}", "exec"), module.__dict__)
    return module.__dict__


def main() -> None:
    """``quick-start SCRATCH``: run the quick start from the repository root and print a JSON
    summary of what it made (for tests/test_readme.py)."""
    what, scratch = sys.argv[1], sys.argv[2]
    if what != "quick-start":
        raise SystemExit(f"unknown block {what!r}; expected quick-start")
    ns = run_from_repo_root(quick_start(), scratch)
    from report_checks import report_data  # tests/report_checks.py: the data the interactive report draws

    patterns = report_data(Path("patching.html").read_text())["patterns"]
    summary = dict(
        kernels=getattr(sys.modules.get("kernels"), "__file__", None),
        files=sorted(p.name for p in Path(".").iterdir()),
        pattern_heads=patterns["heads"], pattern_examples=len(patterns["examples"]),
        logits_shape=list(ns["logits"].shape[:2]), clean_shape=list(ns["p"].clean.shape),
        top=[[int(r.layer), int(r.head)] for r in ns["result"].top(5).itertuples()],
        effect_definition=ns["result"].effect_definition,
    )
    print("README-SUMMARY " + json.dumps(summary))
