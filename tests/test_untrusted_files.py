"""Files headint reads that a user (or a crash) may have made wrong, and files it writes on a disk
that fills: every case is an error naming the file, never a hang, a raw ``RecursionError`` /
``TypeError`` / ``range() arg 3 must not be zero``, and never a lost result (issue 20 items 6
and 9; issue 21 item 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from headint.activations import ActivationCache
from headint.results import ScanResult
from headint.scans.checkpoint import CheckpointError, ScanCheckpoint, chunk_name

REPO = Path(__file__).resolve().parents[1]
NESTED = "[" * 100000 + "]" * 100000
WRONG_JSON = [None, True, 0, -1, 2.5, "text", [], [[1]], {}, {"a": {"b": [1]}}]


def _no_hang(fn, fifos, timeout=60):
    """``fn()`` in a thread; if it is still running after ``timeout`` s (blocked opening a FIFO),
    open the FIFOs' write ends so it returns, and fail."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for f in fifos:
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(10)
        pytest.fail(f"blocked on a FIFO for {timeout} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


@pytest.fixture
def saved(tmp_path):
    r = ScanResult(torch.randn(2, 3, 5), metric_name="logit_diff", clean_baseline=1.0, corrupt_baseline=0.0,
                   settings={"kind": "exact", "method": "patch", "direction": "noising"}, base_per_example=torch.randn(5))
    stem = r.save(tmp_path / "r")
    return r, stem


# ------------------------------------------------------------------------ ScanResult files


def test_result_tensor_file_that_is_a_fifo(saved):
    _, stem = saved
    tensors = Path(f"{stem}.safetensors")
    tensors.unlink()
    os.mkfifo(tensors)
    with pytest.raises(ValueError, match=r"ScanResult tensor file .*r\.safetensors is a FIFO"):
        _no_hang(lambda: ScanResult.load(stem), [tensors])


def test_result_sidecar_that_is_a_fifo_or_device(saved, tmp_path):
    _, stem = saved
    sidecar = Path(f"{stem}.json")
    sidecar.unlink()
    os.mkfifo(sidecar)
    with pytest.raises(ValueError, match=r"ScanResult sidecar .*r\.json is a FIFO"):
        _no_hang(lambda: ScanResult.load(stem), [sidecar])
    (tmp_path / "z.safetensors").write_bytes(b"")
    os.symlink("/dev/zero", tmp_path / "z.json")
    with pytest.raises(ValueError, match=r"z\.json is a character device"):
        ScanResult.load(tmp_path / "z")


def test_result_tensor_file_larger_than_its_shapes_allow(saved):
    _, stem = saved
    with open(f"{stem}.safetensors", "r+b") as f:
        f.truncate(64 * 2**20)  # sparse: never read
    with pytest.raises(ValueError, match=r"r\.safetensors is 67108864 bytes, over the"):
        ScanResult.load(stem)


def test_result_sidecar_nested_too_deeply(saved):
    _, stem = saved
    Path(f"{stem}.json").write_text(NESTED)
    with pytest.raises(ValueError, match=r"r\.json is not a saved ScanResult: it is JSON nested too deeply"):
        ScanResult.load(stem)
    meta = json.loads(json.dumps({"format": "headint.ScanResult", "version": 2, "settings": {"x": 1}}))
    text = json.dumps(meta).replace('{"x": 1}', "[" * 50000 + "]" * 50000)
    Path(f"{stem}.json").write_text(text)
    with pytest.raises(ValueError, match=r"r\.json"):
        ScanResult.load(stem)


@pytest.mark.parametrize("field", ["format", "version", "axes", "labels", "metric_name", "clean_baseline", "corrupt_baseline",
                                   "settings", "normalized", "grid_shape", "n_examples", "tensor_sha256", "non_finite"])
def test_result_sidecar_fields_of_wrong_json_types(saved, field):
    """Each field replaced by values of every JSON type: a ValueError naming the sidecar (the hash
    still matching, so the field itself is what is judged), never another exception."""
    r, stem = saved
    sidecar = Path(f"{stem}.json")
    meta = json.loads(sidecar.read_text())
    number = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
    valid = {"metric_name": lambda v: isinstance(v, str), "clean_baseline": number, "corrupt_baseline": number,
             "settings": lambda v: v is None or isinstance(v, dict), "normalized": lambda v: isinstance(v, bool),
             "labels": lambda v: v is None, "non_finite": lambda v: v == []}
    for value in WRONG_JSON:
        if value == meta[field] or valid.get(field, lambda v: False)(value):
            continue  # one of the field's valid values
        sidecar.write_text(json.dumps({**meta, field: value}))
        try:
            ScanResult.load(stem)
        except ValueError as e:
            assert "r.json" in str(e) or "r.safetensors" in str(e), (field, value, e)
        else:
            pytest.fail(f"{field}={value!r} was accepted")
    for value in ({"method": "patch", "direction": "sideways"}, {"method": 3}, {"normalization": [1, 2]}, {"warnings": [1]}):
        sidecar.write_text(json.dumps({**meta, "settings": value}))
        with pytest.raises(ValueError, match=r"r\.json: settings\["):
            ScanResult.load(stem)


# ------------------------------------------------------------------------ issue 21 item 4: saving over a result


_SAVE_ON_FULL_DISK = r"""
import errno, os, resource, signal, sys, torch
from pathlib import Path
from headint.results import ScanResult
folder = Path(sys.argv[1])
old = ScanResult(torch.arange(24.).view(2, 3, 4), clean_baseline=1.0, settings={"method": "zero"})
old.save(folder / "r")
new = ScanResult(torch.randn(2, 3, 4000), clean_baseline=2.0, settings={"method": "zero", "note": "x" * 400000})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG, as on a full disk
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (200000, hard))   # the tensor file (~96 kB) fits, the sidecar (~400 kB) not
try:
    new.save(folder / "r")
except OSError as e:
    print("ERROR", e.errno, e.filename)
else:
    print("SAVED")
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
back = ScanResult.load(folder / "r")
print("OLD" if torch.equal(back.per_example, old.per_example) else "NOT OLD")
print("FILES", sorted(p.name for p in folder.iterdir()))
"""


def test_a_failed_save_leaves_the_previous_result_loadable(tmp_path):
    """The disk fills between the tensor file and the sidecar (a file-size limit makes the
    sidecar's write fail for real): the error names the file, the result saved there before
    still loads, and no temporary file is left."""
    proc = subprocess.run([sys.executable, "-c", _SAVE_ON_FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"ERROR 27 {tmp_path / 'r.json'}", lines  # EFBIG, naming the sidecar
    assert lines[1] == "OLD"
    assert lines[2] == "FILES ['r.json', 'r.safetensors']"


def test_save_rolls_back_when_a_rename_fails(tmp_path, monkeypatch):
    """If the second file cannot be put in place, the first is put back as it was."""
    import headint.files as files

    old = ScanResult(torch.zeros(2, 3, 4), clean_baseline=1.0)
    old.save(tmp_path / "r")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json") and str(src).endswith(".tmp"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="No space left on device") as info:
        ScanResult(torch.ones(2, 3, 4), clean_baseline=1.0).save(tmp_path / "r")
    assert info.value.filename == str(tmp_path / "r.json")
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert torch.equal(ScanResult.load(tmp_path / "r").per_example, old.per_example)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.safetensors"]


# ------------------------------------------------------------------------ checkpoints


_CHUNK_ON_FULL_DISK = r"""
import resource, signal, sys, torch
from pathlib import Path
from headint.scans.checkpoint import CheckpointError, ScanCheckpoint
root = Path(sys.argv[1])
ck = ScanCheckpoint(root, "f" * 64, rows_per_batch=20000, settings={})
ck.save(0, torch.zeros(10))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
try:
    ck.save(1, torch.zeros(20000))
except CheckpointError as e:
    print("ERROR", e)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
print("FILES", sorted(p.name for p in (root / ("f" * 16)).iterdir()))
"""


def test_full_disk_during_a_checkpoint_write(tmp_path):
    """Was ``RuntimeError: basic_ios::clear: iostream error`` and a temporary file left behind."""
    proc = subprocess.run([sys.executable, "-c", _CHUNK_ON_FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"ERROR cannot write checkpoint file {tmp_path / ('f' * 16) / chunk_name(1)}: File too large"), lines
    assert lines[1] == f"FILES ['{chunk_name(0)}', 'scan.json']", lines  # no temporary file


def _checkpoint(tmp_path) -> tuple[Path, Path]:
    ck = ScanCheckpoint(tmp_path, "a" * 64, rows_per_batch=4, settings={"method": "zero"})
    ck.save(0, torch.arange(4.0))
    return ck.folder / "scan.json", ck.folder / chunk_name(0)


def _resume(tmp_path):
    return ScanCheckpoint(tmp_path, "a" * 64, rows_per_batch=4)


def test_checkpoint_chunk_that_is_a_fifo(tmp_path):
    _, chunk = _checkpoint(tmp_path)
    chunk.unlink()
    os.mkfifo(chunk)
    with pytest.raises(CheckpointError, match=rf"checkpoint file {chunk} is unreadable .*FIFO"):
        _no_hang(lambda: _resume(tmp_path), [chunk])


def test_checkpoint_chunk_larger_than_a_chunk_can_be(tmp_path):
    _, chunk = _checkpoint(tmp_path)
    with open(chunk, "r+b") as f:
        f.truncate(8 * 2**20)
    with pytest.raises(CheckpointError, match=rf"checkpoint file {chunk} is unreadable .*8388608 bytes, over"):
        _resume(tmp_path)


def test_checkpoint_metadata_that_is_a_fifo_or_nested(tmp_path):
    meta, _ = _checkpoint(tmp_path)
    meta.write_text(NESTED)
    with pytest.raises(CheckpointError, match=rf"checkpoint file {meta} is unreadable .*nested too deeply"):
        _resume(tmp_path)
    meta.unlink()
    os.mkfifo(meta)
    with pytest.raises(CheckpointError, match=rf"checkpoint file {meta} is unreadable .*FIFO"):
        _no_hang(lambda: _resume(tmp_path), [meta])


def test_checkpoint_metadata_of_wrong_json_types(tmp_path):
    meta, _ = _checkpoint(tmp_path)
    good = json.loads(meta.read_text())
    for field in ("format", "rows_per_batch", "fingerprint"):
        for value in WRONG_JSON:
            if value == good[field]:
                continue
            meta.write_text(json.dumps({**good, field: value}))
            with pytest.raises(CheckpointError, match=rf"checkpoint file {meta}"):
                _resume(tmp_path)
    for whole in WRONG_JSON:
        meta.write_text(json.dumps(whole))
        with pytest.raises(CheckpointError, match=rf"checkpoint file {meta} is not a headint-scan-checkpoint/1 file"):
            _resume(tmp_path)


def test_rows_per_batch_zero_is_named(tmp_path):
    """Was ``range() arg 3 must not be zero`` from deep inside the scan."""
    meta, _ = _checkpoint(tmp_path)
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "rows_per_batch": 0}))
    with pytest.raises(CheckpointError, match=rf"checkpoint file {meta}: 'rows_per_batch' must be a positive int, got 0"):
        _resume(tmp_path)


# ------------------------------------------------------------------------ ActivationCache files


@pytest.fixture
def cache_file(tmp_path):
    path = tmp_path / "cache.safetensors"
    ActivationCache({("z", 0): torch.randn(2, 3, 4, 5)}, torch.ones(2, 3), {"what": ["z"]}).save(path)
    return path


def test_activation_cache_that_is_a_fifo(tmp_path):
    fifo = tmp_path / "cache.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"ActivationCache file .*cache\.safetensors is a FIFO"):
        _no_hang(lambda: ActivationCache.load(fifo), [fifo])
    with pytest.raises(ValueError, match=r"ActivationCache file /dev/zero is a character device"):
        ActivationCache.load("/dev/zero")


def test_activation_cache_larger_than_memory(cache_file):
    from headint.files import available_memory

    avail = available_memory()
    if avail is None:
        pytest.skip("this system does not report its available memory")
    with open(cache_file, "r+b") as f:
        f.truncate(avail + 2**30)  # sparse
    with pytest.raises(ValueError, match=r"ActivationCache file .*cache\.safetensors is \d+ bytes, over the"):
        ActivationCache.load(cache_file)


@pytest.mark.parametrize("meta", [NESTED, "[1, 2]", '"text"', "3", "null"])
def test_activation_cache_metadata_malformed(tmp_path, meta):
    from safetensors.torch import save_file

    path = tmp_path / "cache.safetensors"
    save_file({"z.0": torch.zeros(1, 2, 3, 4)}, str(path), metadata={"headint": meta})
    with pytest.raises(ValueError, match=r"ActivationCache\.load: .*cache\.safetensors"):
        ActivationCache.load(path)


def test_activation_cache_round_trip_still_works(cache_file):
    back = ActivationCache.load(cache_file)
    assert back.meta == {"what": ["z"]} and back["z", 0].shape == (2, 3, 4, 5)
