"""``bench/bench_triton_gpu.py --tiny``: the benchmark's correctness checks at tiny shapes (CPU interpreter)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_triton_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_triton_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_tiny_mode_runs_and_passes(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "bench.json"
    rc = bench.main(["--tiny", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out.read_text())
    assert res["checks"] and all(c["ok"] for c in res["checks"])
    assert {c["variant"] for c in res["checks"]} == {"none", "hm+patch", "knockout"}
    assert res["timings"] == []  # no GPU timing in tiny mode
    assert "FAILED" not in printed


def test_flop_count():
    bench = _load()
    assert bench._flops(1, 1, 8, 8, 4, False, "fwd") == 4 * 8 * 8 * 4
    assert bench._flops(1, 1, 8, 8, 4, True, "fwd+bwd") == 4 * 8 * 8 * 4 * 0.5 * 3.5
