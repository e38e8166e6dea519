"""Tensor parallelism: interventions, recordings and scans name global heads; headint maps them
to the rank that holds each head (``headint.distributed.head_shard``), gathers recordings to
all heads and slices plans per rank. Checked against the unsharded model on two gloo ranks,
with ``transformers``' own tensor parallelism (DTensor weights, the plan ``tp_plan="auto"``
applies) and with a model sharded by hand the same way (no DTensors)."""

from __future__ import annotations

import pytest
import torch

from launch import check_ok, run_ranks

WORLD = 2
ATOL = 2e-5  # the row-parallel all-reduce sums partial outputs in another order than one matmul


def close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {list(a.shape)} vs {list(b.shape)}"
    assert torch.allclose(a, b, atol=ATOL, rtol=1e-5, equal_nan=True), f"{what}: max diff {(a - b).abs().nan_to_num().max()}"


def compare(reference: dict, sharded: dict, rank: int) -> None:
    assert reference.keys() == sharded.keys()
    for k, ref in reference.items():
        got = sharded[k]
        if k == "record":
            assert ref.keys() == got.keys()
            for name in ref:
                close(got[name], ref[name], f"rank {rank} record {name}")
        elif isinstance(ref, dict):  # a scan summary
            close(got["per_example"], ref["per_example"], f"rank {rank} {k}")
            close(got["base"], ref["base"], f"rank {rank} {k} base")
            assert got["axes"] == ref["axes"] and got["world"] == 1, k
        else:
            close(got, ref, f"rank {rank} intervention {k}")


def check_interventions_matter(reference: dict) -> None:
    """Each intervention changes the logits (a no-op would match any head mapping)."""
    for k, v in reference.items():
        if k not in ("record", "scan", "scan_pos", "attribution", "none"):
            assert (v - reference["none"]).abs().max() > 1e-3, f"{k} changes nothing"


@pytest.fixture(scope="module")
def transformers_tp(tmp_path_factory):
    return check_ok(run_ranks("tensor_parallel", WORLD, tmp_path_factory.mktemp("tp")))


def test_transformers_tensor_parallel_matches_unsharded(transformers_tp):
    for r, res in enumerate(transformers_tp):
        assert res["local_heads"] == 2, "the model was not sharded"
        compare(res["reference"], res["sharded"], r)
    check_interventions_matter(transformers_tp[0]["reference"])


def test_recordings_are_full_on_every_rank(transformers_tp):
    for res in transformers_tp:
        rec = res["sharded"]["record"]
        assert rec["z0"].shape == (3, 6, 4, 8) and rec["k1"].shape == (3, 2, 6, 8) and rec["pattern2"].shape == (3, 4, 6, 6)


def test_distributed_true_refused_for_tensor_parallel(transformers_tp):
    for res in transformers_tp:
        assert res["distributed_true_error"][0] == "ValueError"
        assert "tensor-parallel" in res["distributed_true_error"][1]


def test_hand_sharded_model(tmp_path):
    results = check_ok(run_ranks("tensor_parallel_by_hand", WORLD, tmp_path))
    for r, res in enumerate(results):
        compare(res["reference"], res["sharded"], r)
        name, msg = res["refused"]
        assert name in ("RuntimeError", "RankFailed") and "distributed=False" in msg
