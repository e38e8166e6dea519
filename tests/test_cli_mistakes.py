"""``headint scan`` mistakes that once ended in a traceback, a hang or lost work (issue 20, items
4 to 8): each is one line on stderr and exit code 2 (130 for Ctrl-C), found before the model loads
where it can be, and leaves no half-made output behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from headint.cli import main
from scan_oracles import make_batch, tiny_gpt2

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           HEADINT_CPU_KERNEL="0")  # nothing compiles: a process stopped by a test never leaves a build half-done


def _write_prompts(path: Path, batch, bom: bool = False) -> Path:
    lines = [json.dumps({"input_ids": batch["input_ids"][n].tolist(), "target": int(batch["target"][n]),
                         "contrast": int(batch["contrast"][n])}) for n in range(batch["input_ids"].shape[0])]
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode())
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    tiny_gpt2().save_pretrained(root / "model")
    _write_prompts(root / "prompts.jsonl", make_batch(3, 6, seed=1))
    return root


def _scan(folder: Path, *extra: str) -> list[str]:
    return ["scan", str(folder / "model"), "--prompts", str(folder / "prompts.jsonl"), "--no-progress", "--backend",
            "reference", *extra]


def _one_line(rc, err: str, out: str = "", code: int = 2, prefix: str = "headint") -> str:
    lines = err.strip().splitlines()
    assert rc == code, (rc, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith(prefix), err[-2000:]
    assert "Traceback" not in err + out
    return lines[0]


def _main(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return e.code


def _python_m_headint(argv, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "headint", *argv], capture_output=True, text=True, timeout=timeout,
                          env=ENV, **kw)


# ------------------------------------------------------------------------ item 4: --out


def _unwritable_folder() -> Path:
    """A folder path that cannot be created, even by root (sysfs refuses new entries)."""
    path = Path("/sys/headint-out-test")
    try:
        path.mkdir()
    except OSError:
        return path
    path.rmdir()
    pytest.skip("/sys accepts new folders here; no folder that root cannot create")


def test_unwritable_out_is_found_before_the_model_loads(folder, capsys, monkeypatch):
    import headint.cli as cli

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded before --out is known to be writable")

    monkeypatch.setattr(cli, "load_causal_lm", no_model)
    out = _unwritable_folder() / "results"
    rc = _main(_scan(folder, "--out", str(out)))
    line = _one_line(rc, capsys.readouterr().err)
    assert line.startswith("headint scan: --out /sys/headint-out-test/results: cannot write there")


def test_out_without_write_permission(folder, tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root writes regardless of permissions")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    import headint.cli as cli

    monkeypatch.setattr(cli, "load_causal_lm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    rc = _main(_scan(folder, "--out", str(locked / "out")))
    assert "cannot write there" in _one_line(rc, capsys.readouterr().err)


def test_out_is_created_before_the_model_loads_and_removed_if_the_scan_stops(folder, tmp_path, capsys, monkeypatch):
    import headint.cli as cli

    out = tmp_path / "new" / "out"
    seen = []

    def stop(*a, **k):
        seen.append(out.is_dir())
        raise cli.UsageError("stopped after the folder check")

    monkeypatch.setattr(cli, "load_causal_lm", stop)
    rc = _main(_scan(folder, "--out", str(out)))
    assert "stopped after the folder check" in _one_line(rc, capsys.readouterr().err)
    assert seen == [True]  # created (and written to) before the model loads
    assert not (tmp_path / "new").exists()  # and taken away again: a failed scan leaves no empty folder


def test_a_failed_write_of_the_outputs_is_one_line(folder, tmp_path, capsys, monkeypatch):
    """A write that fails after the scan (e.g. a full disk) names the file, one line, exit 2."""
    from headint.results import ScanResult

    def full(self, path, **kw):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(ScanResult, "to_html", full)
    rc = _main(_scan(folder, "--out", str(tmp_path / "o")))
    line = _one_line(rc, capsys.readouterr().err)
    assert "report.html: No space left on device" in line


# ------------------------------------------------------------------------ item 5: Ctrl-C


def _chunks(ckpt: Path) -> list[Path]:
    return list(ckpt.glob("*/chunk-*.pt"))


def test_ctrl_c_mid_scan_is_one_line_and_says_how_to_resume(tmp_path):
    """SIGINT to a real ``python -m headint scan`` once a checkpoint chunk exists: exit 130, one
    line naming the checkpoint and how to resume, no traceback, no temporary file; the same
    command then resumes and finishes."""
    tiny_gpt2().save_pretrained(tmp_path / "model")
    _write_prompts(tmp_path / "prompts.jsonl", make_batch(40, 6, seed=3))
    ckpt = tmp_path / "ckpt"
    argv = ["scan", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.jsonl"), "--method", "mean",
            "--batch-size", "1", "--checkpoint", str(ckpt), "--no-progress", "--backend", "reference",
            "--out", str(tmp_path / "out")]
    proc = subprocess.Popen([sys.executable, "-m", "headint", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while not _chunks(ckpt) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the scan ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
        assert _chunks(ckpt), "no chunk was written in time"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    line = _one_line(proc.returncode, err, out, code=130, prefix="headint scan: interrupted")
    assert f"saved in {ckpt}: run the same command again to resume" in line, line
    assert not [p for p in ckpt.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert not (tmp_path / "out").exists()
    done = len(_chunks(ckpt))
    resumed = _python_m_headint(argv, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "out" / "scan.csv").exists() and len(_chunks(ckpt)) >= done


def test_ctrl_c_without_checkpoint(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "model")
    _write_prompts(tmp_path / "prompts.jsonl", make_batch(200, 6, seed=3))
    argv = ["scan", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.jsonl"), "--method", "mean",
            "--batch-size", "1", "--backend", "reference", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen([sys.executable, "-m", "headint", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        # the progress bar (stderr) shows the scan running, some chunks done; then interrupt it
        deadline = time.monotonic() + 240
        seen = ""
        while not re.search(r"\| [1-9]\d*/2400", seen) and proc.poll() is None and time.monotonic() < deadline:
            seen += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
        assert proc.poll() is None, seen[-2000:]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (seen + err).replace("\r", "\n")
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err + out and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("headint scan: interrupted") and "--checkpoint" in last, last
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ item 6: files that are not files


def test_fifo_and_device_prompt_files_are_refused(folder, tmp_path):
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    argvs = [_scan(folder, "--out", str(tmp_path / "o"))[:] for _ in range(2)]
    argvs[0][3], argvs[1][3] = str(fifo), "/dev/zero"
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda a: _python_m_headint(a, timeout=120), argvs))
    first = _one_line(runs[0].returncode, runs[0].stderr, runs[0].stdout)
    assert f"prompt file {fifo} is a FIFO (named pipe), not a regular file" in first
    second = _one_line(runs[1].returncode, runs[1].stderr, runs[1].stdout)
    assert "prompt file /dev/zero is a character device, not a regular file" in second


def test_deeply_nested_json_prompt_line(folder, tmp_path, capsys):
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"input_ids": [1, 2], "target": 1, "contrast": 2}\n' + "[" * 100000 + "]" * 100000 + "\n")
    argv = _scan(folder, "--out", str(tmp_path / "o"))
    argv[3] = str(nested)
    rc = _main(argv)
    assert f"{nested}:2: JSON nested too deeply" in _one_line(rc, capsys.readouterr().err)


def test_oversized_prompt_file(folder, tmp_path, capsys):
    from headint.prompts import MAX_PROMPT_BYTES

    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate(MAX_PROMPT_BYTES + 1)  # sparse: no disk used, and never read
    argv = _scan(folder, "--out", str(tmp_path / "o"))
    argv[3] = str(big)
    line = _one_line(_main(argv), capsys.readouterr().err)
    assert f"prompt file {big} is {MAX_PROMPT_BYTES + 1} bytes, over the 256.0 MiB a prompt file may have" in line


def test_pickle_weights_that_torch_refuses(folder, tmp_path, capsys):
    """A pytorch_model.bin whose pickle ``torch.load(weights_only=True)`` refuses (it would run
    code): one line, not transformers' 28-line traceback."""
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "model" / "config.json").read_text())
    torch.save({"transformer.wte.weight": _Opaque()}, bad / "pytorch_model.bin")
    argv = _scan(folder, "--out", str(tmp_path / "o"))
    argv[1] = str(bad)
    line = _one_line(_main(argv), capsys.readouterr().err)
    assert f"{bad}: its pickle weight file cannot be loaded safely" in line and "Unsupported global" in line
    assert not (tmp_path / "o").exists()


