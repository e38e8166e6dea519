"""Forward conformance: every backend's output against the float64 reference, case by case.

Shapes are awkward for every kernel's tiles (the interpreter's 16 x 16, the C++ kernel's 64 x 64):
lengths that are not multiples of the tile, Tq != Tk both ways, decoding (Tq = 1, Tk > Tq),
GQA ratios 1 / 2 / 4, head dims 16 / 32 / 64 / 80 / 96 / 128 / 256, no keys at all (Tk = 0); and
soft-capping, sinks and value head dims != the query/key one, alone and with every other feature.
"""

from __future__ import annotations

import pytest
import torch

from attention_cases import Case, compare_case
from conformance import backend_params

F16, BF16, F64 = torch.float16, torch.bfloat16, torch.float64

# ---- small shapes (B, Hq, Hkv, Tq, Tk, D) ---------------------------------------------------
TINY = (1, 2, 2, 1, 1, 16)
GQA2_ODD = (2, 2, 1, 19, 37, 80)
GQA4_TQ_GT_TK = (1, 4, 1, 33, 17, 32)
SQUARE = (1, 2, 2, 40, 40, 64)
DECODE = (2, 4, 2, 1, 45, 96)
MHA_D16 = (1, 3, 3, 17, 31, 16)
GQA2_4 = (2, 4, 2, 21, 27, 32)  # Hq = 4, Hkv = 2: a wrong head -> KV-head mapping shows here
SMALL = {"tiny": TINY, "gqa2_odd": GQA2_ODD, "gqa4_tq_gt_tk": GQA4_TQ_GT_TK, "square": SQUARE, "decode": DECODE,
         "mha_d16": MHA_D16, "gqa2_4": GQA2_4}

# ---- tile-crossing shapes of the C++ kernel (64-row / 64-key tiles) ---------------------------
LARGE = {
    "l_tiny": (1, 2, 2, 1, 1, 16),
    "l_gqa2": (2, 4, 2, 37, 53, 64),
    "l_gqa4": (1, 4, 1, 65, 130, 80),
    "l_tq_gt_tk": (2, 2, 2, 130, 64, 16),
    "l_decode": (1, 8, 2, 1, 200, 64),
    "l_square": (1, 4, 4, 127, 127, 64),
}


def case(name, shape, **kw) -> Case:
    return Case(name, *shape, **kw)


PLAIN = [case(f"plain-{n}-{'causal' if c else 'full'}", s, causal=c)
         for n, s in {**SMALL, **LARGE}.items() for c in (False, True)]

