"""Tile configurations of the attention kernels.

On a GPU every kernel is autotuned over a few configurations (pruned per head dimension so
that the shared memory of the survivors fits an sm_80 / sm_90 SM: see :func:`smem_estimate`
and ``tests/triton/test_triton_compile.py``, which compiles them and checks the real numbers).
Under the Triton interpreter (``TRITON_INTERPRET=1``) there is exactly ONE small configuration:
the interpreter's cost grows with the tile area, and autotuning would be meaningless.
The autotune keys (flags and bucketed lengths) are in :mod:`.tuning`.

Whether we interpret is decided once, when this module is imported - the same moment
``triton.jit`` decides to build interpreted or compiled kernels.
"""

from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Shared memory a block may use (bytes) per SM version: sm_80/87 163 KB, sm_86/89 99 KB, sm_90+ 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def smem_limit(arch: int) -> int:
    if arch in SMEM_LIMIT:
        return SMEM_LIMIT[arch]
    if arch >= 90:
        return SMEM_LIMIT[90]
    if arch >= 80:
        return SMEM_LIMIT[86]
    return 64 * 1024


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Each list spans several head dims; per call the
# autotuner only considers the entries :func:`usable_tiles` keeps for the head dim / dtype / GPU.
FWD_GPU = [
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (128, 64, 4, 3),
    (128, 32, 4, 3),
    (64, 64, 4, 3),
    (64, 32, 4, 2),
    (64, 64, 8, 2),  # large head dims
    (64, 32, 8, 2),
]
# dK/dV: one program per key tile (BLOCK_N keys), looping over query tiles of BLOCK_M.
BWD_DKDV_GPU = [
    (32, 128, 8, 2),
    (64, 128, 8, 2),
    (32, 64, 4, 2),
    (64, 64, 4, 2),
    (32, 64, 8, 2),
    (64, 64, 8, 2),
    (32, 32, 8, 2),  # large head dims
]
# dQ: one program per query tile (BLOCK_M queries), looping over key tiles of BLOCK_N.
BWD_DQ_GPU = [
    (128, 32, 8, 2),
    (128, 64, 8, 2),
    (64, 64, 4, 2),
    (64, 32, 4, 2),
    (64, 32, 8, 2),  # large head dims
]
PRE_GPU = [(64, 0, 4, 1)]

INTERPRET_TILE = (16, 16, 4, 1)

#: Register-pressure budget (fp32 registers per thread for the big tiles, see reg_estimate).
#: Calibrated on the compile check (tests/triton/test_triton_compile.py): above it ptxas spills.
REG_BUDGET = {"fwd": 160, "dq": 192, "dkdv": 192, "pre": 1 << 30}


def block_d(head_dim: int) -> int:
    """Head-dim tile: the next power of two (>= 16, what ``tl.dot`` needs)."""
    return max(16, triton.next_power_of_2(int(head_dim)))


def smem_estimate(kind: str, block_m: int, block_n: int, bd: int, stages: int, elem: int = 2,
                  mask: str | None = None) -> int:
    """A conservative guess of a config's shared memory (bytes), used to prune before compiling.

    The pipelined operands (K/V tiles in the forward and dQ kernels, Q/dO tiles in the dK/dV
    kernel) are buffered ``stages`` times; the resident tiles and the layout conversions of the
    score tile come on top. A dense ``mask`` tile (``"bool"`` or ``"add"``itive) adds its layout
    conversions: an additive one goes through shared memory as an fp32 [M, N] tile, twice.
    (Checked against the compiled kernels by the compile test: it over-estimates.)
    """
    extra = 0 if mask is None else 2 * block_m * block_n * (4 if mask == "add" else 1)
    if kind == "fwd":
        return extra + elem * (stages * 2 * block_n * bd + block_m * bd + block_m * block_n)
    if kind == "dkdv":
        return extra + elem * (stages * 2 * block_m * bd + 2 * block_n * bd + 2 * block_m * block_n)
    if kind == "dq":
        return extra + elem * (stages * 2 * block_n * bd + 2 * block_m * bd + 2 * block_m * block_n)
    return elem * block_m * bd * 2


def reg_estimate(kind: str, block_m: int, block_n: int, bd: int, warps: int, elem: int = 2) -> float:
    """Registers per thread held by the big tiles (fp32 accumulators, resident operands, score tiles)."""
    threads = 32 * warps
    if kind == "fwd":  # acc [M,D] fp32 + q [M,D] + scores/probabilities [M,N]
        return (block_m * bd * (1 + elem / 4) + 2 * block_m * block_n) / threads
    if kind == "dq":  # dq [M,D] fp32 + q, dO [M,D] + s, p, dp, ds [M,N]
        return (block_m * bd * (1 + elem / 2) + 4 * block_m * block_n) / threads
    if kind == "dkdv":  # dk, dv [N,D] fp32 + k, v [N,D] + s, p, dp, ds [M,N]
        return (block_n * bd * (2 + elem / 2) + 4 * block_m * block_n) / threads
    return 0.0


