"""The pieces of the tensor-parallel head mapping and of device placement, in one process:
``CallPlan.for_heads`` (a rank's slice of a plan over global heads), ``CallPlan.to`` (a plan on
the attention call's device) and ``head_shard`` outside a process group."""

from __future__ import annotations

import pytest
import torch

from headint.distributed import data_parallel_ranks, head_shard, is_active
from headint.interventions.edits import CallPlan, Replacement
from headint.ops import EdgeKnockout

B, H, HKV, TQ, TK, D = 2, 4, 2, 3, 5, 8


def full_plan() -> CallPlan:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    b = lambda *s: torch.rand(*s, generator=g) > 0.5  # noqa: E731
    return CallPlan(head_mask=r(B, H, TQ), head_patch=r(1, H, TQ, D), head_bias=r(B, H, TQ, D), score_scale=r(B, H),
                    knockouts=[EdgeKnockout(b(B, H, TQ), b(B, 1, TK))],
                    q_edit=Replacement(b(B, H, TQ), r(B, H, TQ, D)), k_edit=Replacement(b(B, HKV, TK), r(B, HKV, TK, D)))


def tensors(p: CallPlan) -> list:
    out = [p.head_mask, p.head_patch, p.head_bias, p.score_scale]
    out += [t for ko in p.knockouts for t in (ko.queries, ko.keys)]
    return out + [t for e in (p.q_edit, p.k_edit) for t in e]


@pytest.mark.parametrize("world", [1, 2])
def test_rank_slices_put_back_together_are_the_plan(world):
    """Every rank's slice, concatenated over ranks on the head dim, is the full plan; head
    dims of 1 (broadcast) stay whole."""
    plan = full_plan()
    nq, nkv = H // world, HKV // world
    parts = [plan.for_heads(slice(r * nq, (r + 1) * nq), slice(r * nkv, (r + 1) * nkv), H) for r in range(world)]
    for p in parts:
        assert p.head_mask.shape == (B, nq, TQ) and p.score_scale.shape == (B, nq)
        assert p.knockouts[0].keys.shape == (B, 1, TK), "a broadcast head dim must not be sliced"
        assert p.k_edit.select.shape == (B, nkv, TK), "k edits slice key/value heads"
    whole = tensors(plan)
    for i, t in enumerate(whole):
        pieces = [tensors(p)[i] for p in parts]
        joined = pieces[0] if t.shape[1] == 1 else torch.cat(pieces, dim=1)
        assert torch.equal(joined, t), f"tensor {i}"


def test_rank_slice_is_its_own_heads():
    plan = full_plan()
    p = plan.for_heads(slice(2, 4), slice(1, 2), H)
    assert torch.equal(p.head_mask, plan.head_mask[:, 2:4])
    assert torch.equal(p.q_edit.values, plan.q_edit.values[:, 2:4])
    assert torch.equal(p.k_edit.values, plan.k_edit.values[:, 1:2])


def test_knockout_with_index_selectors_refused_under_tensor_parallelism():
    plan = CallPlan(knockouts=[EdgeKnockout(1, [0, 2])])
    with pytest.raises(ValueError, match="tensor-parallel call needs knockouts parts as"):
        plan.for_heads(slice(0, 2), slice(0, 1), H)


def test_plan_follows_the_call_device():
    plan = full_plan()
    assert plan.to("cpu") is plan, "no copy when everything is already there"
    moved = plan.to("meta")
    assert all(t.device.type == "meta" for t in tensors(moved))
    assert all(t.device.type == "cpu" for t in tensors(plan)), "the original plan is left as it was"
    assert moved.q_edit is not None and moved.v_edit is None and len(moved.knockouts) == 1


def test_no_process_group_no_mapping():
    from torch import nn

    assert not is_active()
    module = nn.Linear(2, 2)
    assert head_shard(module, H, HKV, H, HKV) is None
    assert head_shard(module, H // 2, HKV // 2, H, HKV) is None, "fewer heads without tensor parallelism is left to the shape checks"
    assert data_parallel_ranks("auto", module, "x") is None and data_parallel_ranks(False, module, "x") is None
