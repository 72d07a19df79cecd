"""Triton kernels: fused MX activation quantization and MX / dual-level / FP8 matmuls.

Everything that must be bit-exact is integer arithmetic on fp32 bit patterns
(exponent fields, shifts, explicit round-half-even / half-away / truncate),
so it means the same on a GPU and in the Triton interpreter.  The only float
operations are those the reference performs too, in the same precision:
fp32 multiplies by exact powers of two, the rceil ``amax * fp32(1/max)`` and
dual-level ``amax * fp32(1/6)`` products, and IEEE divisions
(``tl.math.div_rn``, round-to-nearest, like torch's fp32 division on CPU).

Conventions shared by all kernels
* bf16 tensors are passed as ``int16`` views and widened with ``bits << 16``
  (exact); bf16 outputs are produced by an explicit round-half-even on the
  fp32 bits (``HW_CVT=False``) or by the hardware conversion (``HW_CVT=True``,
  ``cvt.rn``).  fp8 operands are passed as ``uint8`` views and bitcast.
* The Triton interpreter's fp32->fp8 and fp32->bf16 casts are *not* IEEE
  round-to-nearest-even (they round half up on the first dropped bit, do not
  saturate and mishandle subnormals, triton 3.9 ``interpreter._convert_float``),
  so kernels run there with ``HW_CVT=False``: every narrowing is done by the
  integer encoder below, which is also what the tests verify.  On a GPU the
  backend passes ``HW_CVT=True`` for the two places where a hardware
  conversion is cheaper and has the same definition (fp32->e4m3
  ``cvt.rn.satfinite`` in the dual-level / FP4 weight expansion, and the
  bf16 output cast); the activation quantizers always use the integer path.
* The interpreter's fp8 ``tl.dot`` decodes the NaN code 0x7F as 480, so NaN
  never travels through fp8 operands here: NaN blocks are carried by their
  scales (E8M0 0xFF -> NaN factor; dual-level groups -> NaN L0).

What each kernel does
---------------------
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

**FP8 per-channel** ("fp8" method): ``torch._scaled_mm`` with row-wise scales on
capability >= 8.9 when the output is bf16 and there is no bias (its epilogue
would round an fp32 bias to bf16), else ``fp8_rowwise_matmul_kernel`` (fp32
bias, any output dtype, same promotion option).

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
"""
from __future__ import annotations

import triton
import triton.language as tl

