"""The kernels compile to real GPU code (sm_90 and sm_80) on this CPU-only machine, including the
soft-capping / sink variants and value head dims != the query/key one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the full pipeline
down to a cubin with the ptxas shipped in the triton wheel; no GPU is needed. It catches
constructs the interpreter accepts but the compiler rejects, and gives the real shared memory of
each variant, which must fit the SM (<= 227 KB on sm_90, <= 163 KB on sm_80) for every config the
autotuner may pick.

This test session runs with ``TRITON_INTERPRET=1`` (see conftest), under which ``triton.jit``
builds interpreted functions that cannot be compiled. The compilation therefore runs in a
subprocess whose environment does not have the variable: :mod:`headint_kernels.compile_check`.
Run with ``-s`` to see the shared-memory table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from headint_kernels import compile_check, config


def _run_check(tmp_path, *extra: str, timeout: int = 900) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "headint_kernels.compile_check", "--arch", "90", "--arch", "80", "--json", str(out),
         *extra],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    print("\n" + proc.stdout)
    assert out.exists(), f"compile check did not finish (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    rows = json.loads(out.read_text())
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} {r['dtype']} D={r['head_dim']} {r['label']} sm_{r['arch']}: "
                                 f"{r['error']}" for r in failed)
    return rows


def _check_fits(rows: list[dict]) -> None:
    over = [r for r in rows if r["shared"] > config.smem_limit(r["arch"])]
    assert not over, "shared memory over the SM limit:\n" + compile_check.format_table(over)
    spills = [r for r in rows if r.get("local")]
    if spills:
        print("register spills (local memory):\n" + compile_check.format_table(spills))


@pytest.fixture(scope="module")
def representative_rows(tmp_path_factory) -> list[dict]:
    """The default compile check's rows (compiled once for the tests of this module)."""
    return _run_check(tmp_path_factory.mktemp("compile"))


def test_compile_representative_variants(representative_rows):
    """Forward / dQ / dK-dV / preprocess, fp16 / bf16 / fp32, head dims 32..256, with and without
    interventions, each with its largest-shared-memory autotune config, for sm_90 and sm_80."""
    rows = representative_rows
    assert {r["kernel"] for r in rows} == {"fwd", "dq", "dkdv", "pre"}
    assert {r["arch"] for r in rows} == {80, 90}
    assert {r["dtype"] for r in rows} == {"fp16", "bf16", "fp32"}
    _check_fits(rows)


def test_compile_softcap_sinks_and_value_head_dims(representative_rows):
    """The soft-capping / sink variants and value head dims != the query/key one (DeepSeek-V3's
    192 / 128, a tiny 24 / 12, 64 / 256) compile for sm_90 and sm_80, forward and backward, and fit."""
    rows = [r for r in representative_rows if r["flags"].get("HAS_SOFTCAP") or r["head_dim_v"]]
    for kind in ("fwd", "dq", "dkdv"):
        for arch in (80, 90):
            mine = [r for r in rows if r["kernel"] == kind and r["arch"] == arch]
            assert any(r["flags"].get("HAS_SOFTCAP") for r in mine), (kind, arch)
            assert {(r["head_dim"], r["head_dim_v"]) for r in mine if r["head_dim_v"]} == {(192, 128), (24, 12), (64, 256)}
    assert any(r["flags"].get("HAS_SINKS") and r["kernel"] == "fwd" for r in rows)
    _check_fits(rows)


@pytest.mark.slow
def test_compile_every_autotune_config(tmp_path):
    """Every kept autotune config of every kernel at every supported head dim (16..256)."""
    rows = _run_check(tmp_path, "--full", "--workers", str(max(1, min(4, os.cpu_count() or 1))), timeout=3600)
    assert {r["head_dim"] for r in rows} == {16, 32, 64, 80, 96, 128, 256, 192, 24}
    assert {(r["head_dim"], r["head_dim_v"]) for r in rows if r["head_dim_v"]} == {(192, 128), (64, 256), (24, 12)}
    _check_fits(rows)


def test_interpreted_kernels_refuse_to_compile():
    """In this (interpreted) process the kernels are not JITFunctions: a clear error, not a crash."""
    assert config.INTERPRET
    v = compile_check.Variant("fwd", "bf16", 64, {}, (64, 64, 4, 2))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_check.build_source(v)


def test_autotune_lists_have_several_gpu_configs_and_one_interpreted():
    for kind in ("fwd", "dq", "dkdv"):
        assert len(config.tile_list(kind, interpret=False)) > 1
        assert len(config.tile_list(kind, interpret=True)) == 1
        assert len(config.configs(kind)) == 1  # this session interprets
        for d in (16, 32, 64, 80, 96, 128, 256):
            for arch in (80, 86, 90):
                for elem in (2, 4):
                    assert config.usable_tiles(kind, d, interpret=False, arch=arch, elem=elem)
