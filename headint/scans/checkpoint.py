"""Scan checkpoints: finished chunks on disk, so that a killed scan resumes where it stopped.

A checkpoint path is a folder holding one subfolder per scan, named by the scan's
fingerprint (a hash of everything that determines its values, see :mod:`.fingerprint`), so
scans sharing a path never overwrite each other's progress, and no scan resumes another's::

    <checkpoint>/
        <fingerprint[:16]>/
            scan.json            {"format", "fingerprint", "rows_per_batch", "n_chunks", "settings"}
            chunk-000000.pt      {"fingerprint", "index", "values": float32 [rows of the chunk]}
            chunk-000001.pt
            ...

Saving a chunk writes that chunk's file only (O(chunk), whatever the number of finished
chunks), atomically: a temporary file renamed over the final name, so a kill at any moment
leaves either a whole chunk file or none. A file that cannot be read or belongs to another
scan is an error naming it and saying how to start over.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from ..files import MAX_TEXT_BYTES, describe_os_error, parse_json, read_bytes, read_text, write_files_atomically

logger = logging.getLogger("headint")

FORMAT = "headint-scan-checkpoint/1"
META = "scan.json"


class CheckpointError(RuntimeError):
    """A checkpoint file or folder that cannot be used: unreadable, foreign, or of another scan.
    The message names the file and how to start over."""


def _brief(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters), for one-line errors."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def chunk_name(i: int) -> str:
    return f"chunk-{i:06d}.pt"


def atomic_save(obj, path: Path) -> int:
    """``torch.save(obj)`` to a temporary file renamed over ``path``; returns the bytes written.
    A failed write (a full disk) leaves no temporary file and raises :class:`CheckpointError`
    naming ``path``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    _write_or_fail([(path, data)])
    return len(data)


def _write_or_fail(files) -> None:
    """:func:`headint.files.write_files_atomically`, an ``OSError`` turned into a
    :class:`CheckpointError` naming the file."""
    try:
        write_files_atomically(files)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint file {describe_os_error(e)}; the chunks finished so far are "
                              "kept (free some space, then run the same scan again to resume)") from None


def _chunk_cap(rows_per_batch: int) -> int:
    """The most bytes a chunk file of ``rows_per_batch`` float32 values can take (with torch.save's
    archive around them)."""
    return 4 * rows_per_batch + 2**20


