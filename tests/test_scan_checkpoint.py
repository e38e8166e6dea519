"""Scan checkpoints (``headint.scans.checkpoint``): resume after a kill (an exception, or a
SIGKILLed subprocess) to the bit-identical result; several scans share a folder without
losing progress; one save writes one chunk; unreadable or foreign files are errors naming
the file and how to start over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import headint
import headint.scans.checkpoint as checkpoint_mod
import headint.scans.exact as exact
from headint.scans.checkpoint import CheckpointError
from scan_oracles import corrupt_of, make_batch, oracle_scan
from test_scan_exact import assert_matches

BACKEND = "reference"
TESTS = Path(__file__).resolve().parent


class Killed(Exception):
    pass


def _counting(monkeypatch, kill_after=None):
    calls = []
    orig = exact._run_chunk

    def wrapper(*args, **kwargs):
        if kill_after is not None and len(calls) >= kill_after:
            raise Killed("simulated kill")
        calls.append(len(args[4]))
        return orig(*args, **kwargs)

    monkeypatch.setattr(exact, "_run_chunk", wrapper)
    return calls


@pytest.mark.parametrize("per_position", [False, True])
def test_checkpoint_resume(gpt2, tmp_path, monkeypatch, per_position):
    batch = make_batch(3, 6, seed=71, pad="left", lengths=[6, 4, 5])
    corrupt = corrupt_of(batch)
    kw = dict(corrupt=corrupt, method="patch", direction="noising", per_position=per_position, batch_size=4,
              progress=False, backend=BACKEND)
    with monkeypatch.context() as mp:
        calls = _counting(mp)
        full = headint.scan(gpt2, batch, "logit_diff", **kw)
    n_chunks = len(calls)
    assert n_chunks >= 6
    ckpt = tmp_path / "scan.ckpt"
    k = n_chunks // 2
    with monkeypatch.context() as mp:
        calls = _counting(mp, kill_after=k)
        with pytest.raises(Killed):
            headint.scan(gpt2, batch, "logit_diff", checkpoint=ckpt, **kw)
        assert len(calls) == k
    assert ckpt.exists()
    with monkeypatch.context() as mp:
        calls = _counting(mp)
        resumed = headint.scan(gpt2, batch, "logit_diff", checkpoint=ckpt, **kw)
    assert len(calls) == n_chunks - k, "the resumed run must execute only the remaining chunks"
    assert torch.equal(resumed.per_example, full.per_example)
    # finished: a third run executes nothing and gives the same result
    with monkeypatch.context() as mp:
        calls = _counting(mp)
        again = headint.scan(gpt2, batch, "logit_diff", checkpoint=ckpt, **kw)
    assert calls == []
    assert torch.equal(again.per_example, full.per_example)


def test_checkpoint_of_another_scan_is_not_reused(gpt2, tmp_path, monkeypatch):
    batch = make_batch(3, 6, seed=72)
    ckpt = tmp_path / "scan.ckpt"
    kw = dict(batch_size=4, progress=False, backend=BACKEND, checkpoint=ckpt)
    headint.scan(gpt2, batch, "logit_diff", method="zero", **kw)
    with monkeypatch.context() as mp:
        calls = _counting(mp)
        other = headint.scan(gpt2, batch, "logit_diff", method="mean", **kw)
    assert len(calls) == 9  # 3 start layers x 12 rows / 4 rows per chunk
    assert_matches(other, oracle_scan(gpt2, batch, "logit_diff", method="mean"))
    # different inputs, same settings: not reused either
    batch2 = make_batch(3, 6, seed=73)
    with monkeypatch.context() as mp:
        calls = _counting(mp)
        r2 = headint.scan(gpt2, batch2, "logit_diff", method="mean", **kw)
    assert len(calls) == 9
    assert_matches(r2, oracle_scan(gpt2, batch2, "logit_diff", method="mean"))
    # no scan discarded another's progress: each reruns nothing
    assert len([p for p in ckpt.iterdir() if (p / "scan.json").exists()]) == 3
    with monkeypatch.context() as mp:
        calls = _counting(mp)
        again = headint.scan(gpt2, batch, "logit_diff", method="zero", **kw)
        assert torch.equal(headint.scan(gpt2, batch, "logit_diff", method="mean", **kw).per_example, other.per_example)
    assert calls == []
    assert_matches(again, oracle_scan(gpt2, batch, "logit_diff", method="zero"))


def _scan_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "scan.json").exists())


def _chunk_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("chunk-*.pt"))


def test_one_save_writes_one_chunk(gpt2, tmp_path, monkeypatch):
    """The bytes of a save do not grow with the number of finished chunks."""
    written = []
    orig = checkpoint_mod.atomic_save

    def counting(obj, path):
        n = orig(obj, path)
        written.append((path.name, n))
        return n

    monkeypatch.setattr(checkpoint_mod, "atomic_save", counting)
    batch = make_batch(3, 6, seed=74)
    ckpt = tmp_path / "ck"
    r = headint.scan(gpt2, batch, "logit_diff", method="zero", per_position=True, batch_size=4, progress=False,
                     backend=BACKEND, checkpoint=ckpt)
    n_rows = 3 * 4 * 6 * 3  # layers x heads x positions x examples
    checked = r.settings["final_block"] == "final block for the last query only"  # the check is one run
    assert checked
    reuse_checked = r.settings["position_reuse"]  # position reuse is checked in one run too
    assert len(written) == r.settings["cost"]["runs"] - 1 - checked - reuse_checked >= 40  # every chunk saved once (runs - the clean pass - the checks)
    names = [name for name, _ in written]
    assert names == [f"chunk-{i:06d}.pt" for i in range(len(written))]
    folder = _scan_folders(ckpt)[0]
    sizes = {name: n for name, n in written}
    assert {p.name: p.stat().st_size for p in _chunk_files(folder)} == sizes
    full = [n for name, n in written]
    # chunks of 4 rows all weigh the same, the first as the last: O(chunk), not O(finished chunks)
    assert n_rows % 4 == 0 and len(set(full)) == 1, sorted(set(full))
    assert sum(full) < 4 * len(written) * 1024  # a few hundred bytes of container per 4 values


def test_resume_after_sigkill_is_bit_identical(gpt2, tmp_path, monkeypatch):
    """A scan SIGKILLed in a subprocess mid-chunk resumes here to exactly the uninterrupted result."""
    ckpt = tmp_path / "ck"
    kill_after = 5
    script = tmp_path / "killed_scan.py"
    script.write_text(f"""
