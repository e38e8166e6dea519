"""A checkpoint resumes only the scan that wrote it (``headint.scans.fingerprint``).

Every case: scan A finishes into a checkpoint folder, then scan B, which differs from A in one
thing only, runs with the same folder. B must compute its own numbers (equal to B run without a
checkpoint, different from A's) or be refused with a message naming what cannot be hashed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import headint
from headint.metrics import CallableMetric, LogitDiff
from headint.scans.checkpoint import CheckpointError
from headint.scans.fingerprint import FingerprintError, fingerprint
from scan_oracles import make_batch, tiny_gpt2, tiny_llama

BACKEND = "reference"


def _scan(model, batch, metric, checkpoint=None, **kw):
    kw = dict(dict(method="zero", batch_size=6, progress=False, backend=BACKEND), **kw)
    return headint.scan(model, batch, metric, checkpoint=checkpoint, **kw)


def _folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "scan.json").exists())


def _second_computes_its_own(tmp_path, a: tuple, b: tuple, **kw_both):
    """Scan ``a`` = (model, batch, metric, kwargs) into a checkpoint, then ``b`` with the same
    folder: b's values equal b's own (no checkpoint) and differ from a's; two scan folders."""
    ckpt = tmp_path / "ck"
    ra = _scan(a[0], a[1], a[2], ckpt, **a[3], **kw_both)
    rb = _scan(b[0], b[1], b[2], ckpt, **b[3], **kw_both)
    own = _scan(b[0], b[1], b[2], None, **b[3], **kw_both)
    assert torch.equal(rb.per_example, own.per_example), "the second scan resumed the first one's checkpoint"
    assert not torch.equal(rb.per_example, ra.per_example), "the test needs two scans with different values"
    assert len(_folders(ckpt)) == 2
    # and each resumes its own: re-running a reads a's numbers back
    assert torch.equal(_scan(a[0], a[1], a[2], ckpt, **a[3], **kw_both).per_example, ra.per_example)
    return ra, rb


# ----------------------------------------------------------------------------------------------- the metric


def test_logit_diff_with_other_target_and_contrast_tensors(gpt2, tmp_path):
    batch = make_batch(3, 6, seed=1)
    a = LogitDiff(target=torch.tensor(3), contrast=torch.tensor(4))  # token ids as (0-dim) tensors
    b = LogitDiff(target=torch.tensor(3), contrast=torch.tensor(5))
    assert repr(a) == repr(b)  # what the old fingerprint saw of them
    _second_computes_its_own(tmp_path, (gpt2, batch, a, {}), (gpt2, batch, b, {}))


def test_two_lambdas(gpt2, tmp_path):
    batch = make_batch(3, 6, seed=2)
    _second_computes_its_own(tmp_path, (gpt2, batch, lambda logits: logits[:, -1, 3], {}),
                             (gpt2, batch, lambda logits: logits[:, -1, 4], {}))


def _metric_reading(token):
    def metric(logits):
        return logits[:, -1, token]
    return metric


def test_two_functions_named_metric(gpt2, tmp_path):
    batch = make_batch(3, 6, seed=3)

    def metric(logits):  # noqa: F811 - the point: two functions with one name
        return logits[:, -1, 5]
    first = metric

    def metric(logits):  # noqa: F811
        return logits[:, -1, 6].exp()

    assert first.__name__ == metric.__name__ == "metric"
    _second_computes_its_own(tmp_path, (gpt2, batch, first, {}), (gpt2, batch, metric, {}))


def test_same_code_other_closure(gpt2, tmp_path):
    batch = make_batch(3, 6, seed=4)
    a, b = _metric_reading(7), _metric_reading(8)
    assert a.__code__ is b.__code__
    _second_computes_its_own(tmp_path, (gpt2, batch, a, {}), (gpt2, batch, b, {}))


def test_callable_metric_named_acc_around_different_functions(gpt2, tmp_path):
    batch = make_batch(3, 6, seed=5)
    a = CallableMetric(lambda logits: (logits[:, -1].argmax(-1) == 3).float() + logits[:, -1, 3], name="acc")
    b = CallableMetric(lambda logits: (logits[:, -1].argmax(-1) == 4).float() + logits[:, -1, 4], name="acc")
    assert repr(a) == repr(b)
    _second_computes_its_own(tmp_path, (gpt2, batch, a, {}), (gpt2, batch, b, {}))


_SCALE = torch.tensor(1.0)


def _scaled(logits):
    return logits[:, -1, 2] * _SCALE


