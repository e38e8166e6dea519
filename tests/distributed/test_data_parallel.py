"""Scans split over two gloo processes (``headint.scans.distributed``): every rank returns the
ScanResult of a single process, bit for bit; checkpoints are written by the rank that computed
each chunk and resume across world sizes; a failing rank fails the job with its rank and error."""

from __future__ import annotations

import pytest
import torch

import dist_jobs
from dist_jobs import Counting, resume_scan, scan_suite, summary
from launch import check_ok, run_ranks

WORLD = 2


def bits(x: torch.Tensor) -> torch.Tensor:
    """The float32 tensor's bit patterns (NaN cells of unscanned layers compare equal)."""
    return x.float().contiguous().view(torch.int32)


def assert_same(a: dict, b: dict, what: str) -> None:
    """Bit-identical values and the same table layout and settings."""
    assert torch.equal(bits(a["per_example"]), bits(b["per_example"])), f"{what}: per-example values differ"
    assert torch.equal(bits(a["base"]), bits(b["base"])), f"{what}: base values differ"
    for k in ("axes", "labels", "metric", "clean", "corrupt", "settings"):
        assert a[k] == b[k], f"{what}: {k} differs: {a[k]!r} vs {b[k]!r}"


@pytest.fixture(scope="module")
def single():
    return scan_suite(distributed=False)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    return check_ok(run_ranks("data_parallel", WORLD, root, ckpt_root=str(root))), root


@pytest.mark.parametrize("name", ["exact", "per_position", "checkpointed", "attribution", "attribution_mask", "path"])
def test_every_rank_returns_the_single_process_result(single, ranks, name):
    results, _ = ranks
    for r, res in enumerate(results):
        assert_same(res[name], single[name], f"{name} on rank {r}")
        assert res[name]["world"] == WORLD, "the result does not say it was split"
    assert not torch.isnan(single[name]["per_example"]).all()


def test_values_are_not_trivial(single):
    """The scans measure something: effects differ between heads (a scan of a constant would
    match in any split)."""
    for name in ("exact", "per_position", "attribution", "path"):
        v = single[name]["per_example"]
        assert v[~torch.isnan(v)].std() > 1e-3, name


def test_checkpoint_chunks_written_once_by_their_ranks(ranks):
    results, root = ranks
    files = results[0]["chunk_files"]
    assert files == results[1]["chunk_files"]
    assert len(files) >= 4 and len(set(files)) == len(files)
    assert len(list((root / "mean").glob("*/*.tmp-*"))) == 0, "a temporary file was left behind"


def test_distributed_argument_checked():
    from scan_oracles import make_batch, tiny_gpt2

    model, batch = tiny_gpt2(), make_batch(2, 5)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="distributed must be 'auto', True or False"):
            dist_jobs.headint.scan(model, batch, "logprob", progress=False, distributed=bad)
    with pytest.raises(ValueError, match="distributed=True needs an initialised torch.distributed process group"):
        dist_jobs.headint.attribution_scan(model, batch, None, "logprob", method="mask", distributed=True)


def test_resume_across_world_sizes_and_failing_rank(tmp_path):
    """A: rank 1 fails mid-scan -> both ranks raise (rank 0 names rank 1 and its error) and the
    finished chunks stay on disk; B: two ranks resume A; C: two ranks resume what one process
    left; then one process resumes A's copy; D: a rank failing before any chunk. Every
    resumed result equals the uninterrupted single-process one, and computes only what is missing."""
    with Counting() as c:
        full = summary(resume_scan(None, distributed=False))
        n_chunks = c.calls
    assert n_chunks >= 8
    with Counting(fail_after=3):  # one process killed after 3 chunks
        with pytest.raises(RuntimeError, match="simulated failure"):
            resume_scan(tmp_path / "single", distributed=False)
    results = check_ok(run_ranks("interrupted_and_resumed", WORLD, tmp_path, root=str(tmp_path)))

    r0, r1 = results
    assert r1["A_error"] == ("RuntimeError", "simulated failure in a chunk")
    assert r0["A_error"][0] == "RankFailed"
    assert "rank 1 of 2 failed" in r0["A_error"][1] and "simulated failure in a chunk" in r0["A_error"][1]
    assert r1["A_computed"] == 2
    done_a = len(r0["A_files"])
    assert 2 < done_a < n_chunks, "the failure should leave a partial checkpoint"
    for res in results:
        assert_same(res["B"], full, "two ranks resuming two ranks' checkpoint")
        assert_same(res["C"], full, "two ranks resuming one process's checkpoint")
    assert r0["B_computed"] + r1["B_computed"] == n_chunks - done_a
    assert r0["C_computed"] + r1["C_computed"] == n_chunks - 3
    assert min(r0["B_computed"], r1["B_computed"]) >= 1, "the rest is not shared between the ranks"

    with Counting() as c:
        resumed = summary(resume_scan(tmp_path / "a-copy", distributed=False))
    assert_same(resumed, full, "one process resuming two ranks' checkpoint")
    assert c.calls == n_chunks - done_a

    assert r1["D_error"] == ("ValueError", "simulated failure in the clean pass")
    assert r0["D_error"][0] == "RankFailed" and "rank 1 of 2 failed: ValueError: simulated failure in the clean pass" in r0["D_error"][1]
