"""Files of a :class:`~headint.results.ScanResult`: save / load and CSV.

A saved result is a pair of files with one stem: ``<stem>.safetensors`` holds the tensors
(``per_example`` ``[*grid, N]``, optionally ``base_per_example`` ``[N]``) and ``<stem>.json``
(the sidecar) everything else. Format version 2 (written now):

* the tensor file is always the one beside the sidecar with the same stem; no path is ever
  read from the JSON, so a renamed pair loads its own numbers and no file outside the result's
  folder is opened;
* ``tensor_sha256`` (sha256 of the tensor file's bytes) is checked on load, so a tensor file
  overwritten by another result, or paired with the wrong sidecar, is refused;
* the JSON is standard (no bare ``NaN``/``Infinity``): a non-finite float is written as
  ``null`` and its place listed in ``non_finite`` (``[{"path": [key or index, ...], "value":
  "NaN" | "Infinity" | "-Infinity"}]``), so it reads back as exactly that float while a
  ``None`` stays ``None``.

Saving writes both files under temporary names, flushed to disk, before renaming them over
the stem (:func:`headint.files.write_files_atomically`): a save that fails (a full disk) leaves
the result previously saved at that stem loadable, and no temporary file. Loading reads only
regular files (no FIFO or device), a sidecar of at most 256 MiB and a tensor file no larger
than the sidecar's shapes allow.

Version 1 sidecars (headint 0.1 before this format) still load when the tensor file they
name is the one beside them (they carry no hash); anything else is an error that names the
file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from ..files import MAX_TEXT_BYTES, JSONError, parse_json, read_bytes, read_text, write_files_atomically

__all__ = ["FORMAT", "VERSION", "result_files", "save", "read", "write_csv"]

FORMAT = "headint.ScanResult"
VERSION = 2
DIR_STEM = "scan"

_COMMON_FIELDS = ("axes", "labels", "metric_name", "clean_baseline", "corrupt_baseline", "settings", "normalized")
_REQUIRED = {1: _COMMON_FIELDS, 2: _COMMON_FIELDS + ("grid_shape", "n_examples", "tensor_sha256")}
_NON_FINITE_NAMES = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def result_files(path: str | os.PathLike, for_save: bool, dir_stem: str = DIR_STEM) -> tuple[Path, Path, Path]:
    """``(stem, tensor file, JSON sidecar)`` for ``path``: a directory (its files are
    ``<dir_stem>.*``, ``scan.*`` for a ScanResult), a file stem, or either file of the pair."""
    text = os.fspath(path)
    for suffix in (".safetensors", ".json"):
        if text.endswith(suffix):
            stem = Path(text[: -len(suffix)])
            break
    else:
        p = Path(text)
        is_dir = p.is_dir() or text.endswith(("/", os.sep))
        if not for_save and not is_dir and not Path(text + ".json").exists() and (p / f"{dir_stem}.json").exists():
            is_dir = True
        stem = p / dir_stem if is_dir else p
    return stem, Path(f"{stem}.safetensors"), Path(f"{stem}.json")


# ------------------------------------------------------------------ standard JSON for non-finite floats


def _name_of(x: float) -> str:
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _standard(obj: Any, path: list, found: list[dict]) -> Any:
    """``obj`` with every non-finite float replaced by None; their places appended to ``found``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        found.append({"path": list(path), "value": _name_of(obj)})
        return None
    if isinstance(obj, dict):
        return {k: _standard(v, [*path, k], found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_standard(v, [*path, i], found) for i, v in enumerate(obj)]
    return obj


def _restore_non_finite(meta: dict, records: Any, json_file: Path) -> None:
    """Put the floats listed in ``records`` (the sidecar's ``non_finite``) back in place."""
    if not isinstance(records, list):
        raise ValueError(f"{json_file}: field 'non_finite' must be a list, got {type(records).__name__}")
    for record in records:
        value = record.get("value") if isinstance(record, dict) else None
        path = record.get("path") if isinstance(record, dict) else None
        if value not in _NON_FINITE_NAMES or not isinstance(path, list) or not path:
            raise ValueError(
                f"{json_file}: entries of 'non_finite' must be {{\"path\": [key or index, ...], \"value\": "
                f"\"NaN\" | \"Infinity\" | \"-Infinity\"}}, got {record!r}"
            )
        parent: Any = meta
        try:
            for key in path[:-1]:
                parent = parent[key]
            if parent[path[-1]] is not None:
                raise LookupError
        except (LookupError, TypeError):
            raise ValueError(f"{json_file}: 'non_finite' lists {path}, which is not a null in the sidecar") from None
        parent[path[-1]] = _NON_FINITE_NAMES[value]


# ------------------------------------------------------------------ save


def save(result, path: str | os.PathLike) -> Path:
    """Write ``result`` to ``path`` (see :meth:`ScanResult.save`); returns the stem."""
    from safetensors.torch import save as tensors_to_bytes

    stem, tensor_file, json_file = result_files(path, for_save=True)
    tensor_file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"per_example": result.per_example.contiguous()}
    if result.base_per_example is not None:
        tensors["base_per_example"] = result.base_per_example.contiguous()
    data = tensors_to_bytes(tensors)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "axes": list(result.axes),
        "labels": None if result.labels is None else [[list(p) for p in s] for s in result.labels],
        "metric_name": result.metric_name,
        "clean_baseline": result.clean_baseline,
        "corrupt_baseline": result.corrupt_baseline,
        "settings": result.settings,
        "normalized": result.normalized,
        "grid_shape": list(result.grid_shape),
        "n_examples": result.n_examples,
        "tensor_sha256": hashlib.sha256(data).hexdigest(),
    }
    found: list[dict] = []
    meta = _standard(meta, [], found)
    meta["non_finite"] = found
    text = json.dumps(meta, indent=2, allow_nan=False)
    # Both files reach the disk under temporary names before either final name changes: a save
    # that fails (a full disk, say) leaves a previous result at this stem loadable.
    write_files_atomically([(tensor_file, data), (json_file, text.encode())])
    return stem