import os, signal, sys
sys.path.insert(0, {str(TESTS)!r})
import torch
torch.set_num_threads(1)
import headint
import headint.scans.runner as runner_mod
from scan_oracles import corrupt_of, make_batch, tiny_gpt2

model = tiny_gpt2()
batch = make_batch(3, 6, seed=75, pad="left", lengths=[6, 4, 5])
orig, calls = runner_mod.VariantRunner.run, [0]

def run(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] > {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, *args, **kwargs)

runner_mod.VariantRunner.run = run
headint.scan(model, batch, "logit_diff", corrupt=corrupt_of(batch), method="patch", per_position=True, batch_size=4,
             progress=False, backend={BACKEND!r}, checkpoint={str(ckpt)!r})
print("not killed")
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), *sys.path]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    folder = _scan_folders(ckpt)[0]
    assert len(_chunk_files(folder)) == kill_after

    batch = make_batch(3, 6, seed=75, pad="left", lengths=[6, 4, 5])
    kw = dict(corrupt=corrupt_of(batch), method="patch", per_position=True, batch_size=4, progress=False, backend=BACKEND)
    with monkeypatch.context() as mp:
        calls = _counting(mp)
        full = headint.scan(gpt2, batch, "logit_diff", **kw)
    with monkeypatch.context() as mp:
        resumed_calls = _counting(mp)
        resumed = headint.scan(gpt2, batch, "logit_diff", checkpoint=ckpt, **kw)
    assert len(resumed_calls) == len(calls) - kill_after
    assert torch.equal(resumed.per_example, full.per_example)
    assert torch.equal(resumed.base_per_example, full.base_per_example)


