"""Shared setup of the backend conformance suite (CPU tensors: the Triton kernels interpreted).

These tests run in the Triton interpreter lane: ``TRITON_INTERPRET=1`` is set by
tests/conftest.py before anything imports triton's kernels (``triton.jit`` decides at decoration
time whether to build interpreted functions), and only in a session that runs this lane.

Every test runs with the kernels' outputs poisoned (``headint_kernels.launch.POISON_OUTPUTS``,
``headint.ops.cpu_backend.POISON_OUTPUTS``): outputs and scratch start NaN-filled, so an element
a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Set the POISON_OUTPUTS flag of every kernel backend that loads here; yields their modules."""
    from headint.ops import backends

    flags = []
    if backends.unavailable_reason("triton", torch.device("cpu")) is None:
        from headint_kernels import config, launch

        if not config.INTERPRET:
            pytest.fail("headint_kernels was imported before TRITON_INTERPRET=1 was set (kernels not interpreted)")
        flags.append(launch)
    if backends.unavailable_reason("cpu", torch.device("cpu")) is None:
        from headint.ops import cpu_backend

        flags.append(cpu_backend)
    old = [m.POISON_OUTPUTS for m in flags]
    for m in flags:
        m.POISON_OUTPUTS = True
    try:
        yield flags
    finally:
        for m, o in zip(flags, old):
            m.POISON_OUTPUTS = o
