"""One backend table (issue #10): every question about backends is answered by ``TABLE``."""

from __future__ import annotations

import pytest
import torch

from headint.cli import build_parser
from headint.ops import BackendUnavailable, EdgeKnockout, attention, available_backends, backends, last_backend
from headint.ops.arguments import AttentionArgs, prepare

from _ops_helpers import require_backend


def _qkv(dtype=torch.float32, Tq=6, Tk=6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 2, Tq, 16, generator=g).to(dtype), torch.randn(1, 2, Tk, 16, generator=g).to(dtype),
            torch.randn(1, 2, Tk, 16, generator=g).to(dtype))


def test_backend_names():
    assert backends.backend_names() == ("auto", "reference", "sdpa", "triton", "cpu")
    assert tuple(b.name for b in backends.TABLE) == backends.backend_names()[1:]


def test_every_entry_runs_one_way():
    for b in backends.TABLE:
        assert (b.run is None) != (b.load is None), f"{b.name}: exactly one of run / load"
        assert b.operands is None or b.operands <= set(AttentionArgs.optional_names()), b.name


def _cli_choices(command: str) -> tuple:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    action = next(a for a in sub.choices[command]._actions if a.dest == "backend")
    return tuple(action.choices)


@pytest.mark.parametrize("command", ["scan", "demo"])
def test_cli_backend_choices_come_from_the_table(command):
    assert _cli_choices(command) == backends.backend_names()


def test_available_backends_on_cpu():
    names = available_backends("cpu")
    assert names[:2] == ["reference", "sdpa"]
    assert set(names) <= set(backends.backend_names()[1:])
    assert ("cpu" in names) == (backends.unavailable_reason("cpu", torch.device("cpu")) is None)
    assert "triton" in names  # the op tests run with TRITON_INTERPRET=1 (see conftest.py)...
    assert "triton" not in available_backends("meta")  # ... but no backend but the references runs meta tensors


def test_unknown_backend():
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'flash'.*'reference', 'sdpa', 'triton', 'cpu'"):
        attention(q, k, v, backend="flash")
    assert "unknown backend" in backends.unavailable_reason("flash", torch.device("cpu"))


def test_unsupported_operands_and_dtypes_name_what_they_got():
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailable, match=r"'sdpa' does not support score_scale"):
        attention(q, k, v, score_scale=torch.ones(2), backend="sdpa")
    with pytest.raises(BackendUnavailable, match=r"'sdpa' does not support compact knockouts"):
        attention(q, k, v, knockout=EdgeKnockout(torch.ones(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool)), backend="sdpa")
    with pytest.raises(BackendUnavailable, match=r"'sdpa' runs bool masks only"):
        attention(q, k, v, attn_mask=torch.zeros(6, 6), backend="sdpa")
    require_backend("triton")
    # a dtype it does not take is also a TypeError, a shape beyond its kernels a ValueError
    with pytest.raises(BackendUnavailable, match=r"'triton' takes float16/bfloat16/float32 inputs, got q of dtype torch.float64") as e:
        attention(q.double(), k.double(), v.double(), backend="triton")
    assert isinstance(e.value, TypeError)
    big = torch.zeros(1, 1, 2, 288)
    with pytest.raises(BackendUnavailable, match=r"'triton' supports head dims up to 256, got q of shape \[1, 1, 2, 288\]") as e:
        attention(big, big, big, backend="triton")
    assert isinstance(e.value, ValueError)


def test_cpu_backend_refuses_other_devices():
    q, k, v = (x.to("meta") for x in _qkv())
    with pytest.raises(BackendUnavailable, match=r"'cpu' runs cpu tensors, got meta tensors"):
        attention(q, k, v, backend="cpu")


@pytest.mark.parametrize(
    "case, mode, expected",
    [
        ("fp32", "kernel", "cpu"),
        ("fp32", "sdpa", "sdpa"),  # where this machine measured SDPA faster
        ("fp32_knockout", "sdpa", "cpu"),  # SDPA cannot run it: the kernel, whatever was measured
        ("fp64", "kernel", "sdpa"),
        ("fp64_score_scale", "kernel", "reference"),
        ("long_decode", "kernel", "cpu"),
        ("long_decode_knockout", "kernel", "cpu"),
        ("kernel_off", "kernel", "sdpa"),
    ],
)
def test_auto_reads_the_table(case, mode, expected, monkeypatch):
    """CPU: the native kernel for fp32/fp16/bf16 calls SDPA cannot run; for the others whichever
    of the kernel and SDPA this machine measured faster (``HEADINT_AUTO_CPU`` stands in for the
    measurement here); never fp64 or with HEADINT_CPU_KERNEL=0; then SDPA if it takes the call;
    then the reference."""
    if expected == "cpu" or case == "fp32":
        require_backend("cpu")
    monkeypatch.setenv("HEADINT_AUTO_CPU", mode)
    kw: dict = {}
    q, k, v = _qkv()
    if case.startswith("fp64"):
        q, k, v = q.double(), k.double(), v.double()
        if case == "fp64_score_scale":
            kw["score_scale"] = torch.ones(2)
    elif case.startswith("long_decode"):
        q, k, v = _qkv(Tq=1, Tk=2048)
    elif case == "kernel_off":
        monkeypatch.setenv("HEADINT_CPU_KERNEL", "0")
    if case.endswith("knockout"):
        kw["knockout"] = EdgeKnockout(torch.ones(q.shape[2], dtype=torch.bool), torch.arange(k.shape[2]) % 3 == 1)
    out = attention(q, k, v, causal=True, backend="auto", **kw)
    assert last_backend() == expected
    torch.testing.assert_close(out, attention(q, k, v, causal=True, backend="reference", **kw), atol=1e-5, rtol=1e-4)
    a = prepare(q, k, v, causal=True, **kw)
    assert backends.auto_backend(q.device, a, requires_grad=False) == expected


def test_no_silent_fallback_when_a_kernel_cannot_load(monkeypatch):
    """A backend whose loader fails says why when asked for, and auto skips it (logging why)."""
    failing = backends.Backend(name="cpu", devices=("cpu",), dtypes=(torch.float32,), load=_raise_unavailable,
                               auto_devices=("cpu",), auto_rank=1)
    table = tuple(failing if b.name == "cpu" else b for b in backends.TABLE)
    monkeypatch.setattr(backends, "TABLE", table)
    monkeypatch.setattr(backends, "_BY_NAME", {b.name: b for b in table})
    monkeypatch.setattr(backends, "_LOADED", {})
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailable, match="no compiler in this test"):
        attention(q, k, v, backend="cpu")
    attention(q, k, v, backend="auto")
    assert last_backend() == "sdpa"
    assert "cpu" not in available_backends("cpu")


def _raise_unavailable():
    raise BackendUnavailable("backend 'cpu': no compiler in this test")
