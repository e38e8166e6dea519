"""The kernels' autotuners key on bucketed lengths (``headint_kernels.tuning``), so decoding steps
and per-position scans do not re-tune at every new length.

Under the interpreter the production autotuners hold one config and never benchmark, so the
end-to-end test swaps in autotuners built exactly like the production ones (same kernel, key,
buckets, reset list) but with two configs and a counting ``do_bench``: it sees every
benchmark the real ``triton.runtime.autotuner.Autotuner.run`` would start on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import triton

from headint.ops import attention
from headint_kernels import attention_bwd, attention_fwd, config, launch, tuning

PRODUCTION = {
    "attn_fwd": attention_fwd.attn_fwd,
    "attn_bwd_pre": attention_bwd.attn_bwd_pre,
    "attn_bwd_dq": attention_bwd.attn_bwd_dq,
    "attn_bwd_dkdv": attention_bwd.attn_bwd_dkdv,
}


def test_length_bucket():
    assert tuning.length_bucket(0) == 0
    assert {tuning.length_bucket(n) for n in range(1, tuning.MIN_BUCKET + 1)} == {tuning.MIN_BUCKET}
    assert tuning.length_bucket(1000) == tuning.length_bucket(1010) == tuning.length_bucket(1024) == 1024
    assert tuning.length_bucket(1025) == 2048
    # every length up to 64k falls in one of a dozen buckets
    assert len({tuning.length_bucket(n) for n in range(1, 65537)}) == 13
    with pytest.raises(ValueError, match="length"):
        tuning.length_bucket(-1)


@pytest.mark.parametrize("name", list(PRODUCTION))
def test_production_autotuners_key_on_buckets_not_raw_lengths(name):
    tuner = PRODUCTION[name]
    assert isinstance(tuner, tuning.LengthBucketedAutotuner)
    assert "Tq" not in tuner.keys and "Tk" not in tuner.keys
    assert "TQ_BUCKET" in tuner.keys
    assert set(tuner.buckets.values()) <= {"Tq", "Tk"}
    if name != "attn_bwd_pre":  # the preprocess does not read keys
        assert "TK_BUCKET" in tuner.keys
        assert set(tuning.FLAG_KEY) <= set(tuner.keys)
    # the pseudo-arguments never reach the kernel
    assert not set(tuner.buckets) & set(tuner.fn.fn.arg_names)


def test_bucket_names_must_not_clash_with_kernel_arguments():
    with pytest.raises(ValueError, match="already arguments"):
        tuning.autotune(configs=config.configs("fwd"), key=["Tq"], buckets={"Tq": "Tk"})(attention_fwd.attn_fwd_kernel)
    with pytest.raises(ValueError, match="not arguments"):
        tuning.autotune(configs=config.configs("fwd"), key=["TQ_BUCKET"], buckets={"TQ_BUCKET": "T"})(
            attention_fwd.attn_fwd_kernel)


class CountingBench:
    """A ``do_bench`` that runs the config once and makes the last one benchmarked the fastest."""

    def __init__(self):
        self.calls = 0

    def __call__(self, kernel_call, quantiles=None):
        kernel_call()
        self.calls += 1
        t = 1.0 / self.calls
        return [t, t, t]


def _two_config_copies(monkeypatch) -> dict[str, tuple[tuning.LengthBucketedAutotuner, CountingBench]]:
    """Replace the launcher's autotuners by two-config copies with counting benchmarks."""
    out = {}
    for name, prod in PRODUCTION.items():
        t = config.INTERPRET_TILE
        kw = {"BLOCK_M": t[0]} if name == "attn_bwd_pre" else {"BLOCK_M": t[0], "BLOCK_N": t[1]}
        configs = [triton.Config(dict(kw), num_warps=w, num_stages=1) for w in (4, 8)]
        bench = CountingBench()
        copy = tuning.LengthBucketedAutotuner(prod.fn.fn, configs, prod.keys, prod.buckets,
                                              reset_to_zero=prod.reset_to_zero or None, do_bench=bench)
        monkeypatch.setattr(launch, name, copy)
        out[name] = (copy, bench)
    return out


def _decode_step(Tk: int, seed: int):
    """One decoding step (Tq = 1) over Tk cached keys, forward and backward, checked against the reference."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 1, 16, generator=g).requires_grad_(True)
    k = torch.randn(1, 1, Tk, 16, generator=g).requires_grad_(True)
    v = torch.randn(1, 1, Tk, 16, generator=g).requires_grad_(True)
    hm = torch.rand(2, generator=g).requires_grad_(True)
    out = attention(q, k, v, causal=True, head_mask=hm, backend="triton")
    go = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v, hm), go)
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v, hm)]
    ref = attention(*leaves[:3], causal=True, head_mask=leaves[3], backend="reference")
    ref_grads = torch.autograd.grad(ref, leaves, go.double())
    torch.testing.assert_close(out.detach().double(), ref.detach(), atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_decode_steps_of_one_bucket_tune_once(monkeypatch):
    """Tk = 1000 then 1010 (both in bucket 1024): the second step reuses every kernel's tuned config."""
    tuners = _two_config_copies(monkeypatch)
    _decode_step(1000, seed=1)
    first = {n: b.calls for n, (_, b) in tuners.items()}
    assert all(c == 2 for c in first.values()), first  # each kernel benchmarked both configs once
    keys = {n: set(t.cache) for n, (t, _) in tuners.items()}
    assert all(len(k) == 1 for k in keys.values()), keys

    _decode_step(1010, seed=2)
    assert {n: b.calls for n, (_, b) in tuners.items()} == first  # no new benchmark
    assert {n: set(t.cache) for n, (t, _) in tuners.items()} == keys  # the same key

    _decode_step(40, seed=3)  # another bucket (64): a new key for the kernels that see Tk
    for name, (t, b) in tuners.items():
        expected = 1 if name == "attn_bwd_pre" else 2
        assert len(t.cache) == expected, (name, t.cache)