def test_a_global_the_metric_reads_is_hashed_by_value(gpt2, tmp_path):
    global _SCALE
    batch = make_batch(3, 6, seed=6)
    ckpt = tmp_path / "ck"
    ra = _scan(gpt2, batch, _scaled, ckpt)
    try:
        _SCALE = torch.tensor(3.0)
        rb = _scan(gpt2, batch, _scaled, ckpt)
        own = _scan(gpt2, batch, _scaled)
    finally:
        _SCALE = torch.tensor(1.0)
    assert torch.equal(rb.per_example, own.per_example) and not torch.equal(rb.per_example, ra.per_example)


def test_a_metric_subclass_hashes_its_code_and_state(gpt2, tmp_path):
    class Picked(headint.metrics.Metric):
        position = "last"

        def __init__(self, k):
            self.k = k

        def __call__(self, logits, batch, clean_logits=None):
            return logits[:, self.k]

    batch = make_batch(3, 6, seed=7)
    _second_computes_its_own(tmp_path, (gpt2, batch, Picked(1), {}), (gpt2, batch, Picked(2), {}))


# ----------------------------------------------------------------------------------------------- inputs


def test_other_mean_inputs(gpt2, tmp_path):
    batch = make_batch(3, 6, seed=8)
    m1, m2 = make_batch(4, 6, seed=9)["input_ids"], make_batch(4, 6, seed=10)["input_ids"]
    _second_computes_its_own(tmp_path, (gpt2, batch, "logit_diff", dict(mean_inputs=m1)),
                             (gpt2, batch, "logit_diff", dict(mean_inputs=m2)), method="mean")


def test_other_batch_entries_the_metric_reads(gpt2, tmp_path):
    batch = make_batch(3, 6, seed=11)
    other = dict(batch, target=batch["contrast"], contrast=batch["target"])
    _second_computes_its_own(tmp_path, (gpt2, batch, "logit_diff", {}), (gpt2, other, "logit_diff", {}))


# ----------------------------------------------------------------------------------------------- the model


def test_weights_permuted_between_heads_same_sums(tmp_path):
    a, b = tiny_gpt2(), tiny_gpt2()
    D = 8  # head dim of the tiny GPT-2 (32 / 4 heads)
    with torch.no_grad():  # swap the query columns of heads 0 and 1 of layer 0: every sum unchanged
        w = b.transformer.h[0].attn.c_attn.weight
        w[:, :D], w[:, D:2 * D] = w[:, D:2 * D].clone(), w[:, :D].clone()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.double().sum(), q.double().sum()), n
    batch = make_batch(3, 6, seed=12)
    _second_computes_its_own(tmp_path, (a, batch, "logit_diff", {}), (b, batch, "logit_diff", {}))


def test_same_weights_other_scale_attn_weights(tmp_path):
    from transformers import GPT2LMHeadModel

    a = tiny_gpt2()
    b = GPT2LMHeadModel(type(a.config)(**dict(a.config.to_dict(), scale_attn_weights=False))).eval()
    b.load_state_dict(a.state_dict())
    batch = make_batch(3, 6, seed=13)
    _second_computes_its_own(tmp_path, (a, batch, "logit_diff", {}), (b, batch, "logit_diff", {}))


def test_same_weights_other_rope_theta(tmp_path):
    from transformers import LlamaForCausalLM

    a = tiny_llama()
    cfg = a.config.to_dict()
    cfg["rope_parameters"] = dict(a.config.rope_parameters, rope_theta=100.0)
    b = LlamaForCausalLM(type(a.config)(**cfg)).eval()
    b.load_state_dict(a.state_dict())
    assert b.config.rope_parameters["rope_theta"] != a.config.rope_parameters["rope_theta"]
    batch = make_batch(3, 6, seed=14)
    _second_computes_its_own(tmp_path, (a, batch, "logit_diff", {}), (b, batch, "logit_diff", {}))


def test_a_buffer_alone_differs(tmp_path):
    """Same parameters and config, one buffer changed (rotary frequencies)."""
    a, b = tiny_llama(), tiny_llama()
    with torch.no_grad():
        b.model.rotary_emb.inv_freq.mul_(2.0)
    batch = make_batch(3, 6, seed=15)
    _second_computes_its_own(tmp_path, (a, batch, "logit_diff", {}), (b, batch, "logit_diff", {}))


def test_a_forward_hook_on_the_model_counts(tmp_path):
    a, b = tiny_gpt2(), tiny_gpt2()
    b.transformer.h[1].mlp.register_forward_hook(lambda _m, _a, out: out * 0.5)
    batch = make_batch(3, 6, seed=16)
    _second_computes_its_own(tmp_path, (a, batch, "logit_diff", {}), (b, batch, "logit_diff", {}))