def _check_meta(data, meta: Path, start_over: str) -> None:
    """``scan.json``'s fields: a JSON object of this format with a positive int ``rows_per_batch``
    and a string ``fingerprint``; CheckpointError naming the file otherwise."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise CheckpointError(f"checkpoint file {meta} is not a {FORMAT} file (format {found!r}); {start_over}")
    rows = data.get("rows_per_batch")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise CheckpointError(f"checkpoint file {meta}: 'rows_per_batch' must be a positive int, got {rows!r}; {start_over}")
    if not isinstance(data.get("fingerprint"), str):
        raise CheckpointError(f"checkpoint file {meta}: 'fingerprint' must be a string, got {data.get('fingerprint')!r}; "
                              f"{start_over}")


def _read_meta(meta: Path, start_over: str):
    """The parsed ``scan.json`` (a regular file of at most 256 MiB, JSON of bounded depth)."""
    try:
        return parse_json(read_text(meta, "checkpoint file", MAX_TEXT_BYTES), str(meta))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {meta} is unreadable ({_brief(e)}); {start_over}") from None


class ScanCheckpoint:
    """The finished chunks of one scan under a checkpoint folder (or in memory when ``root`` is None).

    Args:
        root: the checkpoint folder (created), or None for no checkpoint.
        key: the scan's fingerprint (see :func:`headint.scans.fingerprint.fingerprint`); None
            without a checkpoint.
        rows_per_batch: the chunk size of this run; a resumed scan keeps the chunk size it
            started with (``self.rows_per_batch``), so its chunks are the same.
        settings: JSON-able settings, written next to the chunks for the record.
    """

    def __init__(self, root: str | os.PathLike | None, key: str | None, rows_per_batch: int, settings: dict | None = None):
        self.key = key
        self.rows_per_batch = int(rows_per_batch)
        self.done: dict[int, torch.Tensor] = {}
        self.bytes_written: list[int] = []  # per save, for the record
        self.folder: Path | None = None
        if root is None:
            return
        root = Path(root)
        how = "delete it or give another checkpoint path to start over"
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"checkpoint {root} is a file, not a headint checkpoint folder (one subfolder per scan); {how}")
        self.folder = root / key[:16]
        meta = self.folder / META
        if meta.exists():
            self._resume(meta)
        else:
            others = [p.name for p in root.iterdir() if (p / META).exists()] if root.exists() else []
            if others:
                logger.info("headint.scan: checkpoint %s holds other scans %s; they are kept, this scan saves to %s",
                            root, others, self.folder)
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot create the checkpoint folder {describe_os_error(e)}") from None
            data = dict(format=FORMAT, fingerprint=key, rows_per_batch=self.rows_per_batch, settings=settings or {})
            _write_or_fail([(meta, json.dumps(data, indent=2, default=str).encode())])

    def _start_over(self) -> str:
        return f"delete the folder {self.folder} to start this scan over (other scans' progress next to it is kept)"

    def _resume(self, meta: Path) -> None:
        data = _read_meta(meta, self._start_over())
        _check_meta(data, meta, self._start_over())
        if data.get("fingerprint") != self.key:
            raise CheckpointError(f"checkpoint file {meta} belongs to another scan (fingerprint {str(data.get('fingerprint'))[:16]}..., "
                               f"this scan {self.key[:16]}...); {self._start_over()}")
        if data["rows_per_batch"] != self.rows_per_batch:
            logger.info("headint.scan: resuming with the checkpoint's %d rows per batch (this run asked %d)",
                        data["rows_per_batch"], self.rows_per_batch)
        self.rows_per_batch = data["rows_per_batch"]
        for f in sorted(self.folder.glob("chunk-*.pt")):
            i, values = self._read_chunk(f)
            self.done[i] = values
        logger.info("headint.scan: resuming from %s (%d chunks done)", self.folder, len(self.done))

    def _read_chunk(self, f: Path) -> tuple[int, torch.Tensor]:
        try:
            raw = read_bytes(f, "checkpoint chunk", _chunk_cap(self.rows_per_batch))  # no FIFO, no device, no giant
            data = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        except Exception as e:  # truncated zip, foreign pickle, ...: all unreadable
            raise CheckpointError(f"checkpoint file {f} is unreadable ({_brief(e)}); delete {f} to recompute "
                               f"that chunk, or {self._start_over()}") from None
        ok = (isinstance(data, dict) and data.get("fingerprint") == self.key and isinstance(data.get("index"), int)
              and f.name == chunk_name(data["index"]) and isinstance(data.get("values"), torch.Tensor)
              and data["values"].dim() == 1 and data["values"].dtype == torch.float32)
        if not ok:
            raise CheckpointError(f"checkpoint file {f} is not a chunk of this scan (fingerprint {self.key[:16]}...); "
                               f"delete {f} to recompute that chunk, or {self._start_over()}")
        return data["index"], data["values"]

    def check_chunks(self, sizes: Sequence[int]) -> None:
        """Every finished chunk must exist in this scan's work list, with its number of rows."""
        for i, v in self.done.items():
            if i >= len(sizes) or len(v) != sizes[i]:
                f = self.folder / chunk_name(i)
                want = f"{sizes[i]} rows" if i < len(sizes) else f"at most {len(sizes)} chunks"
                raise CheckpointError(f"checkpoint file {f} holds {len(v)} values but this scan has {want}; "
                                   f"delete {f} to recompute that chunk, or {self._start_over()}")

    def save(self, i: int, values: torch.Tensor) -> None:
        """Record chunk ``i``'s values ``[rows]`` (and write its file when checkpointing)."""
        values = values.detach().float().cpu().contiguous()
        self.done[i] = values
        if self.folder is not None:
            self.bytes_written.append(atomic_save({"fingerprint": self.key, "index": i, "values": values}, self.folder / chunk_name(i)))