FEATURES = [
    case("hm_bhq+patch_bhqd-causal", GQA2_ODD, head_mask="bhq", head_patch="bhqd", causal=True),
    case("hm_h", GQA2_ODD, head_mask="h", head_mask_values="unit"),
    case("hm_bh+patch_hd-causal-tq>tk", GQA4_TQ_GT_TK, head_mask="bh", head_patch="hd", causal=True),
    case("hm_bhq+patch_hqd-window7", SQUARE, head_mask="bhq", head_mask_values="unit", head_patch="hqd", window=7),
    case("hm_bhq1+patch_hd-gqa", GQA2_4, head_mask="bhq1", head_patch="hd", causal=True),
    case("hm_bh-patch_bhqd-gqa", GQA2_4, head_mask="bh", head_patch="bhqd"),
    case("ko_pair", GQA2_ODD, knockout=("pair",)),
    case("ko_pair+rows-causal", GQA2_ODD, knockout=("pair", "rows"), causal=True),
    case("ko_pair+hm+patch-decode", DECODE, knockout=("pair",), head_mask="bh", head_patch="hd", causal=True),
    case("ko_perhead+bcast+key0-gqa", GQA2_4, knockout=("perhead", "bcast", "key0"), causal=True),
    case("ko_deadrows-causal", GQA2_4, knockout=("deadrows",), causal=True),
    case("ko_all+hm+patch", GQA2_4, knockout=("all",), head_mask="bh", head_patch="hd"),
    case("ss_h", GQA2_ODD, score_scale="h"),
    case("ss_bh-causal", GQA4_TQ_GT_TK, score_scale="bh", causal=True),
    case("ss_bh-scale0.3-gqa", GQA2_4, score_scale="bh", scale=0.3),
    case("pad", GQA2_ODD, mask="pad"),
    case("pad-decode-causal", DECODE, mask="pad", causal=True),
    case("lens+bthd-causal", GQA2_4, mask="lens", layout="bthd", causal=True),
    case("addpad-decode", DECODE, mask="addpad"),
    case("add_bhqk-causal", GQA2_ODD, mask="add:bhqk", causal=True),
    case("add_qk", MHA_D16, mask="add:qk"),
    case("add_b1qk-gqa", GQA2_4, mask="addf:b1qk", causal=True),
    case("bool_bhqk-causal", SQUARE, mask="bool:bhqk", causal=True),
    case("bool_b11k-gqa", GQA2_4, mask="bool:b11k"),
    case("bool_1hqk-decode", DECODE, mask="bool:1hqk", causal=True),
    case("holes-bool", GQA2_4, mask="holes:b1qk"),
    case("holes-add", GQA2_4, mask="addholes:qk", causal=True),
    case("dense_ko", MHA_D16, knockout=("dense",)),
    case("dense_ko-gqa-causal", GQA2_4, knockout=("dense",), causal=True),
    case("window5-causal", SQUARE, causal=True, window=5),
    case("window9", GQA2_ODD, window=9),
    case("window1-causal", GQA2_ODD, causal=True, window=1),
    case("window6-decode-causal", DECODE, causal=True, window=6),
    case("hm_zero", SQUARE, head_mask="bh", head_mask_values="zero"),
    case("hm_one+patch_hd-causal", SQUARE, head_mask="h", head_mask_values="one", head_patch="hd", causal=True),
    case("hm_scalar+bthd+ko_every3rd", GQA2_4, head_mask="bh", head_mask_values="scalar", layout="bthd",
         knockout=("every3rd",), causal=True),
    case("everything-causal-window11", GQA2_ODD, knockout=("pair", "rows"), score_scale="bh", mask="add:bhqk",
         head_mask="bhq", head_patch="bhqd", causal=True, window=11),
    case("everything-pad-window6", MHA_D16, mask="pad", knockout=("pair",), score_scale="h", head_mask="h",
         head_mask_values="unit", head_patch="hqd", window=6),
    case("everything-gqa-bthd", GQA2_4, mask="bool:b1qk", knockout=("perhead",), score_scale="bh", head_mask="bhq",
         head_patch="bhqd", layout="bthd", causal=True, window=13),
    case("no_keys+hm+patch", (2, 2, 1, 5, 0, 16), head_mask="bh", head_patch="hd"),
    case("no_keys-causal", (1, 4, 2, 3, 0, 32), causal=True, score_scale="h"),
    case("d128+hm+patch-causal", (1, 2, 1, 18, 21, 128), head_mask="bhq", head_patch="bhqd", causal=True),
    case("d256+hm+patch-causal", (1, 2, 1, 18, 21, 256), head_mask="bhq", head_patch="bhqd", causal=True),
]

LOW_PRECISION = [
    c.but(dtype=dt)
    for dt in (F16, BF16)
    for c in (
        case("lp-plain-causal", GQA2_ODD, causal=True),
        case("lp-hm+patch+ko+ss", SQUARE, head_mask="bhq", head_patch="bhqd", knockout=("pair",), score_scale="h"),
        case("lp-pad+hm-decode", DECODE, mask="pad", head_mask="bh", causal=True),
        case("lp-hm+patch-gqa", GQA2_4, head_mask="bh", head_patch="hd", mask="bool:11qk"),
        case("lp-large-full", (2, 4, 2, 83, 92, 64)),
        case("lp-large-causal", (2, 4, 2, 83, 92, 64), causal=True),
        case("lp-large-everything", (2, 4, 2, 83, 92, 64), knockout=("one",), head_mask="bhq", head_mask_values="unit",
             head_patch="hd", score_scale="h", mask="bool:11qk"),
        case("lp-large-everything-causal", (2, 4, 2, 83, 92, 64), knockout=("one",), head_mask="bhq",
             head_mask_values="unit", head_patch="hd", score_scale="h", mask="bool:11qk", causal=True),
    )
]

