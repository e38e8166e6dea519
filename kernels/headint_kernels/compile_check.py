"""Ahead-of-time compilation of the attention kernels for a GPU target (no GPU needed).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
Triton -> LLVM -> PTX -> cubin pipeline with the ``ptxas`` shipped in the triton wheel, so
constructs the interpreter accepts but the compiler rejects are caught on a CPU-only machine,
and the real shared-memory use of every tile configuration is known.

Must run with the kernels defined as real ``JITFunction`` s, i.e. WITHOUT ``TRITON_INTERPRET=1``
when ``headint_kernels`` is imported (the tests run it in a subprocess with the variable removed).

    python -m headint_kernels.compile_check --arch 90 --arch 80 [--full] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

DTYPE_STR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}

# pointer operands holding the input dtype / fp32 / int32
_IO_PTRS = {"Q", "K", "V", "Out", "Attn", "Patch", "DO", "DQ", "DK", "DV", "A"}
_F32_PTRS = {"Lse", "Delta", "DHeadMask", "DSSPart", "HeadMask", "ScoreScale", "Sinks"}
_I32_PTRS = {"QBits", "KBits"}
# tensors whose non-innermost strides are multiples of 16 elements when contiguous (hinted like a launch)
_ALIGNED_STRIDE_PREFIXES = ("stride_q", "stride_k", "stride_v", "stride_o", "stride_a", "stride_do", "stride_dq",
                            "stride_dk", "stride_dv", "stride_p")
_KNOCKOUT_STRIDES = ("stride_qb", "stride_kb")  # bits tensors: prefixes that overlap the above


@dataclass
class Variant:
    kernel: str  # "fwd" | "pre" | "dq" | "dkdv"
    dtype: str  # "fp16" | "bf16" | "fp32"
    head_dim: int
    flags: dict = field(default_factory=dict)
    tile: tuple = (64, 64, 4, 2)  # BLOCK_M, BLOCK_N, num_warps, num_stages
    label: str = ""
    head_dim_v: int | None = None  # the value head dim (None: head_dim)

    @property
    def value_dim(self) -> int:
        return self.head_dim if self.head_dim_v is None else self.head_dim_v


PLAIN = {}
CAUSAL = {"IS_CAUSAL": True}
ALL_INTERVENTIONS = {
    "IS_CAUSAL": True, "HAS_WINDOW": True, "HAS_MASK": True, "MASK_IS_BOOL": True, "HAS_KNOCKOUT": True,
    "HAS_SCORE_SCALE": True, "HAS_HEAD_MASK": True, "HAS_PATCH": True,
}
HEADMASK_KO = {"HAS_KNOCKOUT": True, "HAS_HEAD_MASK": True, "HAS_PATCH": True}
ADDITIVE = {"HAS_MASK": True, "MASK_IS_BOOL": False, "HAS_SCORE_SCALE": True}
SOFTCAP_SINKS = {"IS_CAUSAL": True, "HAS_SOFTCAP": True, "HAS_SINKS": True}
EVERYTHING = {**ALL_INTERVENTIONS, "HAS_SOFTCAP": True, "HAS_SINKS": True}

_FLAG_NAMES = ("IS_CAUSAL", "HAS_WINDOW", "HAS_MASK", "MASK_IS_BOOL", "HAS_KNOCKOUT", "HAS_SCORE_SCALE",
               "HAS_HEAD_MASK", "HAS_PATCH", "HAS_SOFTCAP", "HAS_SINKS")


def _kernels():
    from . import attention_bwd, attention_fwd

    return {
        "fwd": attention_fwd.attn_fwd_kernel,
        "pre": attention_bwd.attn_bwd_pre_kernel,
        "dq": attention_bwd.attn_bwd_dq_kernel,
        "dkdv": attention_bwd.attn_bwd_dkdv_kernel,
    }


def build_source(v: Variant):
    """The ``ASTSource`` of a variant, with the specialisation a real launch would get."""
    import triton
    from triton.compiler import ASTSource

    from . import config

    fn = _kernels()[v.kernel]
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError(
            "headint_kernels was imported with TRITON_INTERPRET=1: the kernels are interpreted functions "
            "and cannot be compiled; run the compile check in a process without it"
        )
    bm, bn, _, _ = v.tile
    if v.kernel == "pre":  # the preprocess works on outputs: the value head dim
        consts = {"HEAD_DIM": v.value_dim, "BLOCK_D": config.block_d(v.value_dim), "BLOCK_M": bm}
    else:
        consts = {"HEAD_DIM": v.head_dim, "BLOCK_D": config.block_d(v.head_dim), "BLOCK_M": bm,
                  "HEAD_DIM_V": v.value_dim, "BLOCK_DV": config.block_d(v.value_dim)}
        consts["BLOCK_N"] = bn
        consts["DOT_FP32"] = False
        consts["DOT_PRECISION"] = "ieee" if v.dtype == "fp32" else "tf32"
    for name in _FLAG_NAMES:
        if name in fn.arg_names:
            consts[name] = bool(v.flags.get(name, False))
    signature, attrs = {}, {}
    mask_ptr = "*u8" if v.flags.get("MASK_IS_BOOL", False) else DTYPE_STR[v.dtype]
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        if name in _IO_PTRS:
            signature[name] = DTYPE_STR[v.dtype]
        elif name in _F32_PTRS:
            signature[name] = "*fp32"
        elif name in _I32_PTRS:
            signature[name] = "*i32"
        elif name == "Mask":
            signature[name] = mask_ptr
        elif name in ("scale", "softcap"):
            signature[name] = "fp32"
        elif name.startswith("stride_") and name.endswith("d") and not name.startswith(_KNOCKOUT_STRIDES):
            # innermost (head-dim) strides are 1 on contiguous tensors: a real launch specialises them
            signature[name] = "constexpr"
            consts[name] = 1
            continue
        else:
            signature[name] = "i32"
        if signature[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith(_ALIGNED_STRIDE_PREFIXES) and not name.startswith(_KNOCKOUT_STRIDES):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile one variant for ``sm_<arch>``; returns a row with shared memory, registers, time."""
    import triton
    from triton.backends.compiler import GPUTarget

    _, _, warps, stages = v.tile
    row = {**asdict(v), "arch": arch, "tile": list(v.tile)}
    t0 = time.time()
    try:
        compiled = triton.compile(build_source(v), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        regs, local = _resource_usage(compiled)
        row.update(ok=True, shared=int(compiled.metadata.shared), n_regs=regs, local=local, error=None)
    except Exception as e:  # report every failure, keep going
        row.update(ok=False, shared=None, n_regs=None, local=None, error=f"{type(e).__name__}: {e}"[:2000])
    row["seconds"] = round(time.time() - t0, 2)
    return row


def _resource_usage(compiled) -> tuple[int | None, int | None]:
    """(registers per thread, stack + local bytes per thread = spills) from ``cuobjdump -res-usage``."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cubin = compiled.asm.get("cubin")
    if cubin is None or not os.path.exists(tool):
        return None, None
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    reg = re.search(r"REG:(\d+)", text)
    spill = [int(m) for m in re.findall(r"(?:STACK|LOCAL):(\d+)", text)]
    return (int(reg.group(1)) if reg else None), (sum(spill) if spill else None)


_ELEM = {"fp16": 2, "bf16": 2, "fp32": 4}


def default_variants(full: bool = False, arch: int = 90) -> list[Variant]:
    """The variants compiled by the default test (and, with ``full``, every config the autotuner may
    try on ``sm_<arch>``)."""
    from . import config

    def usable(kind, d, dtype="bf16", flags=None):  # d: the larger of the two head dims (what the pruner uses)
        flags = flags or {}
        mask = None if not flags.get("HAS_MASK") else ("bool" if flags.get("MASK_IS_BOOL") else "add")
        return config.usable_tiles(kind, d, interpret=False, arch=arch, elem=_ELEM[dtype], mask=mask)

    out: list[Variant] = []
    if not full:
        # a representative set; for each, the kept tile with the largest estimated shared memory
        # (the one most likely not to fit)
        def worst(kind, d, dtype="bf16", flags=None):
            bd = config.block_d(d)
            return max(usable(kind, d, dtype, flags),
                       key=lambda t: config.smem_estimate(kind, t[0], t[1], bd, t[3], _ELEM[dtype]))

        out.append(Variant("fwd", "bf16", 64, PLAIN, worst("fwd", 64, "bf16", PLAIN), "plain"))
        out.append(Variant("fwd", "fp32", 32, ADDITIVE, worst("fwd", 32, "fp32", ADDITIVE), "additive+ss"))
        out.append(Variant("fwd", "fp16", 80, HEADMASK_KO, worst("fwd", 80, "fp16", HEADMASK_KO), "hm+ko"))
        for dtype, d, flags, lbl in [
            ("bf16", 128, ALL_INTERVENTIONS, "all"),
            ("bf16", 256, ALL_INTERVENTIONS, "all"),
        ]:
            for kind in ("fwd", "dq", "dkdv"):
                out.append(Variant(kind, dtype, d, flags, worst(kind, d, dtype, flags), lbl))
        out.append(Variant("pre", "bf16", 128, {"HAS_HEAD_MASK": True, "HAS_PATCH": True}, worst("pre", 128), "hm"))
        # soft-capping, sinks and a value head dim != the query/key one (DeepSeek-V3: 192 / 128)
        out.append(Variant("fwd", "bf16", 64, SOFTCAP_SINKS, worst("fwd", 64, "bf16", SOFTCAP_SINKS), "sc+sinks"))
        for dtype, d, dv, flags, lbl in [
            ("bf16", 128, None, EVERYTHING, "everything"),
            ("bf16", 192, 128, EVERYTHING, "mla+all"),
            ("fp32", 24, 12, EVERYTHING, "mla-tiny+all"),
            ("fp16", 64, 256, SOFTCAP_SINKS, "dv>d+sc"),
        ]:
            for kind in ("fwd", "dq", "dkdv"):
                dmax = max(d, dv or d)
                out.append(Variant(kind, dtype, d, flags, worst(kind, dmax, dtype, flags), lbl, head_dim_v=dv))
        return out
    for d in (16, 32, 64, 80, 96, 128, 256):
        for kind in ("fwd", "dq", "dkdv"):
            for flags, lbl in ((PLAIN, "plain"), (ALL_INTERVENTIONS, "all")):
                for tile in usable(kind, d, "bf16", flags):
                    out.append(Variant(kind, "bf16", d, flags, tile, lbl))
        out.append(Variant("pre", "bf16", d, {"HAS_HEAD_MASK": True, "HAS_PATCH": True}, config.PRE_GPU[0], "hm"))
    for dtype in ("fp16", "fp32"):
        for kind in ("fwd", "dq", "dkdv"):
            for tile in usable(kind, 128, dtype, ALL_INTERVENTIONS):
                out.append(Variant(kind, dtype, 128, ALL_INTERVENTIONS, tile, "all"))
    for d, dv in ((192, 128), (64, 256), (24, 12)):
        for kind in ("fwd", "dq", "dkdv"):
            for tile in usable(kind, max(d, dv), "bf16", EVERYTHING):
                out.append(Variant(kind, "bf16", d, EVERYTHING, tile, "everything", head_dim_v=dv))
    return out


def format_table(rows: list[dict]) -> str:
    head = f"{'kernel':6} {'dtype':5} {'D':>4} {'Dv':>4} {'variant':12} {'BM':>4} {'BN':>4} {'w':>2} {'s':>2} {'arch':>5} " \
           f"{'smem KB':>8} {'limit':>6} {'regs':>5} {'spill':>5} {'ok':>3}"
    lines = [head, "-" * len(head)]
    from .config import smem_limit

    for r in rows:
        bm, bn, w, s = r["tile"]
        smem = "-" if r["shared"] is None else f"{r['shared'] / 1024:.1f}"
        lim = smem_limit(r["arch"]) // 1024
        dv = r.get("head_dim_v") or r["head_dim"]
        lines.append(f"{r['kernel']:6} {r['dtype']:5} {r['head_dim']:>4} {dv:>4} {r['label']:12} {bm:>4} {bn:>4} {w:>2} {s:>2} "
                     f"sm_{r['arch']:<2} {smem:>8} {lim:>6} {str(r['n_regs'] or '-'):>5} {str(r.get('local', '-')):>5} "
                     f"{'yes' if r['ok'] else 'NO':>3}")
    return "\n".join(lines)


def run(arches=(90, 80), full: bool = False, workers: int = 1) -> list[dict]:
    jobs = [(v, a) for a in arches for v in default_variants(full, a)]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as ex:
            return list(ex.map(_job, jobs))
    return [_job(j) for j in jobs]


def _job(job):
    v, a = job
    return compile_variant(v, a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", help="sm version(s), default 90 and 80")
    p.add_argument("--full", action="store_true", help="every autotune config of every head dim")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the kernels must be real JITFunctions)", file=sys.stderr)
        return 2
    rows = run(tuple(args.arch or (90, 80)), args.full, args.workers)
    print(format_table(rows))
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"FAILED {r['kernel']} {r['dtype']} D={r['head_dim']} {r['label']} sm_{r['arch']}: {r['error']}",
              file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