# ------------------------------------------------------------------ load


def read_sidecar(json_file: Path, kind: str, fmt: str) -> dict:
    """The JSON object of a saved result's sidecar (a regular file of bounded size, parsed with
    the nesting and type checks of :func:`headint.files.parse_json`) whose ``"format"`` is
    ``fmt``; ValueError naming the file and ``kind`` (e.g. ``"ScanResult"``) otherwise."""
    text = read_text(json_file, f"{kind} sidecar", MAX_TEXT_BYTES)
    try:
        meta = parse_json(text, str(json_file))
    except JSONError as e:
        raise ValueError(f"{json_file} is not a saved {kind}: it is {e.reason}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{json_file} is not a saved {kind} (format {found!r}, expected {fmt!r})")
    return meta


def _read_sidecar(json_file: Path) -> dict:
    meta = read_sidecar(json_file, "ScanResult", FORMAT)
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in _REQUIRED:
        raise ValueError(
            f"{json_file}: unknown ScanResult format version {version!r}; this headint reads versions "
            f"{sorted(_REQUIRED)} (a newer headint may have written it)"
        )
    missing = [f for f in _REQUIRED[version] if f not in meta]
    if missing:
        raise ValueError(
            f"{json_file}: missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(f) for f in missing)} "
            f"(a version {version} ScanResult sidecar needs {', '.join(_REQUIRED[version])})"
        )
    return meta


def _check_named_tensor_file(meta: dict, json_file: Path, tensor_file: Path) -> None:
    """A ``tensor_file`` field (version 1) must name the tensor file beside the sidecar."""
    if "tensor_file" not in meta:
        return
    name = meta["tensor_file"]
    if not isinstance(name, str) or name != Path(name).name or name in ("", ".", "..") or "\\" in name:
        raise ValueError(
            f"{json_file}: field 'tensor_file' must be a plain file name beside the sidecar, got {name!r}; "
            "headint never follows a path out of a result's folder"
        )
    if name != tensor_file.name:
        raise ValueError(
            f"{json_file}: the sidecar names tensor file {name!r}, but its own tensor file is {tensor_file.name!r} "
            f"(same stem); a version {meta['version']} sidecar carries no content hash, so headint cannot tell which "
            f"one holds its numbers. If the pair was renamed, rename both files back to the stem "
            f"{Path(name).stem!r}, or load it there and save it again"
        )


