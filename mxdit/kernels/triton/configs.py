"""Launch configurations of the Triton kernels: the autotune configs for H100 / H200, the one small
deterministic config per kernel under the interpreter, and the launcher that picks between them.

All GEMMs accumulate in fp32, add the fp32 bias in fp32 and cast to the output
dtype in the epilogue; tile order is grouped for L2 reuse; the autotune configs for
H100/H200 are below.  Under the interpreter one small deterministic
config per kernel is used (16x32 output tiles, BLOCK_K 64 / 128) and nothing is
autotuned.  Options: see :class:`TritonBackend`.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import triton

from mxdit.kernels.triton import kernels as K


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _env(name: str, default: str, valid: tuple[str, ...]) -> str:
    v = os.environ.get(name, default).strip().lower()
    if v not in valid:
        raise ValueError(f"{name}={v!r}; valid: {list(valid)}")
    return v


def _cfg(bm, bn, bk, warps, stages, gm=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm}, num_warps=warps, num_stages=stages)


# H100/H200 (sm_90: 228 KB shared memory, 255 registers per thread).  Chosen from
# ptxas reports of AOT compiles for sm_90a with launch-time specialization
# (16-divisible sizes/strides; M = 32760 not): all are pipelined (cp.async,
# num_stages buffers) and use wgmma; none spills.  The explicit MX GEMM and the
# promoted dual/FP8 GEMMs keep two fp32 tiles live (the accumulator and the
# fresh tensor-core partial), so an output tile is 64x256 / 128x128 with 8 warps
# (64 + 64 registers per thread); 128x256 spills.  The explicit MX GEMM takes one
# 32-wide K chunk per iteration (BLOCK_K=32): unrolling 4 chunks kept 4 async
# partials alive and spilled 1.4 KB per thread.
_MX_EXPLICIT_CONFIGS = [  # 190-235 registers, 0 spills
    _cfg(64, 256, 32, 8, 4), _cfg(64, 256, 32, 8, 6), _cfg(64, 128, 32, 4, 4), _cfg(128, 64, 32, 4, 4),
    _cfg(64, 128, 32, 4, 6),
]
_MX_DOT_SCALED_CONFIGS = [  # capability >= 10 (tcgen05 block-scaled MMA; 154-178 registers, 0 spills on sm_100a)
    _cfg(128, 128, 128, 4, 4), _cfg(128, 256, 128, 8, 3), _cfg(128, 128, 256, 8, 3), _cfg(128, 128, 128, 4, 3),
]
_DUAL_CONFIGS = [  # BLOCK_K <= 128 is also the promotion interval.  Promoted: 216-255 registers, 0 spills
    # (16 B at 128x128x64 with fp8 weights); not promoted with fp4 weights: <= 492 B spills
    _cfg(64, 256, 128, 8, 3), _cfg(64, 256, 128, 8, 4), _cfg(64, 256, 64, 8, 4), _cfg(128, 128, 64, 8, 4),
]
_FP8_CONFIGS = [  # 210-232 registers, 0 spills (promoted)
    _cfg(128, 128, 128, 8, 4), _cfg(64, 256, 128, 8, 4), _cfg(128, 128, 128, 8, 3), _cfg(64, 256, 128, 8, 3),
]
_QUANT_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w)
    for bm, bk, w in ((8, 256, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8), (4, 512, 4))
]
_DUAL_QUANT_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in ((2, 4), (4, 4), (8, 8), (16, 8))]

# One small deterministic config each under the interpreter (BLOCK_K=64 makes
# K=96 a ragged tile edge; 128 gives four promotion chunks per 512-group).
_SMALL = {
    "mx": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2),  # two 32-chunks per iteration: exercises the chunk loop
    "dual": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=2),
    "fp8": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2),
    "quant": dict(BLOCK_M=32, BLOCK_K=64),
    "dual_quant": dict(BLOCK_M=32),
    "fp8_quant": dict(BLOCK_K=128),
}

_TUNED: dict[str, Any] = {}


def _tuned(name: str) -> Any:
    if name not in _TUNED:
        table = {
            # keys include the constexpr variants: each gets its own tuned config
            "mx": (K.mx_matmul_kernel, _MX_EXPLICIT_CONFIGS, ["M", "N", "K", "A_FP4", "B_FP4"]),
            "mx_ds": (K.mx_matmul_kernel, _MX_DOT_SCALED_CONFIGS, ["M", "N", "K", "A_FP4", "B_FP4"]),
            "dual": (K.dual_matmul_kernel, _DUAL_CONFIGS, ["M", "N", "K", "B_FP4", "PROMOTE"]),
            "fp8": (K.fp8_rowwise_matmul_kernel, _FP8_CONFIGS, ["M", "N", "K", "PROMOTE"]),
            "quant": (K.mx_quant_kernel, _QUANT_CONFIGS, ["K", "IN_KIND", "IS_FP4", "OUT_E4M3"]),
            "dual_quant": (K.dual_quant_kernel, _DUAL_QUANT_CONFIGS, ["K", "IN_KIND", "OUT_E4M3"]),
        }
        fn, configs, key = table[name]
        _TUNED[name] = triton.autotune(configs=configs, key=key)(fn)
    return _TUNED[name]


def _launch(name: str, raw, grid: Callable[[dict], tuple], *args, **kwargs) -> None:
    """Interpreter: the raw kernel with the one small config.  GPU: the autotuned one."""
    if interpreting():
        meta = _SMALL[name if name != "mx_ds" else "mx"]
        raw[grid(meta)](*args, **kwargs, **meta)
    elif name == "fp8_quant":
        raw[grid({"BLOCK_K": 2048})](*args, **kwargs, BLOCK_K=2048, num_warps=8)
    else:
        _tuned(name)[grid](*args, **kwargs)