_GPU_TABLE = {"fwd": FWD_GPU, "dkdv": BWD_DKDV_GPU, "dq": BWD_DQ_GPU, "pre": PRE_GPU}


def tile_list(kind: str, interpret: bool | None = None) -> list[tuple[int, int, int, int]]:
    """Raw (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples of a kernel kind."""
    if INTERPRET if interpret is None else interpret:
        return [INTERPRET_TILE]
    return list(_GPU_TABLE[kind])


def _to_config(kind: str, t: tuple[int, int, int, int]) -> triton.Config:
    bm, bn, w, s = t
    kw = {"BLOCK_M": bm} if kind == "pre" else {"BLOCK_M": bm, "BLOCK_N": bn}
    return triton.Config(kw, num_warps=w, num_stages=s)


def configs(kind: str) -> list[triton.Config]:
    """The ``triton.Config`` list a kernel is autotuned over (one config when interpreting)."""
    return [_to_config(kind, t) for t in tile_list(kind)]


def fits(kind: str, t: tuple[int, int, int, int], head_dim: int, arch: int = 80, elem: int = 2,
         mask: str | None = None) -> bool:
    """Whether a tile's shared memory fits ``sm_<arch>`` and its registers the budget."""
    bm, bn, w, s = t
    bd = block_d(head_dim)
    return (smem_estimate(kind, bm, bn, bd, s, elem, mask) <= smem_limit(arch)
            and reg_estimate(kind, bm, bn, bd, w, elem) <= REG_BUDGET[kind])


def usable_tiles(kind: str, head_dim: int, interpret: bool | None = None, arch: int = 80,
                 elem: int = 2, mask: str | None = None) -> list[tuple[int, int, int, int]]:
    """The tiles of ``kind`` the autotuner considers for this head dim, element size, dense mask
    kind (None, "bool", "add") and GPU."""
    tiles = tile_list(kind, interpret)
    if len(tiles) == 1:
        return tiles
    kept = [t for t in tiles if fits(kind, t, head_dim, arch, elem, mask)]
    if not kept:  # keep the leanest tile that fits in shared memory (or the leanest at all)
        bd = block_d(head_dim)
        in_smem = [t for t in tiles
                   if smem_estimate(kind, t[0], t[1], bd, t[3], elem, mask) <= smem_limit(arch)] or tiles
        kept = [min(in_smem, key=lambda t: reg_estimate(kind, t[0], t[1], bd, t[2], elem))]
    return kept


def device_arch(t) -> int:
    """``sm`` version (e.g. 90) of a CUDA tensor's device; 80 for anything else."""
    try:
        import torch

        if isinstance(t, torch.Tensor) and t.is_cuda:
            major, minor = torch.cuda.get_device_capability(t.device)
            return 10 * major + minor
    except Exception:
        pass
    return 80


def pruner(kind: str):
    """``early_config_prune`` hook: keep the configs :func:`usable_tiles` allows for this call."""

    def prune(configs_, named_args, **kwargs):
        if len(configs_) == 1:
            return configs_
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        head_dim_v = kwargs.get("HEAD_DIM_V", named_args.get("HEAD_DIM_V")) or head_dim
        head_dim = max(head_dim, head_dim_v)  # the tiles are sized for the larger of the two
        q = named_args.get("Q")
        elem = q.element_size() if hasattr(q, "element_size") else 2
        has_mask = kwargs.get("HAS_MASK", named_args.get("HAS_MASK", False))
        is_bool = kwargs.get("MASK_IS_BOOL", named_args.get("MASK_IS_BOOL", False))
        mask = None if not has_mask else ("bool" if is_bool else "add")
        keep = set(usable_tiles(kind, head_dim, interpret=False, arch=device_arch(q), elem=elem, mask=mask))
        out = [c for c in configs_
               if (c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_N", 0), c.num_warps, c.num_stages) in keep]
        return out or configs_[:1]

    return prune


def min_block(kind: str, name: str) -> int:
    """The smallest BLOCK_M / BLOCK_N of a kind's configs (sizes scratch that depends on the grid)."""
    idx = 0 if name == "BLOCK_M" else 1
    return min(t[idx] for t in tile_list(kind))
