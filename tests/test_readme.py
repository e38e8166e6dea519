"""The README's examples run as written.

Every fenced ``python`` block is executed, in order, each in a fresh namespace and a scratch
folder (the quick start in a fresh interpreter started in the repository root, as a user runs
it: see tests/readme_blocks.py); every ``bash`` block is run (``headint`` resolves to ``python -m headint`` of this
checkout). A block preceded by ``<!-- not-run: reason -->`` is skipped (the reason must be
given); one preceded by ``<!-- needs: module -->`` runs only where ``module`` is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

from readme_blocks import REPO, blocks


def test_markers_are_explained_and_blocks_found():
    py, sh = blocks("python"), blocks("bash")
    assert len(py) >= 3 and len(sh) >= 3
    for b in py + sh:
        if b["marker"] == "not-run":
            assert len(b["arg"]) > 10, f"README line {b['line']}: a not-run block needs a reason"
    # the examples that matter are not skipped
    assert all(b["marker"] is None for b in py if "headint.scan(" in b["code"] or "headint.attention(" in b["code"])
    assert sum(b["marker"] is None for b in sh) >= 1


def _run_python(block, tmp_path, monkeypatch):
    if block["marker"] == "not-run":
        pytest.skip(f"README line {block['line']}: {block['arg']}")
    if block["marker"] == "needs" and importlib.util.find_spec(block["arg"]) is None:
        pytest.skip(f"README line {block['line']} needs {block['arg']}, which is not installed")
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("__readme__")  # a real module: dataclasses defined in a block look it up
    monkeypatch.setitem(sys.modules, "__readme__", module)
    namespace = module.__dict__
    exec(compile(block["code"], f"README.md block at line {block['line']}", "exec"), namespace)
    return namespace


def test_quick_start_runs_from_the_repo_root(tmp_path):
    """The quick start as a user runs it: a fresh interpreter started in the clone's root, which
    is first on sys.path (a folder there that shadows an installed package breaks this)."""
    code = "import sys; sys.path.insert(1, 'tests'); import readme_blocks; readme_blocks.main()"
    proc = subprocess.run([sys.executable, "-c", code, "quick-start", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("README-SUMMARY "))
    summary = json.loads(line[len("README-SUMMARY "):])
    assert {"patching.png", "patching.csv", "patching.html"} <= set(summary["files"])
    assert summary["pattern_heads"] == ["L0H0", "L1H3"] and summary["pattern_examples"] == 3
    assert summary["logits_shape"] == summary["clean_shape"]
    assert {tuple(h) for h in summary["top"][:2]} == {(0, 0), (1, 3)}
    assert {tuple(h) for h in summary["top"]} == {(0, 0), (1, 3), (1, 2), (1, 0), (0, 1)}
    assert summary["effect_definition"].startswith("effect = value - clean baseline")
    # transformers' `kernels` (where installed) came from site-packages, not from the clone
    assert summary["kernels"] is None or not summary["kernels"].startswith(str(REPO) + os.sep + "kernels")


def test_op_level_example_runs(tmp_path, monkeypatch, capsys):
    import torch

    import headint

    block = next(b for b in blocks("python") if "headint.attention(" in b["code"])
    ns = _run_python(block, tmp_path, monkeypatch)
    assert "torch.Size([2, 4, 8, 16])" in capsys.readouterr().out
    expected = headint.attention(ns["q"], ns["k"], ns["v"], causal=True, head_mask=ns["m"], head_patch=ns["z_mean"],
                                 knockout=headint.EdgeKnockout(ns["qsel"], ns["ksel"]), score_scale=ns["s"], backend="reference")
    torch.testing.assert_close(ns["out"], expected, atol=1e-5, rtol=1e-5)


def test_other_python_blocks_run(tmp_path, monkeypatch):
    others = [b for b in blocks("python") if "headint.scan(" not in b["code"] and "headint.attention(" not in b["code"]]
    ran = 0
    for block in others:
        if block["marker"] == "not-run" or (block["marker"] == "needs" and importlib.util.find_spec(block["arg"]) is None):
            continue
        _run_python(block, tmp_path, monkeypatch)
        ran += 1
    if not ran:
        pytest.skip("every other python block needs a package that is not installed")


def test_bash_blocks_run(tmp_path):
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "headint").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m headint "$@"\n')
    (shim / "headint").chmod(0o755)
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    runnable = [b for b in blocks("bash") if b["marker"] is None]
    for block in runnable:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"README line {block['line']}: {proc.stderr[-2000:]}"
        assert "usage: headint" in proc.stdout
