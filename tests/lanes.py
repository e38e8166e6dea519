"""Which lane a test path belongs to (see tests/conftest.py): the Triton interpreter lane
(``TRITON_INTERPRET=1``) or the native lane. A plain module, so tests can import it (``conftest``
names several modules under pytest)."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent

# Test folders that need the Triton interpreter (TRITON_INTERPRET=1): the interpreter lane.
INTERPRETER_DIRS = ("backends", "triton", "ops")


def lane_dir(path: Path) -> str | None:
    """The top folder under tests/ that ``path`` lies in, or None (tests/ itself, a file directly
    in it, or outside)."""
    try:
        parts = Path(path).resolve().relative_to(TESTS).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 or (parts and (TESTS / parts[0]).is_dir()) else None


def in_interpreter_lane(path: Path) -> bool:
    return lane_dir(path) in INTERPRETER_DIRS
