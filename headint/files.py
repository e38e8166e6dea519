"""Files a user hands to headint, and files headint writes: checked before they are opened,
written so that a failure leaves nothing half-done.

Reading: a path must name a regular file (a FIFO would block forever, ``/dev/zero`` read
without end, a folder fail obscurely) no larger than a cap stated by the caller, and JSON in
it may not nest deeper than Python can parse. Each refusal is a ``ValueError`` (or
``FileNotFoundError`` / ``IsADirectoryError``) naming the file. UTF-8 text may start with a
byte-order mark (as Notepad writes it).

Writing: :func:`write_files_atomically` writes every file of a group to a temporary file in its
folder, flushed to disk, and only then renames them over their final names, so a full disk
(or any other error) while writing leaves the previous files as they were and no temporary
file behind; the error is an ``OSError`` naming the file it could not write.

This module imports nothing from headint.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Sequence

__all__ = ["MAX_TEXT_BYTES", "JSONError", "regular_file", "read_bytes", "read_text", "parse_json", "available_memory",
           "write_files_atomically", "describe_os_error"]

MAX_TEXT_BYTES = 256 * 2**20
"""Cap of text inputs: JSONL prompt files, JSON sidecars and checkpoint metadata (256 MiB)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def regular_file(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> int:
    """Check, without opening it, that ``path`` is a regular file (symbolic links followed) of at
    most ``max_bytes`` bytes (None: no cap); returns its size. ``what`` names it in errors
    (e.g. ``"prompt file"``)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {os.fspath(path)}: no such file") from None
    except OSError as e:
        raise ValueError(f"{what} {os.fspath(path)} cannot be read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{what} {os.fspath(path)} is a directory; expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {os.fspath(path)} is {_kind(st.st_mode)}, not a regular file; headint reads only "
                         "regular files (a pipe or device could block or never end)")
    if max_bytes is not None and st.st_size > max_bytes:
        raise ValueError(f"{what} {os.fspath(path)} is {st.st_size} bytes, over the {_size(max_bytes)} a {what} may have")
    return st.st_size


def read_bytes(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path`` after :func:`regular_file`; never more than ``max_bytes`` (a file
    that grows past the cap while being read is refused too)."""
    regular_file(path, what, max_bytes)
    limit = -1 if max_bytes is None else max_bytes + 1
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError as e:
        raise ValueError(f"{what} {os.fspath(path)} cannot be read: {e.strerror or e}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{what} {os.fspath(path)} grew past the {_size(max_bytes)} a {what} may have while being read")
    return data


def read_text(path: str | os.PathLike, what: str, max_bytes: int | None = MAX_TEXT_BYTES) -> str:
    """UTF-8 text of ``path`` (a leading byte-order mark is dropped) after :func:`regular_file`."""
    data = read_bytes(path, what, max_bytes)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {os.fspath(path)}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None


class JSONError(ValueError):
    """Text that :func:`parse_json` cannot read; ``reason`` says why without the place."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def parse_json(text: str | bytes, where: str) -> Any:
    """``json.loads(text)``; :class:`JSONError` (a ``ValueError``) naming ``where`` (a file,
    ``file:line``) for text that is not JSON or nests deeper than the parser's recursion limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONError(where, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise JSONError(where, "JSON nested too deeply to read (arrays or objects inside each other about a "
                               "thousand levels deep or more)") from None
    except UnicodeDecodeError as e:
        raise JSONError(where, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def available_memory() -> int | None:
    """Bytes of host memory available now (None where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def describe_os_error(e: OSError) -> str:
    """``"<file>: <reason>"`` for an error of the file system."""
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    return f"{where}{e.strerror or e}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a new temporary file beside ``path``, flushed to disk; removed again on any error."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        _remove(Path(tmp))
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from None
        raise
    return Path(tmp)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def write_files_atomically(files: Sequence[tuple[str | os.PathLike, bytes]]) -> None:
    """Write every ``(path, data)`` of ``files``, all or nothing as far as the file system allows.

    Every file is first written to a temporary file in its own folder and flushed to disk; a
    failure there (a full disk, a missing permission) removes the temporary files and leaves
    every existing file untouched. Then each is renamed over its final name, in order; if a
    rename fails, the files already renamed are put back as they were (from hard links kept
    meanwhile, where the file system has them). Raises ``OSError`` whose ``filename`` is the
    final path that could not be written."""
    paths = [Path(p) for p, _ in files]
    temps: list[Path] = []
    backups: list[tuple[Path, Path | None]] = []  # (final path, hard link of its previous content or None)
    try:
        for path, (_, data) in zip(paths, files):
            temps.append(_write_temp(path, data))
        for path in paths:
            backups.append((path, _link_backup(path)))
        done: list[Path] = []
        try:
            for path, tmp in zip(paths, temps):
                try:
                    os.replace(tmp, path)
                except OSError as e:
                    raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from None
                done.append(path)
        except BaseException:
            for path, backup in backups:
                if path in done:
                    if backup is not None:
                        os.replace(backup, path)
                    else:
                        _remove(path)
            raise
    finally:
        for tmp in temps:
            _remove(tmp)
        for _, backup in backups:
            if backup is not None:
                _remove(backup)


def _link_backup(path: Path) -> Path | None:
    """A hard link to ``path``'s current content under a temporary name (None if there is no
    file, or the file system has no hard links)."""
    if not path.exists():
        return None
    backup = Path(tempfile.mktemp(prefix=f".{path.name}.", suffix=".prev", dir=path.parent))
    try:
        os.link(path, backup)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EXDEV, errno.EOPNOTSUPP):
            return None
        raise
    return backup
