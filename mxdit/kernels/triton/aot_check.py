"""Compile every Triton kernel variant ahead of time for a GPU that is not here.

    python -m mxdit.kernels.triton.aot_check [--cap 90] [--only mx,dual,fp8,quant] [--dot-scaled-cap 100]

No GPU is needed: Triton lowers to PTX and assembles with the ptxas it bundles.
The kernels are specialized as a real launch on Wan shapes would be (16-byte
aligned pointers, sizes and strides divisible by 16 except M = 32760 and the
per-512 L0 strides), for each autotune config of the backend, and the report
shows what can be read without running: registers, spills, shared memory, and
whether the GEMMs use wgmma (sm_90) / tcgen05 (sm_100), cp.async multi-stage
pipelining, 16-byte vector loads in the quantizers, IEEE ``div.rn.f32``, and the
hardware ``cvt.rn.satfinite.e4m3x2`` conversion where intended.  It says
nothing about speed.  TRITON_INTERPRET must be unset.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from mxdit.kernels.triton import configs as B
    from mxdit.kernels.triton import kernels as K

    ap = argparse.ArgumentParser()
    ap.add_argument("--cap", type=int, default=90)
    ap.add_argument("--dot-scaled-cap", type=int, default=100)
    ap.add_argument("--only", default="quant,mx,dual,fp8,ds,attn")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    nodiv = {"M", "stride_l0am", "stride_l0bn", "stride_l0m", "Lq", "Lk", "H", "qk_scale"}
    failures = 0

    def build(fn, types, consts, warps, stages, cap):
        names = fn.arg_names
        it = iter(types)
        sig, attrs = {}, {}
        for i, n in enumerate(names):
            sig[n] = "constexpr" if n in consts else next(it)
            if sig[n] != "constexpr" and (sig[n].startswith("*") or n not in nodiv):
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                        constexprs={(names.index(n),): v for n, v in consts.items()})
        return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options={"num_warps": warps, "num_stages": stages})

    def report(name, fn, types, consts, warps, stages, cap):
        nonlocal failures
        try:
            k = build(fn, types, consts, warps, stages, cap)
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"FAIL {name}: {str(e).strip().splitlines()[-1][:300]}", flush=True)
            return
        ptx = k.asm["ptx"]
        arch = f"sm_{cap}a"
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(cap).path, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
        os.unlink(f.name)
        regs = re.search(r"Used (\d+) registers", r.stderr)
        spill = re.search(r"(\d+) bytes spill stores", r.stderr)
        marks = [m for m, pat in (("wgmma", "wgmma.mma_async"), ("tcgen05", "tcgen05.mma"),
                                  ("cp.async", "cp.async."), ("ld.v4", r"ld\.global(\.\w+)*\.v4"),
                                  ("div.rn", r"div\.rn\.f32"), ("cvt.satfinite.e4m3", "cvt.rn.satfinite.e4m3x2"))
                 if re.search(pat, ptx)]
        print(f"ok   {name}: regs={regs.group(1) if regs else '?'} spill={spill.group(1) if spill else '?'}B "
              f"smem={k.metadata.shared}B [{' '.join(marks)}]", flush=True)

    P8, PF, I = "*u8", "*fp32", "i32"
    if "quant" in only:
        for c in B._QUANT_CONFIGS:
            for fp4, oe in ((False, False), (True, False), (True, True)):
                consts = dict(IN_KIND=1, HAS_SMOOTH=False, BITS=4 if fp4 else 8, MBITS=1 if fp4 else 3,
                              EMIN=0 if fp4 else -6, MAX_CODE=7 if fp4 else 0x7E, NAN_CODE=0 if fp4 else 0x7F,
                              EMAX=2 if fp4 else 8, RCEIL=False, RCEIL_MUL_BITS=0, ROUND=0, IS_FP4=fp4,
                              OUT_E4M3=oe, **c.kwargs)
                report(f"mx_quant {c.kwargs} fp4={fp4} e4m3={oe}", K.mx_quant_kernel,
                       ["*i16", "*i16", P8, P8, I, I, I, I, I], consts, c.num_warps, 1, args.cap)
        for c in B._DUAL_QUANT_CONFIGS:
            for oe in (False, True):
                report(f"dual_quant {c.kwargs} e4m3={oe}", K.dual_quant_kernel,
                       ["*i16", "*i16", P8, P8, PF, I, I, I, I, I, I],
                       dict(IN_KIND=1, HAS_SMOOTH=False, ROUND=0, OUT_E4M3=oe, HW_CVT=True, **c.kwargs),
                       c.num_warps, 1, args.cap)
        report("fp8_quant BLOCK_K=2048", K.fp8_rowwise_quant_kernel, ["*i16", P8, PF, I, I, I],
               dict(IN_KIND=1, BLOCK_K=2048), 8, 2, args.cap)
    gemm_mx = [P8, P8, P8, P8, PF, "*i16", I, I, I, I, I, I, I, I]
    if "mx" in only:
        for c in B._MX_EXPLICIT_CONFIGS:
            for a4, b4 in ((False, False), (False, True), (True, True)):
                report(f"mx explicit {c.kwargs} w{c.num_warps} s{c.num_stages} a_fp4={a4} b_fp4={b4}",
                       K.mx_matmul_kernel, gemm_mx,
                       dict(A_FP4=a4, B_FP4=b4, A_FMT="e4m3", B_FMT="e4m3", HAS_BIAS=True, OUT_KIND=1,
                            DOT_SCALED=False, HW_CVT=True, **c.kwargs), c.num_warps, c.num_stages, args.cap)
    if "ds" in only:
        for c in B._MX_DOT_SCALED_CONFIGS:
            for a4, b4 in ((False, False), (True, True), (True, False)):
                report(f"mx dot_scaled sm_{args.dot_scaled_cap} {c.kwargs} w{c.num_warps} a={a4} b={b4}",
                       K.mx_matmul_kernel, gemm_mx,
                       dict(A_FP4=a4, B_FP4=b4, A_FMT="e2m1" if a4 else "e4m3", B_FMT="e2m1" if b4 else "e4m3",
                            HAS_BIAS=True, OUT_KIND=1, DOT_SCALED=True, HW_CVT=True, **c.kwargs),
                       c.num_warps, c.num_stages, args.dot_scaled_cap)
    if "dual" in only:
        for c in B._DUAL_CONFIGS:
            for b4 in (False, True):
                for pr in (True, False):
                    report(f"dual {c.kwargs} w{c.num_warps} s{c.num_stages} b_fp4={b4} promote={pr}",
                           K.dual_matmul_kernel, [P8, PF, P8, P8, PF, PF, "*i16", I, I, I, I, I, I, I, I, I, I],
                           dict(B_FP4=b4, HAS_BIAS=True, OUT_KIND=1, PROMOTE=pr, HW_CVT=True, **c.kwargs),
                           c.num_warps, c.num_stages, args.cap)
    if "fp8" in only:
        for c in B._FP8_CONFIGS:
            for pr in (True, False):
                report(f"fp8 {c.kwargs} w{c.num_warps} s{c.num_stages} promote={pr}", K.fp8_rowwise_matmul_kernel,
                       [P8, PF, P8, PF, PF, "*i16", I, I, I, I, I, I],
                       dict(HAS_BIAS=True, OUT_KIND=1, PROMOTE=pr, HW_CVT=True, **c.kwargs),
                       c.num_warps, c.num_stages, args.cap)
    if "attn" in only:
        from mxdit.kernels.triton import attention as A

        for bm, bn, w in A.COMPILE_CONFIGS:
            report(f"attn mxfp8 D=128 BLOCK_M={bm} BLOCK_N={bn} w{w}", A.mxfp8_attention_kernel,
                   [P8, P8, P8, P8, P8, P8, PF, I, I, I, "fp32"], dict(D=128, BLOCK_M=bm, BLOCK_N=bn), w, 2, args.cap)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
