"""TritonBackend: the KernelBackend for NVIDIA GPUs (options: the class docstring).

Launch configurations: :mod:`.configs`; prepared weights and the dual-level expansion:
:mod:`.weights`; the kernels: :mod:`.kernels`.

What is verified, and what is not
---------------------------------
There was **no GPU** for this work.

* Verified in the Triton 3.9 interpreter on CPU (tests/test_triton_backend.py):
  quantization bit-exact against ``mxdit.formats`` (scale bytes, L0 bits,
  codes; fp32 / bf16 / fp16; zero, -0, fp32-subnormal, 2^-126, NaN, +-Inf, huge,
  saturating, rceil-boundary and exact-tie blocks; ragged M 1 / 3 / 17 and K at
  tile edges); every GEMM path (explicit and ``tl.dot_scaled`` MX, both weight
  modes, dual-level with and without promotion, FP8 per-channel Triton GEMM)
  against the reference backend within fp32 accumulation-order error (ragged
  M, N, K; bias; fp32 / bf16 output); the dual-level exactness boundary
  (L1 = 119 exact) and the measured error below it; QuantLinear /
  quantize_module end to end.  The interpreter computes ``tl.dot`` in exact
  fp32 (numpy), so promotion cannot change anything there.
* Verified by compiling for sm_90a without a GPU (``python -m
  mxdit.kernels.triton.aot_check``: Triton 3.9 + its bundled ptxas, launch-like
  specialization): every kernel and autotune config compiles; the GEMMs use
  ``wgmma`` with cp.async multi-stage pipelining and, in the default promoted
  mode, do not spill (16 bytes in one dual config; the non-promoted dual
  variants with fp4 weights spill up to ~0.5 KB); the quantizers use 16-byte
  vector loads and IEEE ``div.rn.f32``; the hardware ``cvt.rn.satfinite.e4m3x2``
  appears where intended; ``tl.dot_scaled`` lowers to ``tcgen05.mma`` for
  sm_100a.  (Without the launch-time divisibility specialization the same
  kernels compile unpipelined: a real launch specializes 16-divisible sizes.)
* **Not verified**: anything that needs a GPU -- speed (no number in this
  package is a measurement of these kernels), the autotune choices, Hopper's
  FP8 accumulation error with / without promotion (benchmarks/bench_gpu.py
  prints it), the GPU-only code paths (``HW_CVT=True`` conversions, bf16
  hardware output cast, ``torch._scaled_mm``), the Triton 3.6 of the H200 image
  (this was developed against 3.9), and bench_gpu.py itself beyond a CPU
  ``--smoke`` run of its code paths.  Run bench_gpu.py first on a GPU: it also
  re-checks bit-exactness and the GEMMs against the references there.

Reference quirk (not this backend's): for bf16 input with ``round_mode="rint"``
the reference writes 0xFF (negative NaN) FP8 codes into NaN-scale blocks on the
vectorized CPU path (``recip.to(bfloat16)`` of NaN is 0xFFFF) and 0x7F on the
scalar path; this backend always writes 0x7F.  Both are NaN codes; the tests
compare such blocks as "all NaN".  Also, torch on CUDA divides a tensor by the
Python scalar 448 as a reciprocal multiply, so the reference per-token FP8 scale
(``amax / 448``) differs by an ulp between CPU and GPU; the kernel divides (CPU).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from mxdit import formats as F
from mxdit.formats.elements import FP4_E2M1, FP8_E4M3, check_round_mode
from mxdit.formats.mx import _check_input
from mxdit.kernels.base import KernelBackend
from mxdit.kernels.triton import kernels as K
from mxdit.kernels.triton.configs import _env, _launch, interpreting
from mxdit.kernels.triton.weights import (
    TritonDualWeight, TritonFP8Weight, TritonMXWeight, expand_dual_to_e4m3, normalize_dual_scales,
)

_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ROUND = {"rint": 0, "round": 1, "floor": 2}


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
