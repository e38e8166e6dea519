"""The C++ kernel's build cache (issue #12 item 10).

The build directory depends on what the binary depends on (sources' content, flags, toolchain,
CPU) and not on where the checkout is; builds are serialised by a file lock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from headint.ops import cpu_backend

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def two_checkouts(tmp_path, monkeypatch):
    """Two copies of csrc/ in different places, and a private cache root."""
    src = cpu_backend.source_dir()
    a, b = tmp_path / "checkout_a" / "csrc", tmp_path / "elsewhere" / "b" / "csrc"
    shutil.copytree(src, a)
    shutil.copytree(src, b)
    monkeypatch.setenv("HEADINT_CACHE_DIR", str(tmp_path / "cache"))
    return a, b


def test_same_sources_in_two_places_share_one_build_dir(two_checkouts, monkeypatch):
    a, b = two_checkouts
    assert cpu_backend.build_dir(a) == cpu_backend.build_dir(b)
    monkeypatch.setenv("HEADINT_CSRC", str(a))
    via_env_a = cpu_backend.build_dir()
    monkeypatch.setenv("HEADINT_CSRC", str(b))
    assert cpu_backend.build_dir() == via_env_a == cpu_backend.build_dir(a)
    assert via_env_a.parent == Path(os.environ["HEADINT_CACHE_DIR"])


def test_changed_source_or_flag_maps_to_another_build_dir(two_checkouts, monkeypatch):
    a, b = two_checkouts
    base = cpu_backend.build_dir(a)
    cpp = b / "attention_cpu.cpp"
    cpp.write_text(cpp.read_text() + "\n// one more line\n")
    assert cpu_backend.build_dir(b) != base
    cpp.write_text(cpp.read_text()[: -len("\n// one more line\n")])
    assert cpu_backend.build_dir(b) == base
    (b / "extra.h").write_text("#pragma once\n")  # a new header is part of the build too
    assert cpu_backend.build_dir(b) != base
    monkeypatch.setattr(cpu_backend, "EXTRA_CFLAGS", cpu_backend.EXTRA_CFLAGS + ["-DHEADINT_TEST_FLAG"])
    assert cpu_backend.build_dir(a) != base
    monkeypatch.undo()
    monkeypatch.setattr(cpu_backend, "_cpu_fingerprint", lambda: "some other cpu")
    assert cpu_backend.build_dir(a) != base


def test_sources_are_staged_inside_the_cache(two_checkouts, tmp_path):
    a, _ = two_checkouts
    dest = tmp_path / "cache" / "stage"
    staged = cpu_backend._stage_sources(a, dest)
    assert [p.name for p in staged] == [p.name for p in sorted(a.iterdir())]
    assert all(p.parent == dest and p.read_bytes() == (a / p.name).read_bytes() for p in staged)
    before = {p: p.stat().st_mtime_ns for p in staged}
    time.sleep(0.01)
    cpu_backend._stage_sources(a, dest)  # unchanged sources are not rewritten (ninja sees no change)
    assert {p: p.stat().st_mtime_ns for p in staged} == before


_LOCK_HOLDER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from headint.ops import cpu_backend
    with cpu_backend.exclusive(Path(sys.argv[1])):
        start = time.monotonic()
        time.sleep(0.6)
        end = time.monotonic()
    print(json.dumps([start, end]))
    """
)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def test_build_lock_excludes_a_second_process(tmp_path):
    lock = tmp_path / "build.lock"
    procs = [
        subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(lock)], stdout=subprocess.PIPE, text=True, env=_env())
        for _ in range(2)
    ]
    spans = sorted(json.loads(p.communicate(timeout=120)[0]) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    (s1, e1), (s2, e2) = spans
    assert e1 <= s2, f"both processes held the lock at once: {spans}"


_BUILDER = textwrap.dedent(
    """
    import torch
    from headint.ops import attention, cpu_backend, last_backend
    cpu_backend.build()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g) for _ in range(3))
    out = attention(q, k, v, causal=True, backend="cpu")
    assert last_backend() == "cpu"
    ref = attention(q, k, v, causal=True, backend="reference")
    assert (out - ref).abs().max().item() < 1e-5
    print("OK", cpu_backend.build_dir())
    """
)


@pytest.mark.slow
def test_concurrent_builders_both_load_a_working_kernel(tmp_path):
    """Two processes building into one empty cache at once: one compiles (printing one line), the
    other waits on the lock and loads the same library; both run the kernel correctly. A third
    process using a copy of the sources from another checkout reuses that build untouched."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    env = _env()
    env["HEADINT_CACHE_DIR"] = str(tmp_path / "cache")
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILDER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    dirs = {out.split()[-1] for out, _ in results}
    assert len(dirs) == 1
    assert sum(err.count(cpu_backend.COMPILING_MESSAGE) for _, err in results) == 1
    library = Path(dirs.pop()) / "build" / f"{cpu_backend.EXT_NAME}.so"
    assert library.is_file()
    built = library.stat().st_mtime_ns

    other = tmp_path / "other_checkout" / "csrc"
    shutil.copytree(cpu_backend.source_dir(), other)
    env["HEADINT_CSRC"] = str(other)
    third = subprocess.run([sys.executable, "-c", _BUILDER], capture_output=True, text=True, env=env, timeout=900)
    assert third.returncode == 0, third.stderr[-3000:]
    assert cpu_backend.COMPILING_MESSAGE not in third.stderr
    assert third.stdout.split()[-1] == str(library.parent.parent)
    assert library.stat().st_mtime_ns == built, "the build from another checkout's copy was redone"