def _chunk_files(ckpt: Path) -> dict:
    """``{path: (inode, mtime)}`` of every chunk file: a rewritten chunk gets a new inode."""
    return {str(f): (f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(ckpt.rglob("chunk-*.pt"))}


def test_the_same_scan_on_an_equal_model_object_resumes(tmp_path):
    """The fingerprint is of contents, not of objects: a new model object with the same weights
    and a new but equal metric resume the finished scan and recompute nothing."""
    batch = make_batch(3, 6, seed=17)
    ckpt = tmp_path / "ck"
    first = _scan(tiny_gpt2(), batch, _metric_reading(3), ckpt)
    files = _chunk_files(ckpt)
    assert files
    again = _scan(tiny_gpt2(), batch, _metric_reading(3), ckpt)
    assert _chunk_files(ckpt) == files and torch.equal(again.per_example, first.per_example)
    assert len(_folders(ckpt)) == 1


# ----------------------------------------------------------------------------------------------- refusals and keys


_GEN = torch.Generator().manual_seed(0)


def _noisy(logits):
    return logits[:, -1, 1] + torch.rand(logits.shape[0], generator=_GEN)


def test_an_opaque_callable_is_refused_naming_it(gpt2, tmp_path):
    batch = make_batch(3, 6, seed=18)
    with pytest.raises(FingerprintError, match=r"cannot be hashed: global '_GEN' read by _noisy.*Generator.*checkpoint_key="):
        _scan(gpt2, batch, _noisy, tmp_path / "ck")
    assert not (tmp_path / "ck").exists() or _folders(tmp_path / "ck") == []
    assert issubclass(FingerprintError, CheckpointError)  # the CLI's one-line error path catches it


def test_checkpoint_key_vouches_for_what_cannot_be_hashed(gpt2, tmp_path):
    batch = make_batch(3, 6, seed=19)
    ckpt = tmp_path / "ck"
    metric = lambda logits: logits[:, -1, 1] * float(_GEN.initial_seed() + 1)  # noqa: E731 - reads the generator
    r1 = _scan(gpt2, batch, metric, ckpt, checkpoint_key="run-1")
    r2 = _scan(gpt2, batch, metric, ckpt, checkpoint_key="run-2")
    assert torch.equal(r1.per_example, r2.per_example) and len(_folders(ckpt)) == 2
    # the key adds to the hash of what can be hashed: another model under the same key is another scan
    other = tiny_gpt2(seed=1)
    r3 = _scan(other, batch, metric, ckpt, checkpoint_key="run-1")
    assert torch.equal(r3.per_example, _scan(other, batch, metric).per_example) and len(_folders(ckpt)) == 3
    with pytest.raises(TypeError, match="checkpoint_key must be a non-empty string"):
        _scan(gpt2, batch, metric, ckpt, checkpoint_key="  ")


def test_checkpoint_key_without_checkpoint_is_an_error(gpt2):
    with pytest.raises(ValueError, match="checkpoint_key= names a checkpoint"):
        _scan(gpt2, make_batch(3, 6, seed=20), "logit_diff", checkpoint_key="x")


def test_no_fingerprint_without_checkpoint(gpt2, monkeypatch):
    """Hashing costs a pass over the weights: only a checkpointed scan pays it."""
    import headint.scans.fingerprint as fp

    def boom(*a, **k):
        raise AssertionError("fingerprint computed without checkpoint=")

    monkeypatch.setattr(fp, "fingerprint", boom)
    _scan(gpt2, make_batch(3, 6, seed=21), _noisy)  # an unhashable metric is fine without a checkpoint


# ----------------------------------------------------------------------------------------------- offloaded weights


def _offloaded(tmp_path, name="offload"):
    accelerate = pytest.importorskip("accelerate")
    model = tiny_gpt2()
    accelerate.disk_offload(model, str(tmp_path / name), execution_device=torch.device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    return model


def test_disk_offloaded_model_scans_without_checkpoint(gpt2, tmp_path):
    model = _offloaded(tmp_path)
    batch = make_batch(3, 6, seed=22)
    got = _scan(model, batch, "logit_diff")
    ref = _scan(gpt2, batch, "logit_diff")
    torch.testing.assert_close(got.per_example, ref.per_example, atol=1e-5, rtol=1e-5)
    assert {p.device.type for p in model.parameters()} == {"meta"}  # still offloaded


def test_disk_offloaded_model_checkpoint_hashes_the_offloaded_values(tmp_path):
    batch = make_batch(3, 6, seed=23)
    a, b = _offloaded(tmp_path, "a"), _offloaded(tmp_path, "b")
    assert fingerprint(a, LogitDiff(), [batch], {}) == fingerprint(b, LogitDiff(), [batch], {})
    ckpt = tmp_path / "ck"
    first = _scan(a, batch, "logit_diff", ckpt)
    files = _chunk_files(ckpt)
    again = _scan(b, batch, "logit_diff", ckpt)  # the same weights offloaded elsewhere: the same scan, resumed
    assert _chunk_files(ckpt) == files and torch.equal(again.per_example, first.per_example)
    # other offloaded weights: another scan
    c = tiny_gpt2(seed=3)
    import accelerate

    accelerate.disk_offload(c, str(tmp_path / "c"), execution_device=torch.device("cpu"))
    assert fingerprint(c, LogitDiff(), [batch], {}) != fingerprint(a, LogitDiff(), [batch], {})


def test_meta_weights_without_an_offload_hook_are_refused(tmp_path):
    model = tiny_gpt2()
    with torch.device("meta"):
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight, device="meta"))
    with pytest.raises(FingerprintError, match=r"parameter lm_head.weight \(on the meta device"):
        fingerprint(model, LogitDiff(), [make_batch(3, 6, seed=24)], {})
    assert isinstance(fingerprint(model, LogitDiff(), [make_batch(3, 6, seed=24)], {}, key="my weights v1"), str)


