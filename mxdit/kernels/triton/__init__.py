"""The NVIDIA GPU backend: Triton kernels for MX quantization and MX matmuls.

``TritonBackend`` (registered as ``"triton"``; ``select_backend`` picks it for CUDA
tensors) implements :class:`mxdit.kernels.base.KernelBackend`.  Importing this
package needs ``triton`` (an ImportError otherwise, which ``select_backend``
handles) but no GPU.  Kernels run on CUDA tensors, and on CPU tensors when
``TRITON_INTERPRET=1`` (the Triton interpreter; this is how the tests run).
Anything else (CPU tensors without the interpreter, E5M2 activations, shapes
the kernels do not take) falls back to the reference numerics.

Kernels (``kernels.py``)
------------------------
**Activation quantization**, one pass over the tensor (tile of rows x K):
``mx_quant_kernel`` (MXFP8 E4M3/E5M2, MXFP4 packed with the even index in the low
nibble, or MXFP4 written straight as E4M3 bytes for the GEMM), ``dual_quant_kernel``
(dual-level MXFP4, canonical or GEMM-ready), ``fp8_rowwise_quant_kernel`` (the
"fp8" method's per-token E4M3).  Bit-exact with ``mxdit.formats.quantize_mx`` /
``quantize_mx_dual`` / ``quantize_fp8_per_token``: floor and rceil scales from
the fp32 exponent bits, rint / round / floor element rounding and saturation by
integer arithmetic on the fp32 bits (no float log2, no float casts), NaN/Inf
blocks -> 0xFF, byte 0 = 2^-127, the dual-level L0 = fp32(amax) * fp32(1/6)
flushed below 2^-126, temp = IEEE fp32(x) / L0 (``div_rn``) rounded half-even to
the input dtype, L1 from temp's exponent field.  Optional smoothing
(``x * smooth_scale`` rounded in x's dtype) is fused.

**MXFP8 / single-level MXFP4 GEMM** (``mx_matmul_kernel``).  Hopper (and the
interpreter): FP8 tensor-core tiles with the per-32 scales applied in the loop:
for each 32-wide K chunk, ``acc += (dot(a, b) * 2^(sa-127)[:, None]) * 2^(sb-127)[None, :]``
(fresh accumulator per chunk, exact power-of-two scalings, fp32 accumulation).
FP4 operands are FP4 values, which are E4M3 values: activations are quantized
straight to E4M3 bytes; weights are packed FP4 expanded per tile
(``mxfp4_weight="fp4"``) or expanded once at load (``"fp8"``).  Capability >= 10:
``tl.dot_scaled`` with the E8M0 scales (native MX MMA; packed e2m1 operands).
Not used on Hopper, where Triton emulates it by upcasting to bf16 and, up to
Triton 3.8, decodes E8M0 byte 0 as 0 and 255 as Inf (mx-numerics.md §7; the
H200 image has Triton 3.6).  Predicted cost on Hopper (not measured): the
rescale is 2 fp32 operations per output per 32 of K on the CUDA cores, about as
long as the FP8 MMA itself, so expect BF16-like, not FP8-like, throughput.

**Dual-level MXFP4 on FP8 tensor cores** (``dual_matmul_kernel``).  Within a
512-group an FP4 value times its L1 scale is exactly an E4M3 value when the
block's L1 is within 2^-8 of the group's largest (FP4 {0.5..6} x 2^e, e in
[-8, 0], lies on E4M3's grid: minimum subnormal 2^-9, max 448).  The quantizer's
largest L1 in a group is 127 by construction (max |temp| rounds to 6); weights
are normalized at load so that it is (the factor moves into L0 exactly).  So
both operands become E4M3 (value * 2^(L1-127), round-half-even for smaller L1)
with one fp32 L0 per 512 per row / column, and the matmul is an FP8 GEMM with
one scale-and-accumulate per chunk: **exact vs the reference up to fp32
accumulation order when every L1 byte of a group is >= 119**; blocks with
L1 < 119 lose their values below 2^-9 x the group scale.  Groups holding an
L1 = 0xFF block get L0 = NaN (NaN never goes through an FP8 operand).  Weight
modes (``dual_weight`` / ``MXDIT_TRITON_DUAL_WEIGHT``): ``fp8`` expanded once at
load (8.06 bits per weight; the default: no per-tile expansion work) or ``fp4``
packed 4-bit + L1, expanded per tile in the kernel (4.31 bits per weight); both
produce the same E4M3 operand and, in the interpreter, bit-identical outputs.
(The layer keeps its canonical 4-bit parameters too, so ``fp8`` mode holds about
12.4 bits per weight in memory; ``fp4`` mode reuses the packed storage and adds
only the normalized scales.)
Promotion (``promote`` / ``MXDIT_TRITON_PROMOTE``, default on): each BLOCK_K <= 128
chunk is its own tensor-core dot whose partial is scaled and added in fp32 (so
Hopper's reduced-precision FP8 accumulation never spans more than 128 of K);
off: a whole 512-group accumulates inside ``tl.dot`` (Triton's default
``max_num_imprecise_acc`` on sm_90) and is scaled once.

**FP8 per-channel** ("fp8" method): ``torch._scaled_mm`` with row-wise scales on
capability >= 8.9 when the output is bf16 and there is no bias (its epilogue
would round an fp32 bias to bf16), else ``fp8_rowwise_matmul_kernel`` (fp32
bias, any output dtype, same promotion option).

All GEMMs accumulate in fp32, add the fp32 bias in fp32 and cast to the output
dtype in the epilogue; tile order is grouped for L2 reuse; autotune configs for
H100/H200 are in ``backend.py``.  Under the interpreter one small deterministic
config per kernel is used (16x32 output tiles, BLOCK_K 64 / 128) and nothing is
autotuned.  Options: see :class:`TritonBackend`.

Dual-level expansion error, measured (``dual_expansion_stats``; synthetic data,
1024 x 5120 bf16; CPU):

=====================================  ============  ===============  ===============
tensor                                 blocks < 119  elements changed expanded rel L2
=====================================  ============  ===============  ===============
weights N(0, 0.02)                     0 %           0                0 (exact)
weights t(3) x 0.02, 1 % channels x8   0 %           0                0 (exact)
activations N(0,1), 0.5 % ch x50,      0.31 %        0.08 %           6.5e-5
0.1 % ch x300
activations N(0,1), 0.1 % ch x1000     17.5 %        6.7 %            1.7e-4
=====================================  ============  ===============  ===============

(the dual-level FP4 quantization error itself is 1.2e-1, 1.3e-1, 4.8e-2 and
6.6e-3 on these tensors).  A block 2^-11 below its group's largest loses ~60 %
(L2) of its own contribution (tests/test_triton_backend.py).

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

Interpreter limitations met (Triton 3.9), and how the kernels deal with them
* fp32 -> fp8 ``.to()`` is not IEEE: it rounds half up on the first dropped
  bit, does not saturate, mishandles subnormal results and NaN/Inf; fp32 ->
  bf16 likewise (and a mantissa carry can be lost).  Every narrowing that must
  be exact is integer arithmetic (``HW_CVT=False`` in the interpreter); on a GPU
  two of them use the hardware ``cvt.rn`` conversions, which are RNE by
  definition (PTX), selectable off with ``MXDIT_TRITON_HW_CVT=0``.
* fp8 ``tl.dot`` decodes the E4M3 NaN code 0x7F as +-480: NaN travels in the
  scales (0xFF E8M0 -> NaN factor; NaN L0), never in FP8 operands.
* A scalar-valued mask (``mask & (k < K)``) raises "mask has unsupported
  dtype": masks are built as vectors.
* ``num_stages``, ``num_warps``, ``max_num_imprecise_acc`` and autotuning are
  ignored / unused.

Reference quirk (not this backend's): for bf16 input with ``round_mode="rint"``
the reference writes 0xFF (negative NaN) FP8 codes into NaN-scale blocks on the
vectorized CPU path (``recip.to(bfloat16)`` of NaN is 0xFFFF) and 0x7F on the
scalar path; this backend always writes 0x7F.  Both are NaN codes; the tests
compare such blocks as "all NaN".  Also, torch on CUDA divides a tensor by the
Python scalar 448 as a reciprocal multiply, so the reference per-token FP8 scale
(``amax / 448``) differs by an ulp between CPU and GPU; the kernel divides (CPU).
"""
import triton  # noqa: F401  (ImportError when triton is missing: select_backend falls back)

from mxdit.kernels.triton.backend import (
    DUAL_EXACT_MIN_L1, TritonBackend, TritonDualWeight, TritonFP8Weight, TritonMXWeight,
    dual_expansion_stats, expand_dual_to_e4m3, interpreting, normalize_dual_scales,
)

__all__ = [
    "TritonBackend", "TritonMXWeight", "TritonDualWeight", "TritonFP8Weight", "DUAL_EXACT_MIN_L1",
    "dual_expansion_stats", "expand_dual_to_e4m3", "interpreting", "normalize_dual_scales",
]
