"""The autotuner of the attention kernels, keyed on *bucketed* sequence lengths.

``triton.autotune`` re-tunes whenever a value named in its ``key`` changes. Keyed on the raw
``Tq`` / ``Tk``, every decoding step of ``generate()`` (``Tk`` grows by one) and every start
position of a per-position scan is a new key, i.e. a new benchmark of every config on a GPU.
The best tile depends on the lengths only coarsely, so the key uses :func:`length_bucket`
(the next power of two, at least :data:`MIN_BUCKET`): a few dozen keys cover every length.

How, without changing the kernels' signatures or the launchers: :func:`autotune` wraps the
JIT kernel in :class:`_BucketArgs`, which declares extra *pseudo-arguments* (``TQ_BUCKET``,
``TK_BUCKET``) that the autotuner may name in its key, and removes them again before the
kernel is launched. :class:`LengthBucketedAutotuner` computes them from the real ``Tq`` / ``Tk``
at each call. The launcher calls the kernel exactly as before.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import KernelInterface

#: Lengths up to this share one bucket (below one tile the best config does not change).
MIN_BUCKET = 16

#: Pseudo-argument name -> the kernel argument whose value it buckets.
LENGTH_BUCKETS = {"TQ_BUCKET": "Tq", "TK_BUCKET": "Tk"}

#: Flags that change the best tile: the autotune key of the forward / dQ / dK-dV kernels.
FLAG_KEY = ["HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "HAS_WINDOW", "HAS_MASK", "MASK_IS_BOOL", "HAS_KNOCKOUT",
            "HAS_HEAD_MASK", "HAS_SOFTCAP"]


def length_bucket(n: int) -> int:
    """Bucket of a sequence length: ``max(MIN_BUCKET, next_power_of_2(n))`` (0 stays 0)."""
    n = int(n)
    if n < 0:
        raise ValueError(f"length_bucket: a sequence length must be >= 0, got {n}")
    if n == 0:
        return 0
    return max(MIN_BUCKET, triton.next_power_of_2(n))


class _BucketArgs(KernelInterface):
    """A JIT kernel seen with extra keyword pseudo-arguments, dropped before each launch.

    ``fn`` is the kernel (``JITFunction`` or the interpreter's function); ``extra`` the
    pseudo-argument names. ``arg_names`` lists the kernel's arguments, then the extras.
    """

    def __init__(self, fn, extra: Sequence[str]):
        clash = [n for n in extra if n in fn.arg_names]
        if clash:
            raise ValueError(f"bucket pseudo-arguments {clash} are already arguments of {fn}")
        self.fn = fn
        self.extra = tuple(extra)
        self.arg_names = list(fn.arg_names) + list(extra)

    def _strip(self, kwargs: dict) -> dict:
        return {k: v for k, v in kwargs.items() if k not in self.extra}

    def run(self, *args, **kwargs):
        return self.fn.run(*args, **self._strip(kwargs))

    def warmup(self, *args, **kwargs):
        return self.fn.warmup(*args, **self._strip(kwargs))


class LengthBucketedAutotuner(Autotuner):
    """``triton.runtime.autotuner.Autotuner`` whose key may name bucketed lengths.

    ``buckets`` maps a pseudo-argument name to the kernel argument it buckets (see
    :data:`LENGTH_BUCKETS`); their values are added at every call by :meth:`run`.
    """

    def __init__(self, fn, configs, key: Sequence[str], buckets: Mapping[str, str] = LENGTH_BUCKETS,
                 bucket: Callable[[int], int] = length_bucket, **kwargs):
        missing = [src for src in buckets.values() if src not in fn.arg_names]
        if missing:
            raise ValueError(f"bucketed lengths {missing} are not arguments of the kernel {fn}")
        wrapped = _BucketArgs(fn, list(buckets))
        self.buckets = dict(buckets)
        self.bucket = bucket
        super().__init__(wrapped, wrapped.arg_names, configs, list(key), kwargs.pop("reset_to_zero", None),
                         kwargs.pop("restore_value", None), **kwargs)

    def bucket_values(self, *args, **kwargs) -> dict[str, int]:
        """The pseudo-arguments of a call (positional ``args`` in kernel order, ``kwargs`` by name)."""
        named = dict(zip(self.fn.fn.arg_names, args))
        named.update(kwargs)
        return {name: self.bucket(named[src]) for name, src in self.buckets.items()}

    def run(self, *args, **kwargs):
        return super().run(*args, **kwargs, **self.bucket_values(*args, **kwargs))

    def warmup(self, *args, **kwargs):
        return super().warmup(*args, **kwargs, **self.bucket_values(*args, **kwargs))


def autotune(configs, key: Sequence[str], buckets: Mapping[str, str] = LENGTH_BUCKETS, **kwargs):
    """Decorator like ``triton.autotune`` whose ``key`` may also name the ``buckets`` pseudo-arguments."""

    def decorator(fn) -> LengthBucketedAutotuner:
        return LengthBucketedAutotuner(fn, configs, key, buckets, **kwargs)

    return decorator