def test_resume_keeps_the_chunking_it_started_with(gpt2, tmp_path, monkeypatch):
    """The chunk size is not part of a scan's identity: a resumed run with another (or an
    automatic) batch size finishes the same chunks and gives the same bits."""
    batch = make_batch(3, 6, seed=76)
    ckpt = tmp_path / "ck"
    kw = dict(method="resample", progress=False, backend=BACKEND)
    full = headint.scan(gpt2, batch, "logit_diff", batch_size=4, **kw)
    with monkeypatch.context() as mp:
        _counting(mp, kill_after=4)
        with pytest.raises(Killed):
            headint.scan(gpt2, batch, "logit_diff", batch_size=4, checkpoint=ckpt, **kw)
    for bs in (7, "auto"):
        with monkeypatch.context() as mp:
            calls = _counting(mp)
            resumed = headint.scan(gpt2, batch, "logit_diff", batch_size=bs, checkpoint=ckpt, **kw)
        assert resumed.settings["batch_rows"] == 4
        assert torch.equal(resumed.per_example, full.per_example)
    assert len(_scan_folders(ckpt)) == 1


def test_resume_keeps_the_position_grouping_it_started_with(gpt2, tmp_path, monkeypatch):
    """group_positions="auto" follows the chunk size, so a per-position scan resumed with another
    batch size groups positions as the interrupted run did: it finds its finished chunks, runs
    only the rest and gives the same bits."""
    batch = make_batch(3, 6, seed=77)
    ckpt = tmp_path / "ck"
    kw = dict(method="zero", per_position=True, heads=[0, 1], progress=False, backend=BACKEND)
    full = headint.scan(gpt2, batch, "logit_diff", batch_size=36, **kw)
    assert full.settings["group_positions"] > 1
    with monkeypatch.context() as mp:
        calls = _counting(mp)
        headint.scan(gpt2, batch, "logit_diff", batch_size=36, **kw)
    n_chunks = len(calls)
    with monkeypatch.context() as mp:
        _counting(mp, kill_after=2)
        with pytest.raises(Killed):
            headint.scan(gpt2, batch, "logit_diff", batch_size=36, checkpoint=ckpt, **kw)
    for bs in (6, "auto"):  # alone, these would group 1 and every position
        with monkeypatch.context() as mp:
            calls = _counting(mp)
            resumed = headint.scan(gpt2, batch, "logit_diff", batch_size=bs, checkpoint=ckpt, **kw)
        assert resumed.settings["batch_rows"] == 36
        assert resumed.settings["group_positions"] == full.settings["group_positions"]
        torch.testing.assert_close(resumed.per_example, full.per_example, rtol=0, atol=0, equal_nan=True)  # unscanned heads: NaN
    assert len(calls) == 0 and n_chunks > 2
    assert len(_scan_folders(ckpt)) == 1


def test_stale_temporary_file_is_ignored(gpt2, tmp_path, monkeypatch):
    """A kill between writing a chunk's temporary file and renaming it leaves a .tmp file: not a chunk."""
    batch = make_batch(3, 6, seed=77)
    ckpt = tmp_path / "ck"
    kw = dict(method="zero", batch_size=4, progress=False, backend=BACKEND, checkpoint=ckpt)
    with monkeypatch.context() as mp:
        _counting(mp, kill_after=2)
        with pytest.raises(Killed):
            headint.scan(gpt2, batch, "logit_diff", **kw)
    folder = _scan_folders(ckpt)[0]
    (folder / "chunk-000002.pt.tmp-12345").write_bytes(b"half a chunk")
    with monkeypatch.context() as mp:
        calls = _counting(mp)
        r = headint.scan(gpt2, batch, "logit_diff", **kw)
    assert len(calls) == 9 - 2
    assert_matches(r, oracle_scan(gpt2, batch, "logit_diff", method="zero"))


