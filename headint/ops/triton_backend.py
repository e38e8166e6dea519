"""The ``"triton"`` backend: headint's fused Triton kernels (package ``headint_kernels``).

Importing this module imports triton and the kernels and registers the fused implementation
(:func:`headint.ops.fused.register_impl`). It raises
:class:`~headint.ops.backends.BackendUnavailable` with the reason when that is impossible.
The kernels run CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before triton
was imported (the Triton interpreter: slow, for tests).

Testing aid: set ``headint_kernels.launch.POISON_OUTPUTS = True`` to NaN-fill every output before
the kernels write it.
"""

from __future__ import annotations

import torch

from .backends import BackendUnavailable
from .fused import register_impl

try:
    import triton  # noqa: F401
except Exception as e:  # ImportError, or a broken install raising something else
    raise BackendUnavailable(f"backend 'triton' needs the triton package, which cannot be imported: {e}") from e

try:
    from headint_kernels import launch as _launch
except ImportError as e:
    raise BackendUnavailable(
        f"backend 'triton': the kernel package headint_kernels cannot be imported ({e}); "
        "install headint from a source checkout (pip install -e .)"
    ) from e
except Exception as e:  # triton API mismatch at kernel definition time
    raise BackendUnavailable(f"backend 'triton': defining the Triton kernels failed with this triton: {e}") from e


def _window(window: int) -> int | None:
    return None if window is None or window < 0 else int(window)


class TritonImpl:
    """Fused implementation for :mod:`headint.ops.fused` (signatures in its docstring)."""

    @staticmethod
    def forward(q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, scale, causal, window):
        out, lse, attn = _launch.attention_forward(
            q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale,
            scale=scale, causal=causal, window=_window(window),
        )
        if attn is None:
            attn = q.new_empty(0)
        return out, lse, attn

    @staticmethod
    def backward(dout, q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale, scale, causal, window,
                 attn, lse):
        dq, dk, dv, dhm, dss = _launch.attention_backward(
            dout.contiguous(), q, k, v, mask, q_bits, k_bits, head_mask, head_patch, score_scale,
            scale=scale, causal=causal, window=_window(window), attn=attn, lse=lse,
        )
        if dhm is None:
            dhm = q.new_empty(0, dtype=torch.float32)
        if dss is None:
            dss = q.new_empty(0, dtype=torch.float32)
        return dq, dk, dv, dhm, dss


register_impl("triton", TritonImpl())
