"""Backward conformance: every backend's gradients of q, k, v, head_mask (every accepted shape),
head_patch, score_scale and sinks (with soft-capping and value head dims != D too) against the float64 reference's autograd, through
``headint.attention(..., backend=...)`` (the fused op's registered autograd for the kernels)."""

from __future__ import annotations

import pytest
import torch

from attention_cases import Case, compare_case
from conformance import backend_params

F16, BF16 = torch.float16, torch.bfloat16

# B, Hq, Hkv, Tq, Tk, D
GQA2_ODD = (2, 2, 1, 19, 37, 32)
GQA4 = (1, 4, 1, 21, 18, 80)
SQUARE = (1, 2, 2, 33, 33, 64)
DECODE = (2, 4, 2, 1, 29, 16)
MHA_D96 = (1, 2, 2, 17, 26, 96)
GQA2_4 = (2, 4, 2, 19, 23, 16)  # Hq = 4, Hkv = 2: the head -> KV-head mapping matters for dK / dV too
SMALL = {"gqa2_odd": GQA2_ODD, "gqa4": GQA4, "square": SQUARE, "decode": DECODE, "mha_d96": MHA_D96,
         "gqa2_4": GQA2_4}
LARGE = {
    "l_tiny": (1, 2, 2, 1, 1, 16),
    "l_gqa2": (2, 4, 2, 37, 53, 64),
    "l_gqa4": (1, 4, 1, 65, 130, 80),
    "l_tq_gt_tk": (2, 2, 2, 130, 64, 16),
    "l_decode": (1, 8, 2, 1, 200, 64),
}


def case(name, shape, **kw) -> Case:
    return Case(name, *shape, **kw)


PLAIN = [case(f"plain-{n}-{'causal' if c else 'full'}", s, causal=c)
         for n, s in {**SMALL, **LARGE}.items() for c in (False, True)]

FEATURES = [
    case("hm_h", GQA2_ODD, head_mask="h", head_mask_values="unit"),
    case("hm_bh+patch_hd-causal", GQA2_ODD, head_mask="bh", head_patch="hd", causal=True),
    case("hm_bhq+patch_bhqd-causal", GQA4, head_mask="bhq", head_mask_values="unit", head_patch="bhqd", causal=True),
    case("hm_bhq+patch_hqd-window6", SQUARE, head_mask="bhq", head_mask_values="unit", head_patch="hqd", window=6),
    case("hm_bhq1+patch_hqd-gqa", GQA2_4, head_mask="bhq1", head_patch="hqd", causal=True),
    case("ko_pair-causal", GQA2_ODD, knockout=("pair",), causal=True),
    case("ko_pair+rows", GQA4, knockout=("pair", "rows")),
    case("ko_perhead+bcast-gqa", GQA2_4, knockout=("perhead", "bcast"), causal=True),
    case("ss_h", GQA2_ODD, score_scale="h"),
    case("ss_bh-causal", GQA4, score_scale="bh", causal=True),
    case("ss_bh-scale0.3-gqa", GQA2_4, score_scale="bh", scale=0.3),
    case("pad", GQA2_ODD, mask="pad"),
    case("pad+hm+patch-decode-causal", DECODE, mask="pad", head_mask="bh", head_patch="hd", causal=True),
    case("add_bhqk-causal", SQUARE, mask="add:bhqk", causal=True),
    case("add_qk+ss_h", MHA_D96, mask="addf:qk", score_scale="h"),
    case("bool_b11k-gqa-causal", GQA2_4, mask="bool:b11k", causal=True),
    case("holes-bool-gqa", GQA2_4, mask="holes:b1qk", head_mask="bh", head_patch="hd"),
    case("window4-causal", SQUARE, causal=True, window=4),
    case("window8", GQA2_ODD, window=8),
    case("hm_zero+patch_hd-causal", SQUARE, head_mask="bh", head_mask_values="zero", head_patch="hd", causal=True),
    case("hm_one", SQUARE, head_mask="h", head_mask_values="one"),
    case("hm_scalar+bthd+ko_every3rd", (2, 4, 2, 18, 26, 32), head_mask="bh", head_mask_values="scalar",
         layout="bthd", knockout=("every3rd",), causal=True),
    case("everything-causal-window10", GQA2_ODD, knockout=("pair", "rows"), score_scale="bh", mask="add:bhqk",
         head_mask="bhq", head_patch="bhqd", causal=True, window=10),
    case("everything-pad-window7", GQA4, mask="pad", knockout=("pair",), score_scale="h", head_mask="h",
         head_mask_values="unit", head_patch="hqd", window=7),
    case("everything-gqa-bthd", GQA2_4, mask="bool:b1qk", knockout=("perhead",), score_scale="bh", head_mask="bhq",
         head_patch="bhqd", layout="bthd", causal=True, window=9),
    case("dense_ko+hm_bh-causal", MHA_D96, knockout=("dense",), head_mask="bh", causal=True),
    case("deadrows+hm+ss-causal", GQA2_4, knockout=("deadrows",), head_mask="bhq", head_patch="bhqd",
         score_scale="bh", causal=True),
    case("ko_all+hm+patch", (2, 2, 2, 20, 20, 16), knockout=("all",), head_mask="bh", head_patch="hd"),
    case("tq>tk+ss-causal", (1, 2, 1, 24, 19, 32), score_scale="h", causal=True),
    case("no_keys+hm+patch", (2, 2, 1, 5, 0, 16), head_mask="bh", head_patch="hd"),
    case("d256+hm+ko-causal", (1, 2, 1, 9, 13, 256), head_mask="bh", knockout=("pair",), causal=True),
    case("d128+hm+patch+ss-causal", (1, 2, 1, 18, 21, 128), head_mask="bhq", head_patch="bhqd", score_scale="h",
         causal=True),
    case("d256+hm+patch+ss-causal", (1, 2, 1, 18, 21, 256), head_mask="bhq", head_patch="bhqd", score_scale="h",
         causal=True),
]

