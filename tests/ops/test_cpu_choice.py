"""``"auto"`` on CPU between the native kernel and SDPA: a table measured once per machine
(:mod:`headint.ops.cpu_choice`). What it chooses is a speed question and is not asserted here;
that it is measured once, cached under the right key, read back, and followed is."""

from __future__ import annotations

import json

import pytest
import torch

from headint.ops import EdgeKnockout, attention, backends, cpu_backend, cpu_choice, last_backend
from headint.ops.arguments import prepare
from headint.ops.errors import BackendUnavailable

from _ops_helpers import require_backend


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A private cache root, the measurement on (whatever the environment says), no table in memory.
    The kernel is loaded from the shared build cache first (once per process), so that the private
    root does not compile it again (~1 min on 2 cores)."""
    try:
        cpu_backend.build()
    except BackendUnavailable:
        pass  # the tests that need the kernel skip or fail through require_backend
    monkeypatch.setenv("HEADINT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(cpu_choice.ENV, "measure")
    monkeypatch.delenv("HEADINT_CPU_KERNEL", raising=False)
    cpu_choice.forget()
    yield tmp_path
    cpu_choice.forget()


def _args(T, dtype=torch.float32, **kw):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, 2, T, 16, generator=g).to(dtype) for _ in range(3))
    return prepare(q, k, v, causal=True, **kw)


def _fake_table(kernel_rows: dict[int, bool], name="float32/fwd") -> dict:
    rows = {str(T): {"cpu_s": 1.0 if fast else 2.0, "sdpa_s": 1.5, "kernel": fast} for T, fast in kernel_rows.items()}
    return {"cpu": "test", "torch": torch.__version__, "kernel_build": "test", "entries": {name: {"rows": rows}}}


def test_nearest_probe_is_nearest_in_log_scale():
    probes = (256, 1024, 4096)
    assert [cpu_choice.nearest_probe(t, probes) for t in (1, 100, 256, 511, 513, 1024, 3000, 100_000)] == [
        256, 256, 256, 256, 1024, 1024, 4096, 4096]


def test_measured_once_cached_and_read_back(private_cache, monkeypatch):
    require_backend("cpu")
    monkeypatch.setattr(cpu_choice, "PROBE_T", (32, 64))
    monkeypatch.setattr(cpu_choice, "REPEATS", 1)
    calls = []
    real = cpu_choice.measure
    monkeypatch.setattr(cpu_choice, "measure", lambda *a, **k: calls.append(a) or real(*a, **k))
    threads = torch.get_num_threads()
    answer = cpu_choice.kernel_faster(_args(40), requires_grad=False)
    assert torch.get_num_threads() == threads  # measured on one thread, the setting restored
    path = cpu_choice.table_path()
    assert path.parent == private_cache and path.is_file()
    table = json.loads(path.read_text())
    assert table["torch"] == torch.__version__ and table["kernel_build"] == cpu_backend.build_key()
    rows = table["entries"]["float32/fwd"]["rows"]
    assert set(rows) == {"32", "64"}
    assert all(r["cpu_s"] > 0 and r["sdpa_s"] > 0 and r["kernel"] == (r["cpu_s"] <= cpu_choice.KERNEL_BIAS * r["sdpa_s"])
               for r in rows.values())
    assert answer == rows["32"]["kernel"]
    assert len(calls) == 1
    cpu_choice.kernel_faster(_args(60), requires_grad=False)  # same (dtype, mode): from memory
    cpu_choice.forget()
    cpu_choice.kernel_faster(_args(60), requires_grad=False)  # from the file
    assert len(calls) == 1
    cpu_choice.kernel_faster(_args(60), requires_grad=True)  # another mode: measured, added to the file
    assert len(calls) == 2
    assert set(json.loads(path.read_text())["entries"]) == {"float32/fwd", "float32/fwdbwd"}


def test_the_key_names_the_cpu_torch_and_kernel(private_cache, monkeypatch):
    base = cpu_choice.table_path()
    monkeypatch.setattr(cpu_backend, "_cpu_fingerprint", lambda: "another cpu")
    assert cpu_choice.table_path() != base
    monkeypatch.undo()
    monkeypatch.setenv("HEADINT_CACHE_DIR", str(private_cache))
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert cpu_choice.table_path() != base
    monkeypatch.undo()
    monkeypatch.setenv("HEADINT_CACHE_DIR", str(private_cache))
    monkeypatch.setattr(cpu_backend, "build_key", lambda src=None: "another kernel")
    assert cpu_choice.table_path() != base


def test_auto_follows_the_measured_table(private_cache, monkeypatch):
    """A table saying SDPA is faster at T ~ 1024 and the kernel at T ~ 256: auto follows it
    per call, and never sends SDPA a call it cannot run."""
    require_backend("cpu")
    path = cpu_choice.table_path()
    path.write_text(json.dumps(_fake_table({256: True, 1024: False})))
    monkeypatch.setattr(cpu_choice, "measure", lambda *a, **k: pytest.fail("the table is in the cache"))
    for T, expected in ((200, "cpu"), (900, "sdpa")):
        a = _args(T)
        assert backends.auto_backend(a.q.device, a) == expected
        out = attention(a.q, a.k, a.v, causal=True)
        assert last_backend() == expected
        torch.testing.assert_close(out, attention(a.q, a.k, a.v, causal=True, backend="reference"), atol=1e-5, rtol=1e-4)
    ko = EdgeKnockout(torch.ones(900, dtype=torch.bool), torch.arange(900) % 2 == 1)
    a = _args(900, knockout=ko)
    assert backends.auto_backend(a.q.device, a) == "cpu"


def test_environment_overrides_the_measurement(private_cache, monkeypatch):
    monkeypatch.setattr(cpu_choice, "measure", lambda *a, **k: pytest.fail("no measurement when overridden"))
    a = _args(64)
    monkeypatch.setenv(cpu_choice.ENV, "kernel")
    assert cpu_choice.kernel_faster(a, False)
    monkeypatch.setenv(cpu_choice.ENV, "sdpa")
    assert not cpu_choice.kernel_faster(a, True)
    monkeypatch.setenv(cpu_choice.ENV, "fastest")
    with pytest.raises(ValueError, match=r"HEADINT_AUTO_CPU='fastest'; expected one of \('measure', 'kernel', 'sdpa'\)"):
        cpu_choice.kernel_faster(a, False)


def test_a_broken_cache_file_is_measured_again(private_cache, monkeypatch):
    require_backend("cpu")
    monkeypatch.setattr(cpu_choice, "PROBE_T", (32,))
    monkeypatch.setattr(cpu_choice, "REPEATS", 1)
    cpu_choice.table_path().write_text("{ not json")
    cpu_choice.kernel_faster(_args(32), requires_grad=False)
    assert "float32/fwd" in json.loads(cpu_choice.table_path().read_text())["entries"]
