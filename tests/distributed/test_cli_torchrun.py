"""``torchrun --nproc-per-node 2 -m headint scan ...``: one set of outputs (rank 0 writes, rank 1
waits), equal to the single-process command's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd

from headint.cli import main
from launch import free_port
from scan_oracles import corrupt_of, make_batch, tiny_gpt2
from test_cli import _write_jsonl


def test_torchrun_scan_writes_one_set_of_outputs(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "model")
    clean = make_batch(3, 6, seed=5, pad="left", lengths=[6, 4, 5])
    _write_jsonl(tmp_path / "prompts.jsonl", clean)
    _write_jsonl(tmp_path / "corrupt.jsonl", corrupt_of(clean, seed=6), with_answers=False)
    args = ["scan", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.jsonl"), "--corrupt", str(tmp_path / "corrupt.jsonl"),
            "--method", "patch", "--per-position", "--batch-size", "5", "--backend", "reference", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "single")]) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "headint", *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1, done.stdout  # rank 0 only
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())

    single, two = pd.read_csv(tmp_path / "single" / "scan.csv"), pd.read_csv(tmp_path / "two" / "scan.csv")
    pd.testing.assert_frame_equal(single, two, check_exact=True)
    settings = json.loads((tmp_path / "two" / "settings.json").read_text())
    assert settings["distributed"]["world_size"] == 2