LOW_PRECISION = [
    c.but(dtype=dt)
    for dt in (F16, BF16)
    for c in (
        case("lp-plain-causal", GQA2_ODD, causal=True),
        case("lp-hm+patch+ko+ss", GQA4, head_mask="bhq", head_mask_values="unit", head_patch="bhqd",
             knockout=("pair",), score_scale="h"),
        case("lp-gqa-pad+hm+patch", GQA2_4, mask="pad", head_mask="bh", head_patch="hd", causal=True),
        case("lp-large-causal", (2, 4, 2, 83, 92, 64), causal=True),
        case("lp-large-everything", (2, 4, 2, 83, 92, 64), knockout=("one",), head_mask="bhq", head_mask_values="unit",
             head_patch="hd", score_scale="h", mask="bool:11qk"),
    )
]

LARGE_FEATURES = (
    [case(f"l_gqa{g}-d{d}-ss_bh-causal", (2, 4, 4 // g, 70, 75, d), score_scale="bh", causal=True)
     for g in (1, 2, 4) for d in (16, 64, 80)]
    + [case(f"l_window{w}-{tq}x{tk}-{'causal' if c else 'full'}", (1, 2, 1, tq, tk, 16), window=w, causal=c)
       for c in (False, True) for tq, tk, w in ((100, 100, 7), (70, 150, 33), (1, 90, 10), (150, 80, 65))]
    + [
        case("l_bool_b11k-causal", (2, 4, 2, 75, 75, 64), mask="bool:b11k", causal=True),
        case("l_bool_1hqk", (2, 4, 2, 75, 75, 64), mask="bool:1hqk"),
        case("l_add_k-causal", (2, 4, 2, 75, 75, 64), mask="addf:k", causal=True),
        case("l_add_b1qk-fp16mask", (2, 4, 2, 75, 75, 64), mask="addf:b1qk", mask_dtype=F16),
        case("l_ko_union-causal", (2, 4, 2, 97, 97, 64), knockout=("perhead", "bcast"), causal=True),
        case("l_ko_perhead-window30", (2, 4, 2, 97, 97, 64), knockout=("perhead",), window=30),
        case("l_everything", (2, 8, 2, 66, 129, 80), causal=True, window=100, mask="addf:b1qk",
             knockout=("perhead",), head_mask="bhq", head_mask_values="unit", head_patch="bhqd", score_scale="bh"),
        case("l_deadrows+hm+ss-causal", (2, 2, 2, 70, 70, 16), knockout=("deadrows",), head_mask="h",
             head_mask_values="unit", score_scale="h", causal=True),
        case("l_ko_all+hm+patch", (2, 2, 2, 70, 70, 16), knockout=("all",), head_mask="bh", head_mask_values="unit",
             head_patch="hd"),
        case("l_tq>tk-causal", (1, 2, 2, 90, 30, 16), causal=True),
    ]
    + [case(f"l_hm_{hm}-patch_{p}", (2, 4, 2, 67, 67, 64), head_mask=hm, head_patch=p, causal=True)
       for hm in ("h", "bh", "bhq") for p in (None, "hd", "bhqd")]
)


# ---- soft-capping, sinks (their gradient too), a value head dim != the query/key one ---------------
VDIM = (2, 4, 2, 19, 23, 24)
SOFTCAP_SINKS_VDIM = [
    case("sc1-causal", GQA2_ODD, softcap=1.0, causal=True),
    case("sc0.5+ss_bh+add_bhqk", GQA2_4, softcap=0.5, score_scale="bh", mask="add:bhqk"),
    case("sc2+ko_pair+rows+hm+patch-causal", GQA4, softcap=2.0, knockout=("pair", "rows"), head_mask="bhq",
         head_mask_values="unit", head_patch="bhqd", causal=True),
    case("sc3-window4-decode", DECODE, softcap=3.0, causal=True, window=4),
    case("sinks_h", GQA2_ODD, sinks="h"),
    case("sinks_bh-causal", GQA2_4, sinks="bh", causal=True),
    case("sinks_big+pad+hm+patch-decode", DECODE, sinks="big", mask="pad", head_mask="bh", head_patch="hd",
         causal=True),
    case("sinks_h+ko_deadrows+ss-causal", GQA2_4, sinks="h", knockout=("deadrows",), score_scale="bh", causal=True),
    case("sinks_bh+ko_all+hm+patch", (2, 2, 2, 20, 20, 16), sinks="bh", knockout=("all",), head_mask="bh",
         head_patch="hd"),
    case("sinks_h-no_keys+hm+patch", (2, 2, 1, 5, 0, 16), sinks="h", head_mask="bh", head_patch="hd"),
    case("vdim12-causal", VDIM, Dv=12, causal=True),
    case("vdim12+hm_bhq+patch_bhqd+ss", VDIM, Dv=12, head_mask="bhq", head_patch="bhqd", score_scale="h"),
    case("vdim64-d16+ko+window6", (1, 2, 2, 17, 26, 16), Dv=64, knockout=("perhead",), window=6),
    case("vdim96-d32+pad-decode", (2, 4, 2, 1, 29, 32), Dv=96, mask="pad", causal=True),
    case("vdim16-d128+bthd", (1, 2, 1, 18, 21, 128), Dv=16, layout="bthd", causal=True),
    case("all3-everything-causal-window10", VDIM, Dv=12, softcap=2.0, sinks="bh", knockout=("pair", "rows"),
         score_scale="bh", mask="add:bhqk", head_mask="bhq", head_patch="bhqd", causal=True, window=10),
]
LARGE_SOFTCAP_SINKS_VDIM = [
    case("l_sc2+ss_bh-causal", (2, 4, 2, 70, 75, 64), softcap=2.0, score_scale="bh", causal=True),
    case("l_sinks_bh+deadrows+hm-causal", (2, 2, 2, 70, 70, 16), sinks="bh", knockout=("deadrows",), head_mask="h",
         head_mask_values="unit", causal=True),
    case("l_vdim40-d80-decode", (1, 8, 2, 1, 200, 80), Dv=40, causal=True),
    case("l_all3-everything", (2, 8, 2, 66, 129, 80), Dv=24, softcap=3.0, sinks="h", causal=True, window=100,
         mask="addf:b1qk", knockout=("perhead",), head_mask="bhq", head_mask_values="unit", head_patch="bhqd",
         score_scale="bh"),
]
LOW_PRECISION_SOFTCAP_SINKS_VDIM = [
    c.but(dtype=dt)
    for dt in (F16, BF16)
    for c in (
        case("lp-sc2+sinks_h+vdim40-causal", GQA2_ODD, softcap=2.0, sinks="h", Dv=40, causal=True),
        case("lp-sc1+sinks_bh+hm+patch+ko", GQA4, softcap=1.0, sinks="bh", head_mask="bhq", head_mask_values="unit",
             head_patch="bhqd", knockout=("pair",), score_scale="h"),
    )
]


@pytest.mark.parametrize("backend,case", backend_params(PLAIN + FEATURES + LARGE_FEATURES, grads=True))
def test_backward_fp32(backend, case):
    compare_case(case, backend, grads=True)


@pytest.mark.parametrize("backend,case", backend_params(LOW_PRECISION, grads=True))
def test_backward_low_precision(backend, case):
    compare_case(case, backend, grads=True)


@pytest.mark.parametrize("backend,case", backend_params(SOFTCAP_SINKS_VDIM + LARGE_SOFTCAP_SINKS_VDIM, grads=True))
def test_backward_softcap_sinks_vdim_fp32(backend, case):
    compare_case(case, backend, grads=True)


@pytest.mark.parametrize("backend,case", backend_params(LOW_PRECISION_SOFTCAP_SINKS_VDIM, grads=True))
def test_backward_softcap_sinks_vdim_low_precision(backend, case):
    compare_case(case, backend, grads=True)
