"""headint.attribution_scan against brute-force autograd through plain hooks.

The oracle (``scan_oracles.oracle_attribution``) replaces each head output by
``z + alpha * (z_src - z)`` with one scalar ``alpha`` per example, head (and position) and
takes ``d metric / d alpha`` at ``alpha = 0``: the attribution-patching estimate
``(z_src - z) . d metric / d z``. For the mask method ``z_src = 0``, i.e. ``-d metric / d m``
of ``out = m * z`` at ``m = 1``. The scan's per-example values are base metric + estimate.
"""

from __future__ import annotations

import copy

import pytest
import torch

import headint
from scan_oracles import (
    corrupt_of,
    derangement,
    make_batch,
    masked_mean_z,
    model_inputs,
    oracle_attribution,
    oracle_metric,
    out_proj,
    record_z,
    spearman,
)

ATOL = 1e-5
RTOL = 1e-4
BACKEND = "reference"
L, H = 3, 4


def _expected(model, clean, corrupt, metric, method, direction, per_position):
    if method == "mask":
        base, source = clean, None
    elif direction == "noising":
        base, source = clean, corrupt
    else:
        base, source = corrupt, clean
    values, est = oracle_attribution(model, base, source, metric, per_position=per_position, clean=clean)
    shape = (1, 1, 1, -1) if per_position else (1, 1, -1)
    return values.view(*shape) + est, est


@pytest.mark.parametrize("per_position", [False, True], ids=["head", "head-position"])
@pytest.mark.parametrize("method,direction", [("patch", "noising"), ("patch", "denoising"), ("mask", None)],
                         ids=["patch-noising", "patch-denoising", "mask"])
@pytest.mark.parametrize("metric", ["logit_diff", "logprob", "kl", "loss"])
def test_attribution_matches_autograd(model, method, direction, per_position, metric):
    clean = make_batch(3, 6, seed=5, pad="left", lengths=[6, 4, 5])
    corrupt = corrupt_of(clean, n_changes=2)
    r = headint.attribution_scan(model, clean, corrupt, metric, method=method, direction=direction or "noising",
                                 per_position=per_position, backend=BACKEND)
    expected, est = _expected(model, clean, corrupt, metric, method, direction, per_position)
    assert r.axes == (("layer", "head", "position") if per_position else ("layer", "head"))
    assert r.per_example.shape == expected.shape
    torch.testing.assert_close(r.per_example, expected.float(), atol=ATOL, rtol=RTOL)
    if not (metric == "kl" and (method == "mask" or direction == "noising")):
        assert est.abs().max() > 1e-3  # a non-trivial check (KL at the clean run has zero gradient)


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
@pytest.mark.parametrize("per_position", [False, True], ids=["head", "head-position"])
def test_ablation_baselines_match_autograd(model, method, per_position):
    """method zero/mean/resample: (z_b - z) . d metric / d z with z_b the exact scan's baseline
    (zeros; the per-position mean over the inputs, padding left out; the seeded derangement)."""
    clean = make_batch(4, 6, seed=12, pad="left", lengths=[6, 4, 5, 6])
    r = headint.attribution_scan(model, clean, None, "logprob", method=method, per_position=per_position, seed=3,
                                 backend=BACKEND)
    z = record_z(model, clean)[0]
    z_source = {"zero": None, "mean": masked_mean_z(z, clean["attention_mask"]),
                "resample": {l: x[derangement(4, 3)] for l, x in z.items()}}[method]
    values, est = oracle_attribution(model, clean, None, "logprob", per_position=per_position, z_source=z_source)
    expected = values.view(*((1, 1, 1, -1) if per_position else (1, 1, -1))) + est
    torch.testing.assert_close(r.per_example, expected.float(), atol=ATOL, rtol=RTOL)
    assert est.abs().max() > 1e-3
    assert r.settings["approximates"]["method"] == method
    if method == "zero":  # the mask method is the same estimate under Michel et al.'s name
        mask = headint.attribution_scan(model, clean, None, "logprob", method="mask", per_position=per_position, backend=BACKEND)
        torch.testing.assert_close(mask.per_example, r.per_example)


def test_baselines_differ_and_mean_inputs(gpt2):
    """Mean and zero baselines give different estimates (the test can fail); mean_inputs= is the
    exact scan's reference set."""
    clean = make_batch(4, 6, seed=13)
    ref = make_batch(5, 6, seed=14)
    zero = headint.attribution_scan(gpt2, clean, None, "logit_diff", method="zero", backend=BACKEND)
    mean = headint.attribution_scan(gpt2, clean, None, "logit_diff", method="mean", backend=BACKEND)
    assert (zero.effect - mean.effect).abs().max() > 1e-2
    other = headint.attribution_scan(gpt2, clean, None, "logit_diff", method="mean", mean_inputs=ref, backend=BACKEND)
    z = masked_mean_z(record_z(gpt2, ref)[0], ref["attention_mask"])
    _, est = oracle_attribution(gpt2, clean, None, "logit_diff", z_source=z)
    torch.testing.assert_close(other.effect, est.mean(-1).float(), atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="mean_inputs"):
        headint.attribution_scan(gpt2, clean, None, "logit_diff", method="zero", mean_inputs=ref, backend=BACKEND)