def _shape_field(meta: dict, json_file: Path) -> list[int] | None:
    if "grid_shape" not in meta and "n_examples" not in meta:
        return None
    grid, n = meta.get("grid_shape"), meta.get("n_examples")
    ok = isinstance(grid, list) and all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in grid)
    if not ok or not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{json_file}: fields 'grid_shape' (list of ints >= 0) and 'n_examples' (int >= 0) are malformed: "
                         f"{grid!r}, {n!r}")
    return [*grid, n]


def _tensor_file_cap(shape: list[int] | None) -> int | None:
    """The most bytes a tensor file of a result with ``shape`` (grid + [N]) can hold: float64
    ``per_example`` and ``base_per_example`` plus a header (None when the sidecar gives no shape)."""
    if shape is None:
        return None
    numel = 1
    for n in shape:
        numel *= n
    return 8 * (numel + shape[-1]) + 2**20


def read(path: str | os.PathLike) -> tuple[Path, dict]:
    """``(sidecar path, keyword arguments of ScanResult)`` of the result saved at ``path``.

    Raises FileNotFoundError if either file is missing and ValueError (naming the file) for a
    sidecar that is not a ScanResult, misses a field, has a malformed field, names a tensor file
    other than its own, or whose tensor file fails the content hash or holds other shapes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as tensors_from_bytes

    _, tensor_file, json_file = result_files(path, for_save=False)
    if not json_file.exists():
        raise FileNotFoundError(f"no ScanResult at {os.fspath(path)!r}: {json_file} does not exist")
    meta = _read_sidecar(json_file)
    _check_named_tensor_file(meta, json_file, tensor_file)
    if not tensor_file.exists():
        raise FileNotFoundError(f"{json_file}: its tensor file {tensor_file} does not exist (the two files of a "
                                "ScanResult share one stem and are renamed together)")
    expected = _shape_field(meta, json_file)
    data = read_bytes(tensor_file, "ScanResult tensor file", _tensor_file_cap(expected))
    if meta["version"] >= 2:
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta["tensor_sha256"]:
            raise ValueError(
                f"{tensor_file} does not hold the tensors {json_file} was saved with (sha256 {digest[:12]}..., the "
                f"sidecar records {str(meta['tensor_sha256'])[:12]}...): it was overwritten or belongs to another result"
            )
        _restore_non_finite(meta, meta.get("non_finite", []), json_file)
    try:
        tensors = tensors_from_bytes(data)
    except SafetensorError as e:
        raise ValueError(f"{tensor_file} is not a safetensors file ({e})") from None
    if "per_example" not in tensors:
        raise ValueError(f"{tensor_file} has no 'per_example' tensor (found {sorted(tensors)})")
    if expected is not None and list(tensors["per_example"].shape) != expected:
        raise ValueError(f"{tensor_file}: per_example has shape {list(tensors['per_example'].shape)}, but {json_file} "
                         f"records grid_shape + [n_examples] = {expected}")
    labels = meta["labels"]
    if labels is not None and not isinstance(labels, list):
        raise ValueError(f"{json_file}: field 'labels' must be null or a list of head sets, got {labels!r}")
    if not isinstance(meta["axes"], list):
        raise ValueError(f"{json_file}: field 'axes' must be a list of axis names, got {meta['axes']!r}")
    if not isinstance(meta["normalized"], bool):
        raise ValueError(f"{json_file}: field 'normalized' must be true or false, got {meta['normalized']!r}")
    fields = dict(
        per_example=tensors["per_example"],
        axes=tuple(meta["axes"]),
        labels=labels,
        metric_name=meta["metric_name"],
        clean_baseline=meta["clean_baseline"],
        corrupt_baseline=meta["corrupt_baseline"],
        settings=meta["settings"],
        normalized=meta["normalized"],
        base_per_example=tensors.get("base_per_example"),
    )
    return json_file, fields


def write_csv(result, path: str | os.PathLike) -> Path:
    """Write ``result.to_frame()`` to ``path`` as CSV (no index column); returns the path."""
    path = Path(path)
    result.to_frame().to_csv(path, index=False)
    return path