class _Opaque:
    def __reduce__(self):
        return (print, ("a pickle that runs code",))


def test_fifo_weight_file_is_refused(folder, tmp_path, capsys):
    model = tmp_path / "fifo-model"
    model.mkdir()
    (model / "config.json").write_text((folder / "model" / "config.json").read_text())
    os.mkfifo(model / "model.safetensors")
    argv = _scan(folder, "--out", str(tmp_path / "o"))
    argv[1] = str(model)
    line = _one_line(_main(argv), capsys.readouterr().err)
    assert "model.safetensors is a FIFO (named pipe), not a regular file" in line


# ------------------------------------------------------------------------ item 7: BOM, --heads 0 1


def test_utf8_bom_is_accepted(folder, tmp_path, capsys):
    from headint.prompts import load_prompts

    batch = make_batch(3, 6, seed=1)
    bom = _write_prompts(tmp_path / "bom.jsonl", batch, bom=True)
    plain = load_prompts(folder / "prompts.jsonl")
    with_bom = load_prompts(bom)
    assert all(torch.equal(plain[k], with_bom[k]) for k in plain)
    argv = _scan(folder, "--out", str(tmp_path / "o"))
    argv[3] = str(bom)
    assert _main(argv) == 0, capsys.readouterr().err


def test_space_separated_heads_say_they_are_comma_separated(folder, tmp_path, capsys):
    for flag in ("--heads", "--layers"):
        rc = _main(_scan(folder, flag, "0", "1", "--out", str(tmp_path / "o")))
        line = _one_line(rc, capsys.readouterr().err)
        assert f"{flag} takes one comma-separated list: {flag} 0,1, not {flag} 0 1" in line, line


# ------------------------------------------------------------------------ item 8: mathtext in labels


def test_dollar_signs_in_names_are_drawn_literally(folder, tmp_path, capsys):
    """The folder name goes into every plot's title; ``$x^$`` once crashed matplotlib's mathtext
    parser and left no report."""
    model = tmp_path / "m$x^$"
    tiny_gpt2().save_pretrained(model)
    argv = _scan(folder, "--out", str(tmp_path / "o"), "--per-position")
    argv[1] = str(model)
    assert _main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "report.html").stat().st_size > 0 and (tmp_path / "o" / "heatmap.png").stat().st_size > 0