# ---- tile-crossing feature cases (from the C++ kernel's suite) --------------------------------
LARGE_FEATURES = (
    [case(f"l_gqa{g}-d{d}-ss_bh-causal", (2, 4, 4 // g, 70, 70, d), score_scale="bh", causal=True)
     for g in (1, 2, 4) for d in (16, 64, 80)]
    + [case(f"l_window{w}-{tq}x{tk}-{'causal' if c else 'full'}", (1, 2, 1, tq, tk, 16), window=w, causal=c)
       for c in (False, True) for tq, tk, w in ((100, 100, 1), (100, 100, 7), (70, 150, 33), (1, 90, 10), (150, 80, 65))]
    + [case(f"l_bool_{dims}-{'causal' if c else 'full'}", (2, 4, 2, 75, 75, 64), mask=f"bool:{dims}", causal=c)
       for dims in ("b11k", "1hqk", "bh1k", "k", "b1qk", "qk") for c in (False, True)]
    + [case(f"l_add_{dims}-{str(dt)[6:]}-causal", (2, 4, 4, 33, 70, 16), mask=f"addf:{dims}", mask_dtype=dt, causal=True)
       for dt in (torch.float32, F16, F64) for dims in ("b11k", "1hqk", "qk")]
    + [
        case("l_lens+bthd-causal", (3, 4, 4, 90, 90, 64), mask="lens", layout="bthd", causal=True),
        case("l_lens+bthd", (3, 4, 4, 90, 90, 64), mask="lens", layout="bthd"),
        case("l_addpad+bthd", (3, 4, 4, 90, 90, 64), mask="addpad", layout="bthd"),
        case("l_ko_one-causal", (2, 4, 2, 97, 97, 64), knockout=("one",), causal=True),
        case("l_ko_union-causal", (2, 4, 2, 97, 97, 64), knockout=("perhead", "bcast", "key0"), causal=True),
        case("l_ko_union+bool-window40", (2, 4, 2, 97, 97, 64), knockout=("perhead", "bcast", "key0"),
             mask="bool:b1qk", window=40),
        case("l_dense_ko-causal", (1, 2, 2, 60, 60, 16), knockout=("dense",), causal=True),
        case("l_ss_bh", (2, 4, 2, 45, 80, 80), score_scale="bh"),
        case("l_ss_h-scale0.3-causal", (2, 4, 2, 45, 80, 80), score_scale="h", scale=0.3, causal=True),
        case("l_deadrows-causal", (2, 2, 2, 70, 70, 16), knockout=("deadrows",), causal=True),
        case("l_deadrows+hm+patch-causal", (2, 2, 2, 70, 70, 16), knockout=("deadrows",), head_mask="h",
             head_mask_values="quarter", head_patch="hqd", causal=True),
        case("l_tq>tk-causal", (1, 2, 2, 90, 30, 16), causal=True),
        case("l_addholes", (2, 2, 2, 70, 70, 16), mask="addholes:qk"),
        case("l_no_keys", (2, 2, 2, 5, 0, 16)),
        case("l_everything", (2, 8, 2, 66, 129, 80), causal=True, window=100, mask="addf:b1qk",
             knockout=("perhead", "one"), head_mask="bhq", head_mask_values="unit", head_patch="bhqd", score_scale="bh"),
    ]
    + [case(f"l_hm_{hm}-patch_{p}", (2, 4, 2, 67, 67, 64), head_mask=hm, head_patch=p, causal=True)
       for hm in ("h", "bh", "bhq") for p in (None, "hd", "hqd", "bhqd")]
)


# ---- soft-capping, sinks, a value head dim != the query/key one (issue #11) --------------------
VDIM = (2, 4, 2, 19, 23, 24)  # with Dv=12: DeepSeek-V3-like (qk 24, v 12), GQA 2
SOFTCAP_SINKS_VDIM = [
    case("sc1-causal", GQA2_ODD, softcap=1.0, causal=True),
    case("sc30-full", MHA_D16, softcap=30.0, scale=1.0),
    case("sc2+add_bhqk+ss_bh", GQA2_4, softcap=2.0, mask="add:bhqk", score_scale="bh"),
    case("sc0.5+ko_pair+rows+hm+patch-causal", GQA2_ODD, softcap=0.5, knockout=("pair", "rows"), head_mask="bhq",
         head_patch="bhqd", causal=True),
    case("sc3-window6-decode", DECODE, softcap=3.0, causal=True, window=6),
    case("sc1-no_keys", (1, 4, 2, 3, 0, 32), softcap=1.0, causal=True),
    case("sinks_h", GQA2_ODD, sinks="h"),
    case("sinks_bh-causal", GQA2_4, sinks="bh", causal=True),
    case("sinks_big-pad-decode", DECODE, sinks="big", mask="pad", causal=True),
    case("sinks_h+ko_deadrows-causal", GQA2_4, sinks="h", knockout=("deadrows",), causal=True),
    case("sinks_bh+ko_all+hm+patch", GQA2_4, sinks="bh", knockout=("all",), head_mask="bh", head_patch="hd"),
    case("sinks_h+holes-add", GQA2_4, sinks="h", mask="addholes:qk", causal=True),
    case("sinks_bh+ss_h+hm-window5", SQUARE, sinks="bh", score_scale="h", head_mask="bhq", window=5, causal=True),
    case("sinks_h-no_keys+hm+patch", (2, 2, 1, 5, 0, 16), sinks="h", head_mask="bh", head_patch="hd"),
    case("sinks_bh+bthd", GQA2_4, sinks="bh", layout="bthd"),
    case("vdim12-causal", VDIM, Dv=12, causal=True),
    case("vdim12+hm_bhq+patch_bhqd", VDIM, Dv=12, head_mask="bhq", head_patch="bhqd"),
    case("vdim64-d16+ko_pair+patch_hd-causal", MHA_D16, Dv=64, knockout=("pair",), head_mask="h", head_patch="hd",
         causal=True),
    case("vdim80-d32+pad-decode", (2, 4, 2, 1, 45, 32), Dv=80, mask="pad", causal=True),
    case("vdim16-d128+ss_bh+bthd", (1, 2, 1, 18, 21, 128), Dv=16, score_scale="bh", layout="bthd", causal=True),
    case("vdim256-d64+hm+patch", (1, 2, 1, 9, 13, 64), Dv=256, head_mask="bhq", head_patch="hqd"),
    case("vdim12-no_keys+hm+patch", (2, 2, 1, 5, 0, 24), Dv=12, head_mask="bh", head_patch="hd"),
    case("all3-everything-causal-window11", VDIM, Dv=12, softcap=2.0, sinks="bh", knockout=("pair", "rows"),
         score_scale="bh", mask="add:bhqk", head_mask="bhq", head_patch="bhqd", causal=True, window=11),
    case("all3-gqa-bthd-bool", GQA2_4, Dv=48, softcap=1.5, sinks="h", mask="bool:b1qk", knockout=("perhead",),
         head_mask="bhq", head_mask_values="unit", head_patch="hd", layout="bthd", causal=True),
]
LARGE_SOFTCAP_SINKS_VDIM = [
    case("l_sc2+ss_bh-causal", (2, 4, 2, 70, 75, 64), softcap=2.0, score_scale="bh", causal=True),
    case("l_sinks_bh+lens+bthd", (3, 4, 4, 90, 90, 64), sinks="bh", mask="lens", layout="bthd", causal=True),
    case("l_sinks_h+deadrows+hm+patch", (2, 2, 2, 70, 70, 16), sinks="h", knockout=("deadrows",), head_mask="h",
         head_mask_values="quarter", head_patch="hqd", causal=True),
    case("l_vdim40-d80-gqa4-decode", (1, 8, 2, 1, 200, 80), Dv=40, causal=True),
    case("l_vdim128-d16", (2, 4, 2, 67, 67, 16), Dv=128, head_mask="bhq", head_patch="bhqd", causal=True),
    case("l_all3-everything", (2, 8, 2, 66, 129, 80), Dv=24, softcap=3.0, sinks="bh", causal=True, window=100,
         mask="addf:b1qk", knockout=("perhead", "one"), head_mask="bhq", head_mask_values="unit", head_patch="bhqd",
         score_scale="bh"),
]
LOW_PRECISION_SOFTCAP_SINKS_VDIM = [
    c.but(dtype=dt)
    for dt in (F16, BF16)
    for c in (
        case("lp-sc2+sinks_h+vdim40-causal", GQA2_ODD, softcap=2.0, sinks="h", Dv=40, causal=True),
        case("lp-sc1+sinks_bh+hm+patch+ko", SQUARE, softcap=1.0, sinks="bh", head_mask="bhq", head_patch="bhqd",
             knockout=("pair",), score_scale="h"),
        case("lp-large-all3", (2, 4, 2, 83, 92, 64), Dv=32, softcap=5.0, sinks="h", causal=True),
    )
]


@pytest.mark.parametrize("backend,case", backend_params(PLAIN + FEATURES + LARGE_FEATURES))
def test_forward_fp32(backend, case):
    compare_case(case, backend)


@pytest.mark.parametrize("backend,case", backend_params(LOW_PRECISION))
def test_forward_low_precision(backend, case):
    compare_case(case, backend)


@pytest.mark.parametrize("backend,case", backend_params(SOFTCAP_SINKS_VDIM + LARGE_SOFTCAP_SINKS_VDIM))
def test_forward_softcap_sinks_vdim_fp32(backend, case):
    compare_case(case, backend)


@pytest.mark.parametrize("backend,case", backend_params(LOW_PRECISION_SOFTCAP_SINKS_VDIM))
def test_forward_softcap_sinks_vdim_low_precision(backend, case):
    compare_case(case, backend)