# ----------------------------------------------------------------------------------------------- the encoding itself


@pytest.mark.parametrize("x, y", [
    (1, 1.0), (True, 1), ("1", 1), ([1, 2], (1, 2)), (float("nan"), float("inf")), (0.0, -0.0),
    (torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int64)),
    (torch.zeros(2, 3), torch.zeros(3, 2)), ({"a": 1}, {"a": 2}), ({"a": 1, "b": 2}, {"ab": 1, "": 2}),
    (torch.arange(2000), torch.arange(2000).flip(0).flip(0).clone().index_fill_(0, torch.tensor([1000]), 7)),
])
def test_distinct_values_give_distinct_digests(x, y):
    m = tiny_gpt2()
    assert fingerprint(m, LogitDiff(), [], {"x": x}) != fingerprint(m, LogitDiff(), [], {"x": y})


def test_equal_values_give_equal_digests():
    m = tiny_gpt2()
    s1 = {"b": [1, 2.5, None], "a": torch.arange(5), "c": {"z": "q"}}
    s2 = {"c": {"z": "q"}, "a": torch.arange(5).clone(), "b": [1, 2.5, None]}
    assert fingerprint(m, LogitDiff(), [], s1) == fingerprint(m, LogitDiff(), [], s2)


def test_hashing_reads_weights_not_parameter_objects():
    """Contents, not identity: an in-place edit that keeps the sum changes the digest."""
    m = tiny_gpt2()
    before = fingerprint(m, LogitDiff(), [], {})
    with torch.no_grad():
        w = m.transformer.h[2].mlp.c_fc.weight
        w[0, 0], w[0, 1] = w[0, 1].clone(), w[0, 0].clone()
    assert fingerprint(m, LogitDiff(), [], {}) != before


def test_lambdas_on_one_line_with_equal_code_are_equal():
    """Line numbers are not part of a function's identity (editing above it keeps the checkpoint)."""
    m = tiny_gpt2()
    f = eval("lambda logits: logits[:, -1, 0]")
    g = eval("\n\n\nlambda logits: logits[:, -1, 0]")
    assert fingerprint(m, CallableMetric(f), [], {}) == fingerprint(m, CallableMetric(g), [], {})


def test_hashing_warns_nothing_and_leaves_grad_flags():
    m = tiny_gpt2()
    flags = [p.requires_grad for p in m.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fingerprint(m, LogitDiff(), [make_batch(2, 4, seed=1)], {"x": 1})
    assert [p.requires_grad for p in m.parameters()] == flags


class _Probe:
    """A callable object: its behaviour is its class's code and its state."""

    def __init__(self, w):
        self.w = w

    def __call__(self, logits):
        return logits[:, -1] @ self.w


def test_callable_objects_partials_and_bound_methods_hash_their_state():
    import functools

    m = tiny_gpt2()

    def fp(f):
        return fingerprint(m, CallableMetric(f), [], {})

    assert fp(_Probe(torch.ones(50))) == fp(_Probe(torch.ones(50)))
    assert fp(_Probe(torch.ones(50))) != fp(_Probe(torch.arange(50.0)))
    assert fp(functools.partial(lambda logits, k: logits[:, -1, k], k=1)) != fp(functools.partial(lambda logits, k: logits[:, -1, k], k=2))
    assert fp(_Probe(torch.ones(50)).__call__) != fp(_Probe(torch.zeros(50)).__call__)


def test_a_metric_holding_a_tokenizer_like_c_object_is_refused():
    m = tiny_gpt2()
    lock = __import__("threading").Lock()
    with pytest.raises(FingerprintError, match=r"closure variable 'lock'.*lock"):
        fingerprint(m, CallableMetric(lambda logits: logits[:, -1, 0] if lock else None), [], {})
