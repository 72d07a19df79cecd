"""TritonBackend: the KernelBackend for NVIDIA GPUs (see the package docstring)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import triton

from mxdit import formats as F
from mxdit.formats.e8m0 import e8m0_to_float
from mxdit.formats.elements import FP4_E2M1, FP8_E4M3, check_round_mode, decode_elements
from mxdit.formats.mx import _check_input
from mxdit.kernels.base import KernelBackend
from mxdit.kernels.triton import kernels as K

#: L1 bytes (relative to the group's largest, normalized to 127) from which an
#: FP4 value times its L1 scale is exactly an E4M3 value: {0.5..6} * 2^-8 >= 2^-9.
DUAL_EXACT_MIN_L1 = 119

_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ROUND = {"rint": 0, "round": 1, "floor": 2}


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _env(name: str, default: str, valid: tuple[str, ...]) -> str:
    v = os.environ.get(name, default).strip().lower()
    if v not in valid:
        raise ValueError(f"{name}={v!r}; valid: {list(valid)}")
    return v


# ----------------------------------------------------------------------------- configs
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


def _kernel_input(x: torch.Tensor) -> tuple[int, torch.Tensor]:
    if x.dtype == torch.bfloat16:
        return 1, x.view(torch.int16)
    if x.dtype == torch.float16:
        return 2, x
    return 0, x


def _out_view(out: torch.Tensor) -> torch.Tensor:
    return out.view(torch.int16) if out.dtype == torch.bfloat16 else out


def _f32_bits(v: float) -> int:
    return int(torch.tensor(v, dtype=torch.float32).view(torch.int32).item())


# ----------------------------------------------------------------------------- prepared weights
@dataclass
class TritonMXWeight:
    """MX weight for the kernels: ``data`` E4M3 bytes [N, K] (MXFP8, or MXFP4
    expanded once to E4M3 values) or packed FP4 [N, K/2] (``packed``); ``scale``
    E8M0 [N, K/32].  ``ref`` is the canonical tensor (reference fallback)."""

    ref: F.MXTensor
    data: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]
    packed: bool = False

    @property
    def shape(self) -> torch.Size:
        return self.ref.shape

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() + self.scale.numel()


@dataclass
class TritonDualWeight:
    """Dual-level weight for the FP8 GEMM.

    The L1 bytes are normalized per 512-group so that the largest finite one is
    127 (the factor 2^(max-127) moves into L0 exactly); ``l0`` is NaN for groups
    holding an L1 = 0xFF block.  ``mode="fp8"``: ``data`` is E4M3(fp4 * 2^(L1-127))
    [N, K] (expanded once); ``mode="fp4"``: ``data`` is the packed FP4 [N, K/2] and
    ``l1`` the normalized bytes, expanded per tile in the kernel.  Both modes give
    the same E4M3 operand (round half to even where a block's L1 < 119)."""

    ref: F.DualMXTensor
    mode: str
    data: Optional[torch.Tensor]
    l1: Optional[torch.Tensor]
    l0: Optional[torch.Tensor]

    @property
    def shape(self) -> torch.Size:
        return self.ref.shape

    @property
    def nbytes(self) -> int:
        if self.data is None:
            return 0
        return self.data.numel() + (0 if self.l1 is None else self.l1.numel()) + 4 * self.l0.numel()


@dataclass
class TritonFP8Weight:
    w: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # float32 [N]


def normalize_dual_scales(w: F.DualMXTensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(l1n uint8 [N, K/32], l0n float32 [N, K/512], ok): L1 shifted so each group's
    largest finite byte is 127 and L0 multiplied by the same power of two (exact);
    groups with an L1 = 0xFF block get L0 = NaN (their bytes become 0).  ``ok`` is
    False if a group cannot be normalized exactly and would overflow E4M3."""
    n, k = w.shape
    g = k // F.L0_BLOCK
    l1 = w.scale_l1.reshape(n, g, 16).to(torch.int32)
    finite = l1 != 255
    gmax = torch.where(finite, l1, 0).amax(-1)
    shift = torch.where(gmax > 0, gmax - 127, torch.zeros_like(gmax))
    pow2 = ((shift + 127) << 23).view(torch.float32)  # 2^shift exactly, shift in [-126, 127]
    l0 = w.scale_l0.to(torch.float32)
    l0n = l0 * pow2
    exact = (l0n / pow2 == l0) | ~torch.isfinite(l0)
    shift = torch.where(exact, shift, torch.zeros_like(shift))
    l0n = torch.where(exact, l0n, l0)
    ok = bool(((gmax - shift) <= 127 + 6).all())  # 6 * 2^6 = 384 still fits E4M3
    l1n = torch.where(finite, (l1 - shift.unsqueeze(-1)).clamp(0, 254), torch.zeros_like(l1))
    l0n = torch.where(finite.all(-1), l0n, torch.full_like(l0n, float("nan")))
    return l1n.reshape(n, k // 32).to(torch.uint8), l0n.contiguous(), ok


def expand_dual_to_e4m3(codes: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
    """E4M3 (float8_e4m3fn) of fp4(codes) * 2^(l1-127): torch's RNE cast of the exact
    fp32 product.  codes uint8 [..., K], l1 uint8 [..., K/32]."""
    v = decode_elements(codes, FP4_E2M1)
    kdim = v.shape[-1]
    v = v.reshape(*v.shape[:-1], kdim // 32, 32) * e8m0_to_float(l1).unsqueeze(-1)
    return v.reshape(*v.shape[:-2], kdim).to(torch.float8_e4m3fn)


def dual_expansion_stats(w: F.DualMXTensor) -> dict:
    """How exact the E4M3 expansion of a dual-level tensor is (weights or activations):
    blocks whose normalized L1 < 119 and hold a non-zero value, elements whose
    E4M3 value differs from fp4 * 2^(L1-127), and the relative L2 error of the
    expanded tensor against the exact one (L0 factors omitted)."""
    l1n, _, _ = normalize_dual_scales(w)
    codes = w.codes()
    exact = decode_elements(codes, FP4_E2M1)
    shp = exact.shape
    exact = (exact.reshape(*shp[:-1], shp[-1] // 32, 32) * e8m0_to_float(l1n).unsqueeze(-1)).reshape(shp)
    finite_blk = (w.scale_l1 != 255).repeat_interleave(32, dim=-1)
    exact = torch.where(finite_blk, exact, torch.zeros_like(exact))
    expanded = expand_dual_to_e4m3(codes, l1n).to(torch.float32)
    nz_blk = (codes.reshape(*shp[:-1], shp[-1] // 32, 32) & 7).amax(-1) > 0
    low = (l1n < DUAL_EXACT_MIN_L1) & nz_blk & (w.scale_l1 != 255)
    diff = expanded != exact
    return {
        "blocks": int(l1n.numel()),
        "blocks_below_119": int(low.sum()),
        "groups_all_ge_119": int((~low.reshape(*shp[:-1], -1, 16).any(-1)).sum()),
        "groups": int(l1n.numel() // 16),
        "elements_changed": int(diff.sum()),
        "elements_nonzero": int((exact != 0).sum()),
        "rel_l2_error": float((expanded - exact).norm() / exact.norm().clamp_min(1e-30)),
        "max_abs_error": float((expanded - exact).abs().max()) if exact.numel() else 0.0,
    }


# ----------------------------------------------------------------------------- backend
class TritonBackend(KernelBackend):
    """Triton kernels for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1).

    Options (constructor arguments; defaults from the environment):

    * ``dual_weight`` / ``MXDIT_TRITON_DUAL_WEIGHT`` = ``fp4`` (default: packed
      4-bit weights, expanded to E4M3 per tile inside the GEMM; 4.31 bits per
      weight) or ``fp8`` (expanded once at load: the layer then holds the E4M3
      copy, 8.06 bits, next to its canonical 4-bit weights, ~12.4 bits in all).
      4-bit is the default because memory close to the quantized size is a
      promise; which one is faster on Hopper has not been measured yet (no GPU
      was available) — ``benchmarks/bench_gpu.py`` measures both.
    * ``mxfp4_weight`` / ``MXDIT_TRITON_MXFP4_WEIGHT`` = ``fp4`` (default) or
      ``fp8``: the same choice for single-level MXFP4 weights (exact either way).
    * ``promote`` / ``MXDIT_TRITON_PROMOTE`` = ``1`` (default) or ``0``: fp32
      promotion of FP8 tensor-core partial sums every BLOCK_K <= 128 of K
      (dual-level and per-channel FP8 GEMMs; the MX GEMM promotes every 32).
    * ``mx_matmul`` / ``MXDIT_TRITON_MX_MATMUL`` = ``auto`` (tl.dot_scaled on
      capability >= 10, else explicit), ``explicit`` or ``dot_scaled``.
    * ``fp8_gemm`` / ``MXDIT_TRITON_FP8_GEMM`` = ``auto`` (torch._scaled_mm on
      capability >= 8.9 for bf16 output without bias, else the Triton kernel),
      ``scaled_mm`` or ``triton``.
    * ``hw_cvt`` / ``MXDIT_TRITON_HW_CVT`` = ``auto`` (on for GPUs, off in the
      interpreter), ``1`` or ``0``: hardware fp32->e4m3 / fp32->bf16 conversions
      in the GEMMs instead of the integer ones (same definition, RNE).
    """

    name = "triton"

    def __init__(self, *, dual_weight: Optional[str] = None, mxfp4_weight: Optional[str] = None,
                 promote: Optional[bool] = None, mx_matmul: Optional[str] = None, fp8_gemm: Optional[str] = None,
                 hw_cvt: Optional[str] = None):
        self.dual_weight = dual_weight or _env("MXDIT_TRITON_DUAL_WEIGHT", "fp4", ("fp8", "fp4"))
        self.mxfp4_weight = mxfp4_weight or _env("MXDIT_TRITON_MXFP4_WEIGHT", "fp4", ("fp8", "fp4"))
        self.promote = (promote if promote is not None
                        else _env("MXDIT_TRITON_PROMOTE", "1", ("0", "1")) == "1")
        self.mx_matmul = mx_matmul or _env("MXDIT_TRITON_MX_MATMUL", "auto", ("auto", "explicit", "dot_scaled"))
        self.fp8_gemm = fp8_gemm or _env("MXDIT_TRITON_FP8_GEMM", "auto", ("auto", "scaled_mm", "triton"))
        self.hw_cvt = hw_cvt or _env("MXDIT_TRITON_HW_CVT", "auto", ("auto", "0", "1"))
        for name, val, valid in (("dual_weight", self.dual_weight, ("fp8", "fp4")),
                                 ("mxfp4_weight", self.mxfp4_weight, ("fp8", "fp4")),
                                 ("mx_matmul", self.mx_matmul, ("auto", "explicit", "dot_scaled")),
                                 ("fp8_gemm", self.fp8_gemm, ("auto", "scaled_mm", "triton")),
                                 ("hw_cvt", self.hw_cvt, ("auto", "0", "1"))):
            if val not in valid:
                raise ValueError(f"TritonBackend: {name}={val!r}; valid: {list(valid)}")

    # ---- device checks ------------------------------------------------------
    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        return torch.device(device).type == "cuda" or interpreting()

    @staticmethod
    def kernels_ok(t: torch.Tensor) -> bool:
        """Kernels run on CUDA tensors, and on CPU tensors in the interpreter."""
        return t.is_cuda or (interpreting() and t.device.type == "cpu")

    def _hw(self, t: torch.Tensor) -> bool:
        if self.hw_cvt == "auto":
            return t.is_cuda and not interpreting()
        return self.hw_cvt == "1"

    def use_dot_scaled(self, t: torch.Tensor) -> bool:
        if self.mx_matmul == "explicit":
            return False
        if self.mx_matmul == "dot_scaled":
            return True
        return t.is_cuda and not interpreting() and torch.cuda.get_device_capability(t.device)[0] >= 10

    # ---- activation quantization (canonical outputs) ------------------------
    def quantize_mx(self, x, fmt, *, scale_mode="floor", round_mode="rint"):
        f = F.get_format(fmt)
        check_round_mode(round_mode)
        if scale_mode not in F.SCALE_MODES:
            raise ValueError(f"unknown scale_mode {scale_mode!r}; valid: {list(F.SCALE_MODES)}")
        _check_input(x, 32, "quantize_mx")
        if not self.kernels_ok(x) or x.numel() == 0:
            return super().quantize_mx(x, fmt, scale_mode=scale_mode, round_mode=round_mode)
        lead, k = x.shape[:-1], x.shape[-1]
        q, s = self.quantize_mx_2d(x.reshape(-1, k), f.name, scale_mode=scale_mode, round_mode=round_mode)
        qdata = q if f is FP4_E2M1 else q.view(f.torch_dtype)
        return F.MXTensor(qdata.reshape(*lead, qdata.shape[-1]), s.reshape(*lead, s.shape[-1]), f.name, 32)

    def quantize_mx_dual(self, x, *, smooth_scale=None, round_mode="rint"):
        check_round_mode(round_mode)
        valid = (isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
                 and x.dim() > 0 and x.shape[-1] % F.L0_BLOCK == 0
                 and (smooth_scale is None or smooth_scale.shape == (x.shape[-1],)))
        if not valid or not self.kernels_ok(x) or x.numel() == 0:
            return super().quantize_mx_dual(x, smooth_scale=smooth_scale, round_mode=round_mode)
        lead, k = x.shape[:-1], x.shape[-1]
        q, l1, l0 = self.quantize_dual_2d(x.reshape(-1, k), smooth_scale=smooth_scale, round_mode=round_mode)
        return F.DualMXTensor(q.reshape(*lead, k // 2), l0.reshape(*lead, k // F.L0_BLOCK), l1.reshape(*lead, k // 32))

    # ---- kernel entry points (2-D, used by the linears and the benchmarks) ---
    def quantize_mx_2d(self, x2: torch.Tensor, fmt: str, *, scale_mode: str = "floor", round_mode: str = "rint",
                       smooth_scale: Optional[torch.Tensor] = None, out_e4m3: bool = False):
        """[M, K] -> (codes, scales): FP8 codes uint8 [M, K], FP4 packed [M, K/2] or,
        with ``out_e4m3``, FP4 values as E4M3 bytes [M, K]; E8M0 [M, K/32]."""
        f = F.get_format(fmt)
        x2 = x2.contiguous()
        m, k = x2.shape
        is_fp4 = f is FP4_E2M1
        in_kind, xk = _kernel_input(x2)
        q = torch.empty(m, k // 2 if is_fp4 and not out_e4m3 else k, dtype=torch.uint8, device=x2.device)
        s = torch.empty(m, k // 32, dtype=torch.uint8, device=x2.device)
        sm = xk if smooth_scale is None else _kernel_input(smooth_scale.to(x2.dtype).contiguous())[1]
        _launch("quant", K.mx_quant_kernel,
                lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"])),
                xk, sm, q, s, m, k, xk.stride(0), q.stride(0), s.stride(0),
                IN_KIND=in_kind, HAS_SMOOTH=smooth_scale is not None,
                BITS=f.bits, MBITS=f.mbits, EMIN=1 - f.bias, MAX_CODE=f.max_code, NAN_CODE=f.nan_code or 0,
                EMAX=f.emax, RCEIL=scale_mode == "rceil", RCEIL_MUL_BITS=_f32_bits(1.0 / f.max_value),
                ROUND=_ROUND[round_mode], IS_FP4=is_fp4, OUT_E4M3=out_e4m3)
        return q, s

    def quantize_dual_2d(self, x2: torch.Tensor, *, smooth_scale: Optional[torch.Tensor] = None,
                         round_mode: str = "rint", out_e4m3: bool = False):
        """[M, K] -> canonical (packed [M, K/2], L1 [M, K/32], L0 [M, K/512]) or, with
        ``out_e4m3``, the GEMM operand (E4M3 bytes [M, K], None, L0 with NaN flags)."""
        x2 = x2.contiguous()
        m, k = x2.shape
        in_kind, xk = _kernel_input(x2)
        dev = x2.device
        q = torch.empty(m, k if out_e4m3 else k // 2, dtype=torch.uint8, device=dev)
        l1 = torch.empty(m, k // 32, dtype=torch.uint8, device=dev) if not out_e4m3 else q
        l0 = torch.empty(m, k // F.L0_BLOCK, dtype=torch.float32, device=dev)
        sm = xk if smooth_scale is None else _kernel_input(smooth_scale.to(x2.dtype).contiguous())[1]
        _launch("dual_quant", K.dual_quant_kernel,
                lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), k // F.L0_BLOCK),
                xk, sm, q, l1, l0, m, k, xk.stride(0), q.stride(0), l1.stride(0), l0.stride(0),
                IN_KIND=in_kind, HAS_SMOOTH=smooth_scale is not None, ROUND=_ROUND[round_mode],
                OUT_E4M3=out_e4m3, HW_CVT=self._hw(x2))
        return q, (None if out_e4m3 else l1), l0

    def quantize_fp8_2d(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token E4M3 (quantize_fp8_per_token): (float8_e4m3fn [M, K], float32 [M, 1])."""
        x2 = x2.contiguous()
        m, k = x2.shape
        in_kind, xk = _kernel_input(x2)
        q = torch.empty(m, k, dtype=torch.uint8, device=x2.device)
        s = torch.empty(m, 1, dtype=torch.float32, device=x2.device)
        _launch("fp8_quant", K.fp8_rowwise_quant_kernel, lambda meta: (m,),
                xk, q, s, k, xk.stride(0), q.stride(0), IN_KIND=in_kind)
        return q.view(torch.float8_e4m3fn), s

    def mx_gemm(self, a: torch.Tensor, sa: torch.Tensor, a_fp4: bool, w: TritonMXWeight,
                bias: Optional[torch.Tensor], out_dtype: torch.dtype, dot_scaled: Optional[bool] = None) -> torch.Tensor:
        """a: E4M3 bytes [M, K] or packed FP4 [M, K/2] (``a_fp4``), sa E8M0 [M, K/32]."""
        m = a.shape[0]
        n, k = w.shape
        ds = self.use_dot_scaled(a) if dot_scaled is None else dot_scaled
        out = torch.empty(m, n, dtype=out_dtype, device=a.device)
        b_fmt = "e2m1" if w.packed else "e4m3"
        a_fmt = "e2m1" if a_fp4 else "e4m3"
        bias_t = bias.to(torch.float32).contiguous() if bias is not None else sa
        _launch("mx_ds" if ds else "mx", K.mx_matmul_kernel,
                lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
                a.view(torch.uint8), sa, w.data, w.scale, bias_t, _out_view(out), m, n, k,
                a.stride(0), sa.stride(0), w.data.stride(0), w.scale.stride(0), out.stride(0),
                A_FP4=a_fp4, B_FP4=w.packed, A_FMT=a_fmt, B_FMT=b_fmt, HAS_BIAS=bias is not None,
                OUT_KIND=_OUT_KIND[out_dtype], DOT_SCALED=ds, HW_CVT=self._hw(a))
        return out

    def dual_gemm(self, a8: torch.Tensor, l0a: torch.Tensor, w: TritonDualWeight, bias: Optional[torch.Tensor],
                  out_dtype: torch.dtype, promote: Optional[bool] = None) -> torch.Tensor:
        """a8: E4M3 bytes [M, K] (quantize_dual_2d(out_e4m3=True)), l0a [M, K/512]."""
        m = a8.shape[0]
        n, k = w.shape
        out = torch.empty(m, n, dtype=out_dtype, device=a8.device)
        fp4 = w.mode == "fp4"
        l1 = w.l1 if fp4 else w.l0
        bias_t = bias.to(torch.float32).contiguous() if bias is not None else l0a
        _launch("dual", K.dual_matmul_kernel,
                lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
                a8.view(torch.uint8), l0a, w.data, l1, w.l0, bias_t, _out_view(out), m, n, k,
                a8.stride(0), l0a.stride(0), w.data.stride(0), l1.stride(0), w.l0.stride(0), out.stride(0),
                B_FP4=fp4, HAS_BIAS=bias is not None, OUT_KIND=_OUT_KIND[out_dtype],
                PROMOTE=self.promote if promote is None else promote, HW_CVT=self._hw(a8))
        return out

    def fp8_gemm_2d(self, xq: torch.Tensor, sx: torch.Tensor, w: TritonFP8Weight, bias: Optional[torch.Tensor],
                    out_dtype: torch.dtype, impl: Optional[str] = None, promote: Optional[bool] = None) -> torch.Tensor:
        m, k = xq.shape
        n = w.w.shape[0]
        impl = impl or self.fp8_gemm
        if impl != "triton" and xq.is_cuda and not interpreting():
            cc = torch.cuda.get_device_capability(xq.device)
            usable = cc >= (8, 9) and out_dtype == torch.bfloat16 and bias is None
            if impl == "scaled_mm" or usable:
                out = torch._scaled_mm(xq, w.w.t(), scale_a=sx, scale_b=w.scale.view(1, -1),
                                       out_dtype=out_dtype if usable else torch.float32)
                if not usable:
                    out = (out + bias.to(torch.float32) if bias is not None else out).to(out_dtype)
                return out
        out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
        bias_t = bias.to(torch.float32).contiguous() if bias is not None else sx
        _launch("fp8", K.fp8_rowwise_matmul_kernel,
                lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
                xq.view(torch.uint8), sx, w.w.view(torch.uint8), w.scale, bias_t, _out_view(out), m, n, k,
                xq.stride(0), w.w.stride(0), out.stride(0),
                HAS_BIAS=bias is not None, OUT_KIND=_OUT_KIND[out_dtype],
                PROMOTE=self.promote if promote is None else promote, HW_CVT=self._hw(xq))
        return out

    # ---- weights, once at load ------------------------------------------------
    def prepare_mx_weight(self, w: F.MXTensor) -> TritonMXWeight:
        if w.fmt not in (FP8_E4M3.name, FP4_E2M1.name) or w.block_size != 32 or len(w.shape) != 2:
            return TritonMXWeight(w, None, None)
        scale = w.scale.contiguous()
        if w.fmt == FP8_E4M3.name:
            return TritonMXWeight(w, w.qdata.contiguous().view(torch.uint8), scale, packed=False)
        if self.mxfp4_weight == "fp4":
            return TritonMXWeight(w, w.qdata.contiguous(), scale, packed=True)
        return TritonMXWeight(w, F.fp4_to_fp8_container(w.qdata).view(torch.uint8).contiguous(), scale, packed=False)

    def prepare_dual_weight(self, w: F.DualMXTensor, mode: Optional[str] = None) -> TritonDualWeight:
        mode = mode or self.dual_weight
        if len(w.shape) != 2:
            return TritonDualWeight(w, mode, None, None, None)
        l1n, l0n, ok = normalize_dual_scales(w)
        if not ok:
            return TritonDualWeight(w, mode, None, None, None)
        if mode == "fp4":
            return TritonDualWeight(w, mode, w.qdata.contiguous(), l1n.contiguous(), l0n)
        data = expand_dual_to_e4m3(w.codes(), l1n).view(torch.uint8).contiguous()
        return TritonDualWeight(w, mode, data, None, l0n)

    def prepare_fp8_weight(self, w: torch.Tensor, w_scale: torch.Tensor) -> TritonFP8Weight:
        return TritonFP8Weight(w.contiguous(), w_scale.reshape(-1).to(torch.float32).contiguous())

    # ---- linears ----------------------------------------------------------------
    def mx_linear(self, x, w, bias, *, act_fmt, scale_mode="floor", round_mode="rint", smooth_scale=None,
                  out_dtype=torch.bfloat16):
        wt = w if isinstance(w, TritonMXWeight) else self.prepare_mx_weight(w)
        f = F.get_format(act_fmt)
        k = x.shape[-1]
        ok = (self.kernels_ok(x) and wt.data is not None and f in (FP8_E4M3, FP4_E2M1)
              and x.dtype in _OUT_KIND and out_dtype in _OUT_KIND and k == wt.shape[-1] and k % 32 == 0
              and x.numel() > 0 and scale_mode in F.SCALE_MODES and round_mode in _ROUND)
        if not ok:
            return super().mx_linear(x, wt.ref, bias, act_fmt=act_fmt, scale_mode=scale_mode, round_mode=round_mode,
                                     smooth_scale=smooth_scale, out_dtype=out_dtype)
        lead = x.shape[:-1]
        ds = self.use_dot_scaled(x)
        a_fp4 = f is FP4_E2M1 and ds  # dot_scaled takes packed e2m1; the explicit path wants E4M3 bytes
        a, sa = self.quantize_mx_2d(x.reshape(-1, k), f.name, scale_mode=scale_mode, round_mode=round_mode,
                                    smooth_scale=smooth_scale, out_e4m3=f is FP4_E2M1 and not ds)
        out = self.mx_gemm(a, sa, a_fp4, wt, bias, out_dtype, dot_scaled=ds)
        return out.reshape(*lead, out.shape[-1])

    def dual_linear(self, x, w, bias, *, round_mode="rint", smooth_scale=None, out_dtype=torch.bfloat16,
                    smooth_in_quant: bool = False):
        # smoothing is always fused into the quant kernel here (numerically identical either way)
        wt = w if isinstance(w, TritonDualWeight) else self.prepare_dual_weight(w)
        k = x.shape[-1]
        ok = (self.kernels_ok(x) and wt.data is not None and x.dtype in _OUT_KIND and out_dtype in _OUT_KIND
              and k == wt.shape[-1] and k % F.L0_BLOCK == 0 and x.numel() > 0 and round_mode in _ROUND
              and (smooth_scale is None or smooth_scale.shape == (k,)))
        if not ok:
            return super().dual_linear(x, wt.ref, bias, round_mode=round_mode, smooth_scale=smooth_scale,
                                       out_dtype=out_dtype, smooth_in_quant=smooth_in_quant)
        lead = x.shape[:-1]
        a8, _, l0a = self.quantize_dual_2d(x.reshape(-1, k), smooth_scale=smooth_scale, round_mode=round_mode,
                                           out_e4m3=True)
        out = self.dual_gemm(a8, l0a, wt, bias, out_dtype)
        return out.reshape(*lead, out.shape[-1])

    def quantized_attention(self, q, k, v, *, mode="mxfp8", softmax_scale=None, out_dtype=None):
        """``mxfp8``: the fused MXFP8 flash-attention kernel (:mod:`mxdit.kernels.triton.attention`);
        other modes, and shapes it does not take (Lk of k != v, head_dim not a power of two >= 32),
        run the reference numerics on the device."""
        from mxdit.kernels.triton.attention import mxfp8_attention

        d = q.shape[-1]
        if mode != "mxfp8" or k.shape != v.shape or d < 32 or d & (d - 1):
            return super().quantized_attention(q, k, v, mode=mode, softmax_scale=softmax_scale, out_dtype=out_dtype)
        return mxfp8_attention(q, k, v, softmax_scale).to(out_dtype or q.dtype)

    def fp8_linear(self, x, w, bias, *, out_dtype=torch.bfloat16):
        wt = w if isinstance(w, TritonFP8Weight) else self.prepare_fp8_weight(*w)
        k = x.shape[-1]
        ok = (self.kernels_ok(x) and x.dtype in _OUT_KIND and out_dtype in _OUT_KIND and x.numel() > 0
              and k == wt.w.shape[-1])
        if not ok:
            return super().fp8_linear(x, (wt.w, wt.scale), bias, out_dtype=out_dtype)
        lead = x.shape[:-1]
        xq, sx = self.quantize_fp8_2d(x.reshape(-1, k))
        out = self.fp8_gemm_2d(xq, sx, wt, bias, out_dtype)
        return out.reshape(*lead, out.shape[-1])