F32_TINY_BITS = tl.constexpr(0x00800000)  # 2^-126
ONE_SIXTH_BITS = tl.constexpr(0x3E2AAAAB)  # fp32(1/6), the dual-level L0 multiplier


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _load_f32(ptrs, mask, IN_KIND: tl.constexpr):
    """Load as fp32 (exact). IN_KIND: 0 fp32, 1 bf16 (int16 view), 2 fp16."""
    if IN_KIND == 1:
        v = tl.load(ptrs, mask=mask, other=0)
        return ((v.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    elif IN_KIND == 2:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _round_bf16_bits(x):
    """fp32 -> fp32 bit pattern of the bf16 round-half-even value (low 16 bits zero)."""
    b = x.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return tl.where((b & 0x7FFFFFFF) > 0x7F800000, b | 0x00400000, r) & -65536


@triton.jit
def _round_to_input(v, IN_KIND: tl.constexpr):
    """Round an fp32 value to the input dtype (RNE) and back to fp32."""
    if IN_KIND == 1:
        return _round_bf16_bits(v).to(tl.float32, bitcast=True)
    elif IN_KIND == 2:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _encode_mag(y, MBITS: tl.constexpr, EMIN: tl.constexpr, MAX_CODE: tl.constexpr, ROUND: tl.constexpr):
    """|y| (fp32) -> magnitude code of a float format with MBITS mantissa bits and
    minimum normal exponent EMIN, saturating at MAX_CODE (finite overflow and Inf).

    ROUND: 0 half-to-even ("rint"), 1 half-away ("round"), 2 toward zero ("floor").
    The code is the number of subnormal quanta below 2^EMIN, and
    ((e - EMIN) << MBITS) + significand above it; a round-up carry moves into the
    exponent naturally.  NaN inputs give garbage: callers override them.
    """
    a = y.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    e = (a >> 23) - 127
    sig = (a & 0x7FFFFF) | 0x800000
    shift = tl.minimum(23 - MBITS + tl.maximum(EMIN - e, 0), 30)
    q = sig >> shift
    rem = sig & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if ROUND == 0:
        up = (rem > half) | ((rem == half) & ((q & 1) != 0))
    elif ROUND == 1:
        up = rem >= half
    else:
        up = rem < 0
    code = (tl.maximum(e - EMIN, 0) << MBITS) + q + up.to(tl.int32)
    return tl.minimum(code, MAX_CODE)


@triton.jit
def _f32_to_e4m3_u8(v, HW_CVT: tl.constexpr):
    """fp32 -> E4M3 bits (uint8): round half to even, saturating to +-448."""
    if HW_CVT:
        return v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        mag = _encode_mag(v, 3, -6, 0x7E, 0)
        sign = (v.to(tl.int32, bitcast=True) >> 24) & 0x80
        return (mag | sign).to(tl.uint8)


@triton.jit
def _fp4_to_e4m3_bits(code):
    """FP4 E2M1 code (int32, 0..15) -> the E4M3 bits of the same value (exact)."""
    mag = code & 7
    e4 = tl.where(mag >= 2, (mag << 2) + 0x30, tl.where(mag == 1, 0x30, 0))
    return e4 | ((code & 8) << 4)


@triton.jit
def _fp4_scaled_f32(code, l1):
    """fp4(code) * 2^(l1 - 127) as fp32, exact for l1 in [2, 252]; values below
    2^-126 become a signed 0 (they are far below E4M3's range)."""
    mag = code & 7
    field = tl.where(mag >= 2, (mag >> 1) + l1 - 1, l1 - 1)
    mant = tl.where(mag >= 2, (mag & 1) << 22, 0)
    bits = tl.where((mag == 0) | (field <= 0), 0, (field << 23) | mant)
    return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_to_f32(s):
    """E8M0 byte (int32) -> fp32 2^(s-127); byte 0 is 2^-127 exactly, 255 is NaN."""
    bits = tl.where(s == 0, 0x00400000, s << 23)
    bits = tl.where(s == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_recip_f32(s):
    """E8M0 byte (int32) -> fp32 2^(127-s); 254 -> 2^-127; 255 -> NaN."""
    rb = 254 - s
    bits = tl.where(rb == 0, 0x00400000, rb << 23)
    bits = tl.where(s == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _pack_fp4(codes, BM: tl.constexpr, BK: tl.constexpr):
    """[BM, BK] int32 codes -> [BM, BK/2] uint8, even index in the low nibble."""
    lo, hi = tl.split(tl.reshape(codes, [BM, BK // 2, 2]))
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def _unpack_fp4(packed, R: tl.constexpr, KB: tl.constexpr):
    """[R, KB] uint8 -> [R, 2*KB] int32 codes (even index from the low nibble)."""
    p = packed.to(tl.int32)
    return tl.reshape(tl.join(p & 0xF, (p >> 4) & 0xF), [R, 2 * KB])


@triton.jit
def _store_out(c_ptr, acc, offs, mask, OUT_KIND: tl.constexpr, HW_CVT: tl.constexpr):
    """OUT_KIND: 0 fp32, 1 bf16 (c_ptr is an int16 view), 2 fp16."""
    if OUT_KIND == 1:
        if HW_CVT:
            tl.store(c_ptr + offs, acc.to(tl.bfloat16).to(tl.int16, bitcast=True), mask=mask)
        else:
            tl.store(c_ptr + offs, (_round_bf16_bits(acc) >> 16).to(tl.int16), mask=mask)
    elif OUT_KIND == 2:
        tl.store(c_ptr + offs, acc.to(tl.float16), mask=mask)
    else:
        tl.store(c_ptr + offs, acc, mask=mask)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) order of output tiles."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size
    return pid_m, pid_n


# ----------------------------------------------------------------------------- quantization
@triton.jit
def mx_quant_kernel(
    x_ptr, smooth_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
    IN_KIND: tl.constexpr, HAS_SMOOTH: tl.constexpr,
    BITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, MAX_CODE: tl.constexpr, NAN_CODE: tl.constexpr,
    EMAX: tl.constexpr, RCEIL: tl.constexpr, RCEIL_MUL_BITS: tl.constexpr,
    ROUND: tl.constexpr, IS_FP4: tl.constexpr, OUT_E4M3: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Single-level MX quantization of a [M, K] tile grid, blocks of 32 along K.

    Outputs: FP8 codes [M, K] (uint8), or FP4 packed [M, K/2], or (OUT_E4M3) FP4
    values as E4M3 bytes [M, K] (the GEMM-ready layout); E8M0 scales [M, K/32].
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    NB: tl.constexpr = BLOCK_K // 32
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < M
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = _load_f32(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask, IN_KIND)
    if HAS_SMOOTH:
        sm = _load_f32(smooth_ptr + cols, cmask, IN_KIND)
        x = _round_to_input(x * sm[None, :], IN_KIND)

    xb = tl.reshape(x, [BLOCK_M, NB, 32])
    xbits = xb.to(tl.int32, bitcast=True)
    amax = tl.max(xbits & 0x7FFFFFFF, axis=2)  # integer max of |x| bits; NaN/Inf sort on top
    if RCEIL:
        c = tl.full([BLOCK_M, NB], RCEIL_MUL_BITS, tl.int32).to(tl.float32, bitcast=True)
        d = (amax.to(tl.float32, bitcast=True) * c).to(tl.int32, bitcast=True)
        de = (d >> 23) & 0xFF
        dm = d & 0x7FFFFF
        up = tl.where(de == 0, dm > 0x400000, dm != 0)
        scale = tl.where(de == 255, 255, de + up.to(tl.int32))
    else:
        scale = tl.where(amax < 0x7F800000, tl.minimum(tl.maximum((amax >> 23) - EMAX, 0), 254), 255)

    y = xb * _e8m0_recip_f32(scale)[:, :, None]  # exact power-of-two product
    mag = _encode_mag(y, MBITS, EMIN, MAX_CODE, ROUND)
    codes = mag | (((xbits >> 31) & 1) << (BITS - 1))
    nanblk = (scale == 255)[:, :, None]
    if IS_FP4:
        codes = tl.where(nanblk, 0, codes)
    else:
        codes = tl.where(nanblk, NAN_CODE, codes)
    codes = tl.reshape(codes, [BLOCK_M, BLOCK_K])

    if IS_FP4 and not OUT_E4M3:
        pc = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        tl.store(q_ptr + rows64[:, None] * stride_qm + pc[None, :], _pack_fp4(codes, BLOCK_M, BLOCK_K),
                 mask=rmask[:, None] & (pc < K // 2)[None, :])
    else:
        if IS_FP4:
            codes = _fp4_to_e4m3_bits(codes)
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], codes.to(tl.uint8), mask=mask)
    sc = pid_k * NB + tl.arange(0, NB)
    tl.store(s_ptr + rows64[:, None] * stride_sm + sc[None, :], scale.to(tl.uint8),
             mask=rmask[:, None] & (sc < K // 32)[None, :])


@triton.jit
def dual_quant_kernel(
    x_ptr, smooth_ptr, q_ptr, l1_ptr, l0_ptr, M, K, stride_xm, stride_qm, stride_l1m, stride_l0m,
    IN_KIND: tl.constexpr, HAS_SMOOTH: tl.constexpr, ROUND: tl.constexpr,
    OUT_E4M3: tl.constexpr, HW_CVT: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Dual-level MXFP4 of one 512-element group per program column (see
    mxdit.formats.dual for the semantics, reproduced step by step).

    Canonical outputs: packed FP4 [M, K/2], L1 bytes [M, K/32], L0 fp32 [M, K/512].
    OUT_E4M3 (the GEMM-ready layout): E4M3 bytes of fp4 * 2^(L1-127) [M, K] and
    L0 [M, K/512], NaN where the group holds an L1 = 0xFF block (whose bytes are 0).
    """
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = g * 512 + tl.arange(0, 512)
    rmask = rows < M
    mask = rmask[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)
    x = _load_f32(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask, IN_KIND)
    if HAS_SMOOTH:
        sm = _load_f32(smooth_ptr + cols, cols < K, IN_KIND)
        x = _round_to_input(x * sm[None, :], IN_KIND)

    # L0 = fp32(amax with Inf/NaN counted as 0) * fp32(1/6), flushed below 2^-126
    a = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    amax = tl.max(tl.where(a < 0x7F800000, a, 0), axis=1)
    sixth = tl.full([BLOCK_M], ONE_SIXTH_BITS, tl.int32).to(tl.float32, bitcast=True)
    l0 = amax.to(tl.float32, bitcast=True) * sixth
    l0 = tl.where(l0.to(tl.int32, bitcast=True) < F32_TINY_BITS, 0.0, l0)

    # temp = fp32(x) / L0 (IEEE), zeros kept, rounded to nearest-even in x's dtype
    temp = tl.where(x == 0, x, tl.math.div_rn(x, l0[:, None]))
    temp = _round_to_input(temp, IN_KIND)

    t3 = tl.reshape(temp, [BLOCK_M, 16, 32])
    tbits = t3.to(tl.int32, bitcast=True)
    e = tl.max(tbits & 0x7FFFFFFF, axis=2) >> 23  # largest exponent field; NaN/Inf -> 255
    l1 = tl.where(e == 255, 255, tl.where(e <= 2, 0, e - 2))
    y = t3 * _e8m0_recip_f32(l1)[:, :, None]
    codes = _encode_mag(y, 1, 0, 7, ROUND) | ((tbits >> 28) & 8)
    codes = tl.where(((e == 0) | (e == 255))[:, :, None], 0, codes)

    gc = g + tl.arange(0, 1)
    if OUT_E4M3:
        v = _fp4_scaled_f32(codes, l1[:, :, None])
        e4 = tl.reshape(_f32_to_e4m3_u8(v, HW_CVT), [BLOCK_M, 512])
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], e4, mask=mask)
        bad = tl.max((e == 255).to(tl.int32), axis=1) > 0
        l0 = tl.where(bad, float("nan"), l0)
    else:
        pc = g * 256 + tl.arange(0, 256)
        tl.store(q_ptr + rows64[:, None] * stride_qm + pc[None, :],
                 _pack_fp4(tl.reshape(codes, [BLOCK_M, 512]), BLOCK_M, 512), mask=rmask[:, None])
        lc = g * 16 + tl.arange(0, 16)
        tl.store(l1_ptr + rows64[:, None] * stride_l1m + lc[None, :], l1.to(tl.uint8), mask=rmask[:, None])
    tl.store(l0_ptr + rows64[:, None] * stride_l0m + gc[None, :], l0[:, None], mask=rmask[:, None])


@triton.jit
def fp8_rowwise_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                             IN_KIND: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row E4M3: scale = max(amax, 2^-126) / 448, q = RNE(x / scale) saturated
    (mxdit.kernels.base.quantize_fp8_per_token, with IEEE divisions)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        m = k0 + offs < K
        x = _load_f32(x_ptr + row * stride_xm + k0 + offs, m, IN_KIND)
        amax = tl.maximum(amax, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
    am = tl.maximum(tl.max(amax, axis=0), F32_TINY_BITS)  # NaN bits stay on top
    scale = tl.math.div_rn(am.to(tl.float32, bitcast=True), 448.0)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        m = k0 + offs < K
        x = _load_f32(x_ptr + row * stride_xm + k0 + offs, m, IN_KIND)
        q = tl.math.div_rn(x, scale)
        code = _f32_to_e4m3_u8(q, False)
        code = tl.where(q != q, 0x7F, code.to(tl.int32)).to(tl.uint8)
        tl.store(q_ptr + row * stride_qm + k0 + offs, code, mask=m)


# ----------------------------------------------------------------------------- matmuls
@triton.jit
def _load_fp8_rows(ptr, rows64, stride, k0, rmask, K, FP4: tl.constexpr, R: tl.constexpr, KW: tl.constexpr):
    """[R, KW] E4M3 operand rows starting at k0 (K-contiguous storage), from E4M3
    bytes or from packed FP4 (expanded exactly: FP4 values are E4M3 values)."""
    if FP4:
        kb = k0 // 2 + tl.arange(0, KW // 2)
        p = tl.load(ptr + rows64[:, None] * stride + kb[None, :], mask=rmask[:, None] & (kb < K // 2)[None, :], other=0)
        return _fp4_to_e4m3_bits(_unpack_fp4(p, R, KW // 2)).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        kk = k0 + tl.arange(0, KW)
        v = tl.load(ptr + rows64[:, None] * stride + kk[None, :], mask=rmask[:, None] & (kk < K)[None, :], other=0)
        return v.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _load_fp8_cols(ptr, cols64, stride, k0, cmask, K, KW: tl.constexpr):
    """[KW, C] E4M3 tile of a K-contiguous [N, K] matrix (the B operand, K-major)."""
    kk = k0 + tl.arange(0, KW)
    v = tl.load(ptr + cols64[None, :] * stride + kk[:, None], mask=cmask[None, :] & (kk < K)[:, None], other=0)
    return v.to(tl.float8e4nv, bitcast=True)


@triton.jit
def mx_matmul_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K,
    stride_am, stride_sam, stride_bn, stride_sbn, stride_cm,
    A_FP4: tl.constexpr, B_FP4: tl.constexpr, A_FMT: tl.constexpr, B_FMT: tl.constexpr,
    HAS_BIAS: tl.constexpr, OUT_KIND: tl.constexpr, DOT_SCALED: tl.constexpr, HW_CVT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = sum_j dot32_j(a, b) * 2^(sa_j-127) * 2^(sb_j-127) (+ bias), fp32 accumulation.

    A: E4M3 bytes [M, K] or packed FP4 [M, K/2]; B likewise [N, K] / [N, K/2];
    scales E8M0 [M, K/32], [N, K/32].  DOT_SCALED=False (Hopper and the
    interpreter): one FP8 tensor-core dot per 32-wide K chunk into a fresh
    accumulator, scaled by the outer product of the two block scales and added in
    fp32.  DOT_SCALED=True (native MX on capability >= 10): tl.dot_scaled per
    BLOCK_K with the E8M0 scales.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    NS: tl.constexpr = BLOCK_K // 32
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if DOT_SCALED:
            if A_FP4:
                ka = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                a = tl.load(a_ptr + rm64[:, None] * stride_am + ka[None, :],
                            mask=mmask[:, None] & (ka < K // 2)[None, :], other=0)
            else:
                a = _load_fp8_rows(a_ptr, rm64, stride_am, k0, mmask, K, False, BLOCK_M, BLOCK_K)
            if B_FP4:
                kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                b = tl.load(b_ptr + rn64[None, :] * stride_bn + kb[:, None],
                            mask=nmask[None, :] & (kb < K // 2)[:, None], other=0)
            else:
                b = _load_fp8_cols(b_ptr, rn64, stride_bn, k0, nmask, K, BLOCK_K)
            ks = k0 // 32 + tl.arange(0, NS)
            kmask = ks < K // 32
            sa = tl.load(sa_ptr + rm64[:, None] * stride_sam + ks[None, :], mask=mmask[:, None] & kmask[None, :], other=127)
            sb = tl.load(sb_ptr + rn64[:, None] * stride_sbn + ks[None, :], mask=nmask[:, None] & kmask[None, :], other=127)
            acc = tl.dot_scaled(a, sa, A_FMT, b, sb, B_FMT, acc)
        else:
            for j in tl.static_range(NS):
                kc = k0 + j * 32
                a = _load_fp8_rows(a_ptr, rm64, stride_am, kc, mmask, K, A_FP4, BLOCK_M, 32)
                if B_FP4:
                    b = tl.trans(_load_fp8_rows(b_ptr, rn64, stride_bn, kc, nmask, K, True, BLOCK_N, 32))
                else:
                    b = _load_fp8_cols(b_ptr, rn64, stride_bn, kc, nmask, K, 32)
                part = tl.dot(a, b)
                sa = tl.load(sa_ptr + rm64 * stride_sam + kc // 32, mask=mmask & (rm * 0 + kc < K),
                             other=127).to(tl.int32)
                sb = tl.load(sb_ptr + rn64 * stride_sbn + kc // 32, mask=nmask & (rn * 0 + kc < K),
                             other=127).to(tl.int32)
                acc += (part * _e8m0_to_f32(sa)[:, None]) * _e8m0_to_f32(sb)[None, :]  # exact power-of-two scalings
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0)[None, :]
    _store_out(c_ptr, acc, rm64[:, None] * stride_cm + rn[None, :], mmask[:, None] & nmask[None, :], OUT_KIND, HW_CVT)


@triton.jit
def _load_dual_b(b_ptr, l1_ptr, rn64, nmask, k0, K, stride_bn, stride_l1n,
                 B_FP4: tl.constexpr, HW_CVT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_K, BLOCK_N] E4M3 tile of the dual-level weight: stored expanded
    (B_FP4=False) or expanded here from packed FP4 and its (normalized) L1 bytes."""
    if B_FP4:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        p = tl.load(b_ptr + rn64[:, None] * stride_bn + kb[None, :], mask=nmask[:, None], other=0)
        codes = tl.reshape(_unpack_fp4(p, BLOCK_N, BLOCK_K // 2), [BLOCK_N, BLOCK_K // 32, 32])
        ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        l1 = tl.load(l1_ptr + rn64[:, None] * stride_l1n + ks[None, :], mask=nmask[:, None], other=0).to(tl.int32)
        v = tl.reshape(_fp4_scaled_f32(codes, l1[:, :, None]), [BLOCK_N, BLOCK_K])
        return tl.trans(_f32_to_e4m3_u8(v, HW_CVT).to(tl.float8e4nv, bitcast=True))
    else:
        return _load_fp8_cols(b_ptr, rn64, stride_bn, k0, nmask, K, BLOCK_K)


@triton.jit
def dual_matmul_kernel(
    a_ptr, l0a_ptr, b_ptr, l1b_ptr, l0b_ptr, bias_ptr, c_ptr, M, N, K,
    stride_am, stride_l0am, stride_bn, stride_l1bn, stride_l0bn, stride_cm,
    B_FP4: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_KIND: tl.constexpr,
    PROMOTE: tl.constexpr, HW_CVT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Dual-level MXFP4 as an FP8 GEMM: A = E4M3(fp4 * 2^(L1-127)) [M, K] with
    L0a [M, K/512]; B the same [N, K] (or packed FP4 + L1, expanded per tile) with
    L0b [N, K/512].  out = sum_g L0a*L0b * (A_g . B_g) (+ bias).

    PROMOTE=True: every BLOCK_K (<= 128) chunk is its own tensor-core dot whose
    result is scaled by the group's L0a*L0b and added to the fp32 accumulator
    (partial sums leave the tensor core at least every 128 of K).  PROMOTE=False:
    a whole 512-group accumulates inside tl.dot (on sm_90 with Triton's default
    max_num_imprecise_acc, i.e. Hopper's reduced-precision FP8 accumulation),
    then is scaled once.  In the interpreter both are plain fp32.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if PROMOTE:
        for k0 in range(0, K, BLOCK_K):
            a = _load_fp8_rows(a_ptr, rm64, stride_am, k0, mmask, K, False, BLOCK_M, BLOCK_K)
            b = _load_dual_b(b_ptr, l1b_ptr, rn64, nmask, k0, K, stride_bn, stride_l1bn, B_FP4, HW_CVT, BLOCK_N, BLOCK_K)
            part = tl.dot(a, b)
            g = k0 // 512
            la = tl.load(l0a_ptr + rm64 * stride_l0am + g, mask=mmask, other=0.0)
            lb = tl.load(l0b_ptr + rn64 * stride_l0bn + g, mask=nmask, other=0.0)
            acc += (part * la[:, None]) * lb[None, :]
    else:
        for g in range(0, K // 512):
            accg = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for kk in range(0, 512, BLOCK_K):
                k0 = g * 512 + kk
                a = _load_fp8_rows(a_ptr, rm64, stride_am, k0, mmask, K, False, BLOCK_M, BLOCK_K)
                b = _load_dual_b(b_ptr, l1b_ptr, rn64, nmask, k0, K, stride_bn, stride_l1bn, B_FP4, HW_CVT,
                                 BLOCK_N, BLOCK_K)
                accg = tl.dot(a, b, accg)
            la = tl.load(l0a_ptr + rm64 * stride_l0am + g, mask=mmask, other=0.0)
            lb = tl.load(l0b_ptr + rn64 * stride_l0bn + g, mask=nmask, other=0.0)
            acc += (accg * la[:, None]) * lb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0)[None, :]
    _store_out(c_ptr, acc, rm64[:, None] * stride_cm + rn[None, :], mmask[:, None] & nmask[None, :], OUT_KIND, HW_CVT)


@triton.jit
def fp8_rowwise_matmul_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K,
    stride_am, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr, OUT_KIND: tl.constexpr, PROMOTE: tl.constexpr, HW_CVT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """E4M3 [M, K] x E4M3 [N, K]^T, fp32 accumulation, then (acc * sa[m]) * sb[n] + bias."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _load_fp8_rows(a_ptr, rm64, stride_am, k0, mmask, K, False, BLOCK_M, BLOCK_K)
        b = _load_fp8_cols(b_ptr, rn64, stride_bn, k0, nmask, K, BLOCK_K)
        if PROMOTE:
            acc += tl.dot(a, b)
        else:
            acc = tl.dot(a, b, acc)
    sa = tl.load(sa_ptr + rm, mask=mmask, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=nmask, other=0.0)
    acc = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0)[None, :]
    _store_out(c_ptr, acc, rm64[:, None] * stride_cm + rn[None, :], mmask[:, None] & nmask[None, :], OUT_KIND, HW_CVT)