def test_attribution_batch_size_chunks(llama):
    clean = make_batch(4, 6, seed=6)
    corrupt = corrupt_of(clean)
    whole = headint.attribution_scan(llama, clean, corrupt, "logit_diff", per_position=True, backend=BACKEND)
    chunked = headint.attribution_scan(llama, clean, corrupt, "logit_diff", per_position=True, batch_size=3, backend=BACKEND)
    torch.testing.assert_close(chunked.per_example, whole.per_example, atol=1e-6, rtol=1e-6)


def test_attribution_leaves_parameters_alone(gpt2):
    clean = make_batch(3, 6, seed=7)
    flags = [p.requires_grad for p in gpt2.parameters()]
    headint.attribution_scan(gpt2, clean, corrupt_of(clean), "logit_diff", backend=BACKEND)
    assert [p.requires_grad for p in gpt2.parameters()] == flags
    assert all(p.grad is None for p in gpt2.parameters())
    assert not gpt2.training


def test_finite_difference_one_head(model):
    """Central differences in float64 on one head agree with the fp32 attribution estimate."""
    clean = make_batch(3, 6, seed=8)
    corrupt = corrupt_of(clean)
    r = headint.attribution_scan(model, clean, corrupt, "logit_diff", method="patch", direction="noising", backend=BACKEND)
    base = r.settings["base_baseline"]
    layer, head = 1, 2
    m64 = copy.deepcopy(model).double()
    D = model.config.hidden_size // model.config.num_attention_heads
    z_src = record_z(m64, corrupt)[0][layer][:, :, head]
    alpha = {"a": 0.0}

    def pre(_m, args):
        x = args[0].clone()
        sl = slice(head * D, (head + 1) * D)
        x[..., sl] = x[..., sl] + alpha["a"] * (z_src - x[..., sl])
        return (x,) + tuple(args[1:])

    handle = out_proj(m64, layer).register_forward_pre_hook(pre)
    try:
        def f(a):
            alpha["a"] = a
            with torch.no_grad():
                return oracle_metric("logit_diff", m64(**model_inputs(clean)).logits, clean, None).double()

        eps = 1e-3  # truncation error O(eps^2); some ops of the double model still round at fp32
        fd = (f(eps) - f(-eps)) / (2 * eps)
        base64 = f(0.0)
    finally:
        handle.remove()
    estimate = r.per_example[layer, head].double() - base64
    assert base == pytest.approx(float(base64.mean()), abs=1e-5)
    assert fd.abs().max() > 1e-3
    torch.testing.assert_close(estimate, fd, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_rank_agreement_with_exact_scan(name, gpt2, llama):
    """Attribution ranks heads like the exact scan (patch: Spearman > 0.5); numbers are printed."""
    model = {"gpt2": gpt2, "llama": llama}[name]
    clean = make_batch(4, 7, seed=9)
    corrupt = corrupt_of(clean, n_changes=1)
    out = {}
    for per_position in (False, True):
        exact = headint.scan(model, clean, "logit_diff", corrupt=corrupt, method="patch", direction="noising",
                             per_position=per_position, progress=False, backend=BACKEND)
        attr = headint.attribution_scan(model, clean, corrupt, "logit_diff", method="patch", direction="noising",
                                        per_position=per_position, backend=BACKEND)
        key = "patch/head-position" if per_position else "patch/head"
        out[key] = spearman(attr.effect, exact.effect)
    zero = headint.scan(model, clean, "logit_diff", method="zero", progress=False, backend=BACKEND)
    mask = headint.attribution_scan(model, clean, None, "logit_diff", method="mask", backend=BACKEND)
    out["mask-vs-zero/head"] = spearman(mask.effect, zero.effect)
    print(f"\n[spearman {name}] " + ", ".join(f"{k}={v:.3f}" for k, v in out.items()))
    assert out["patch/head"] > 0.5
    assert out["patch/head-position"] > 0.5
    assert out["mask-vs-zero/head"] > 0.0


def test_attribution_bad_arguments(gpt2):
    clean = make_batch(3, 6, seed=10)
    with pytest.raises(ValueError, match="method"):
        headint.attribution_scan(gpt2, clean, corrupt_of(clean), method="integrated", backend=BACKEND)
    with pytest.raises(ValueError, match="corrupt"):
        headint.attribution_scan(gpt2, clean, None, method="patch", backend=BACKEND)
    with pytest.raises(ValueError, match="direction"):
        headint.attribution_scan(gpt2, clean, corrupt_of(clean), direction="both", backend=BACKEND)
    with pytest.raises(ValueError, match="shape"):
        headint.attribution_scan(gpt2, clean, make_batch(3, 5, seed=1), backend=BACKEND)


def test_backward_pass_count_with_chunks(gpt2):
    clean = make_batch(3, 6, seed=11)
    r = headint.attribution_scan(gpt2, clean, corrupt_of(clean), "logit_diff", batch_size=1, backend=BACKEND)
    assert r.settings["cost"]["backward_passes"] == 3
