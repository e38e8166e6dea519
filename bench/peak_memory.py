"""Peak resident memory of a block of code (Linux), kept by the kernel: no sampling.

``with PeakRSS() as m: ...`` resets the process's high-water mark (``VmHWM``) to its current
resident set by writing ``5`` to ``/proc/self/clear_refs``, and afterwards ``m.peak`` is the
high-water mark above the resident set at the start, in bytes. Run it in a fresh process to see
one call's memory alone (allocator caches of earlier work would hide part of it).
"""

from __future__ import annotations


def status_bytes(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakRSS:
    """Context manager: ``.peak``, the peak resident set above the start of the block (bytes)."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident set (VmHWM) to the current one
            f.write("5")
        self.before = status_bytes("VmRSS")
        self.peak = 0
        return self

    def __exit__(self, *exc):
        self.peak = status_bytes("VmHWM") - self.before
        return False
