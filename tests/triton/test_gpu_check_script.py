"""``scripts/gpu_check.py`` (and its wrapper ``scripts/gpu_check.sh``) on CPU: argument handling,
the refusal without a GPU, and the JSON a dry run writes (the same code paths as on a GPU, under
the Triton interpreter at tiny sizes; every correctness case runs in the slow lane)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
WRAPPER = ROOT / "scripts" / "gpu_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_json(res: dict, cases: list[str], lengths: list[int]) -> None:
    gc = _load()
    assert res["dry_run"] is True and res["ok"] is True
    assert set(res) >= {"environment", "args", "correctness", "kernels", "scan", "targets", "skipped", "elapsed_s"}
    assert res["environment"]["torch"] and res["environment"]["triton"] and res["environment"]["gpu"] is None
    names = [r["name"] for r in res["correctness"]]
    assert names[: len(cases)] == cases  # the operand cases, then one autotuned check per kernel variant
    assert [n.split(" T=")[0] for n in names[len(cases):]] == [f"autotuned {v}" for v in gc.VARIANTS]
    for r in res["correctness"]:
        assert r["ok"] is True, r
        assert {"out", "dq", "dk", "dv"} <= set(r["errors"])
        assert all(e["err"] <= e["tol"] for e in r["errors"].values())
    by_name = {r["name"]: r for r in res["correctness"]}
    if "everything_fp16" in by_name:  # every differentiable operand has its gradient checked
        assert {"dhead_mask", "dhead_patch", "dscore_scale", "dsinks"} <= set(by_name["everything_fp16"]["errors"])
        assert by_name["everything_fp16"]["dtype"] == "float16" and by_name["everything_fp16"]["shape"]["Dv"] == 32
    assert [(r["T"], r["mode"]) for r in res["kernels"]] == [(t, m) for t in lengths for m in ("fwd", "fwd+bwd")]
    for r in res["kernels"]:
        assert set(r["ms"]) == {f"triton {v}" for v in gc.VARIANTS} | {"sdpa flash"}
        assert all(x > 0 for x in r["ms"].values()) and set(r["tflops"]) == set(r["ms"])
        assert set(r["speed_vs_plain"]) == set(gc.VARIANTS[1:]) and set(r["speed_vs_sdpa_flash"]) == set(gc.VARIANTS)
    scan = res["scan"]
    assert scan["values_agree"] and scan["max_abs_diff"] <= 1e-3 and scan["backend_ran"] == "triton"
    assert scan["speedup"] > 0 and len(scan["seconds"]["hook loop"]) == res["args"]["scan_repeats"]
    t = res["targets"]
    assert set(t) == set(gc.TARGETS)
    assert t["intervened_fwd_vs_plain"]["values"] and isinstance(t["scan_vs_hook_loop"]["met"], bool)


def test_dry_run_writes_the_json(tmp_path, capsys):
    gc = _load()
    out = tmp_path / "gpu.json"
    cases = ["none", "everything_fp16", "everything_fp32"]
    rc = gc.main(["--dry-run", "--out", str(out), "--cases", *cases, "--lengths", "16", "--scan-repeats", "1"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    _check_json(json.loads(out.read_text()), cases, [16])
    assert "gpu_check: ok" in printed and "FAILED" not in printed


@pytest.mark.slow
def test_dry_run_every_case_through_the_wrapper(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run(["bash", str(WRAPPER), str(out), "--dry-run", "--lengths", "16", "32"], capture_output=True,
                       text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    gc = _load()
    _check_json(json.loads(out.read_text()), list(gc.OPERAND_CASES), [16, 32])


def test_a_spent_budget_skips_and_says_so(tmp_path):
    gc = _load()
    out = tmp_path / "gpu.json"
    rc = gc.main(["--dry-run", "--out", str(out), "--budget-s", "0", "--cases", "none", "--lengths", "16"])
    res = json.loads(out.read_text())
    assert rc == 1  # nothing was checked: not ok
    assert res["skipped"] == ["correctness none", "kernels T=16 fwd", "kernels T=16 fwd+bwd", "scan"]
    assert res["correctness"] == [{"name": "none", "ok": None, "skipped": "time budget"}]
    assert not any(v["met"] for v in res["targets"].values())


def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    p = subprocess.run(["bash", str(WRAPPER), str(tmp_path / "x.json")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert p.returncode == 2
    assert "no CUDA device" in p.stderr and "--dry-run" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "0"], "lengths must be positive"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--cases", "nothing"], "invalid choice: 'nothing'"),
    (["--sections", "everything"], "invalid choice: 'everything'"),
])
def test_bad_arguments_exit_2_with_one_message(argv, message, capsys):
    gc = _load()
    with pytest.raises(SystemExit) as e:
        gc.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_flop_count_and_defaults():
    gc = _load()
    assert gc.flops(1, 1, 8, 4, "fwd") == 2 * 8 * 8 * 4  # causal: half of 4 B H T^2 D
    assert gc.flops(1, 1, 8, 4, "fwd+bwd") == 3.5 * 2 * 8 * 8 * 4
    a = gc.parse_args([])
    assert a.lengths == [1024, 2048, 4096, 8192, 16384] and (a.batch, a.heads, a.head_dim) == (2, 16, 128)
    assert a.budget_s == 420 and a.scan_config == "gpt2-small" and a.cases == list(gc.OPERAND_CASES)