def _started(gpt2, tmp_path, monkeypatch, kill_after=3):
    """A zero scan killed after ``kill_after`` chunks; returns (checkpoint root, scan folder, scan kwargs)."""
    batch = make_batch(3, 6, seed=78)
    ckpt = tmp_path / "ck"
    kw = dict(method="zero", batch_size=4, progress=False, backend=BACKEND, checkpoint=ckpt)
    with monkeypatch.context() as mp:
        _counting(mp, kill_after=kill_after)
        with pytest.raises(Killed):
            headint.scan(gpt2, batch, "logit_diff", **kw)
    return batch, _scan_folders(ckpt)[0], kw


def test_truncated_chunk_is_an_error_naming_it(gpt2, tmp_path, monkeypatch):
    batch, folder, kw = _started(gpt2, tmp_path, monkeypatch)
    f = folder / "chunk-000001.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"checkpoint file {f} is unreadable .*delete {f} to recompute that chunk, or "
                                              rf"delete the folder {folder} to start this scan over"):
        headint.scan(gpt2, batch, "logit_diff", **kw)
    f.unlink()  # the advice works: the chunk is recomputed
    r = headint.scan(gpt2, batch, "logit_diff", **kw)
    assert_matches(r, oracle_scan(gpt2, batch, "logit_diff", method="zero"))


@pytest.mark.parametrize("content", ["garbage", "foreign_pickle", "empty", "other_scan", "wrong_index", "wrong_rows"])
def test_foreign_chunk_is_an_error_naming_it(gpt2, tmp_path, monkeypatch, content):
    batch, folder, kw = _started(gpt2, tmp_path, monkeypatch)
    f = folder / "chunk-000000.pt"
    good = torch.load(f, weights_only=True)
    if content == "garbage":
        f.write_bytes(b"\x00not a torch file" * 10)
    elif content == "foreign_pickle":
        torch.save([1, 2, 3], f)
    elif content == "empty":
        f.write_bytes(b"")
    elif content == "other_scan":
        torch.save({**good, "fingerprint": "0" * 64}, f)
    elif content == "wrong_index":
        f = folder / "chunk-000042.pt"
        torch.save({**good, "index": 42}, f)
    else:
        torch.save({**good, "values": torch.zeros(3)}, f)
    with pytest.raises(CheckpointError, match=rf"checkpoint file {f} .*delete {f} to recompute that chunk"):
        headint.scan(gpt2, batch, "logit_diff", **kw)


def test_unusable_checkpoint_paths_are_errors(gpt2, tmp_path, monkeypatch):
    batch, folder, kw = _started(gpt2, tmp_path, monkeypatch)
    meta = folder / "scan.json"
    data = json.loads(meta.read_text())
    meta.write_text("{ not json")
    with pytest.raises(CheckpointError, match=rf"checkpoint file {meta} is unreadable.*delete the folder {folder}"):
        headint.scan(gpt2, batch, "logit_diff", **kw)
    meta.write_text(json.dumps({**data, "fingerprint": "f" * 64}))
    with pytest.raises(CheckpointError, match=rf"{meta} belongs to another scan.*delete the folder {folder}"):
        headint.scan(gpt2, batch, "logit_diff", **kw)
    meta.write_text(json.dumps({"something": "else"}))
    with pytest.raises(CheckpointError, match=rf"{meta} is not a headint-scan-checkpoint/1 file"):
        headint.scan(gpt2, batch, "logit_diff", **kw)
    # a file where the folder should be (e.g. a checkpoint of the old single-file format)
    old = tmp_path / "scan.ckpt"
    torch.save({"key": "x", "done": {}}, old)
    with pytest.raises(CheckpointError, match=rf"checkpoint {old} is a file, not a headint checkpoint folder.*start over"):
        headint.scan(gpt2, batch, "logit_diff", **{**kw, "checkpoint": old})
    assert isinstance(CheckpointError("x"), RuntimeError)


def test_different_backend_is_another_scan(gpt2, tmp_path):
    """Backends round differently, so their chunks are never mixed."""
    batch = make_batch(3, 6, seed=79)
    ckpt = tmp_path / "ck"
    headint.scan(gpt2, batch, "logit_diff", method="zero", progress=False, backend="reference", checkpoint=ckpt)
    headint.scan(gpt2, batch, "logit_diff", method="zero", progress=False, backend="auto", checkpoint=ckpt)
    assert len(_scan_folders(ckpt)) == 2
