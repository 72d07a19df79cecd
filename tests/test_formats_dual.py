"""Dual-level MXFP4 (torch_npu.npu_dynamic_dual_level_mx_quant semantics), reference
matmuls, and packing / layout helpers.

The oracle for quantize_mx_dual is ``_mx_oracles.ref_quantize_dual``: an independent
numpy reimplementation written from ascend-npu-mx.md §1.2 (and the CANN kernel it cites),
compared bit-exactly.  The matmuls are checked against float64 evaluations of the
documents' formulas (ascend-npu-mx.md §1.3 golden; per-32-block MX formula).
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import mxdit.formats as F
from _mx_oracles import (
    FMTS,
    L0_RECIP,
    SPECS,
    e8m0_f64,
    make_blocks,
    pack_nibbles,
    qdata_codes,
    ref_decode,
    ref_dual_dequant,
    ref_quantize_dual,
    unpack_nibbles,
)


def dual(x, smooth=None, rm="rint"):
    return F.quantize_mx_dual(x, smooth_scale=smooth, round_mode=rm)


def dual_parts(d):
    codes = unpack_nibbles(d.qdata.view(torch.uint8).numpy())
    return codes, d.scale_l0.numpy(), d.scale_l1.view(torch.uint8).numpy()


def check_dual_against_ref(x, smooth=None, rm="rint"):
    d = dual(x, smooth, rm)
    codes, l0, l1 = dual_parts(d)
    rcodes, rl0, rl1, zero_blk, nan_blk = ref_quantize_dual(x, smooth, rm)
    K = x.shape[-1]
    assert d.qdata.dtype == torch.uint8 and tuple(d.qdata.shape) == (*x.shape[:-1], K // 2)
    assert d.scale_l0.dtype == torch.float32 and tuple(d.scale_l0.shape) == (*x.shape[:-1], K // 512)
    assert d.scale_l1.dtype == torch.uint8 and tuple(d.scale_l1.shape) == (*x.shape[:-1], K // 32)
    assert np.array_equal(l0.view(np.uint32), rl0.view(np.uint32)), "level0 scale bits differ"
    assert np.array_equal(l1, rl1), f"level1 bytes differ at {np.argwhere(l1 != rl1)[:5].tolist()}"
    c1 = codes.reshape(*l1.shape, 32)
    r1 = rcodes.reshape(*l1.shape, 32)
    normal = ~(zero_blk | nan_blk)
    bad = (c1 != r1) & normal[..., None]
    assert not bad.any(), (f"{int(bad.sum())} fp4 codes differ, e.g. "
                           f"{[(tuple(i), int(c1[tuple(i)]), int(r1[tuple(i)])) for i in np.argwhere(bad)[:5]]}")
    # E == 0 blocks: all outputs are (signed) zeros
    assert ((c1[zero_blk] & 7) == 0).all()
    return d, (rcodes, rl0, rl1, zero_blk, nan_blk)


# ======================================================================================
# quantize_mx_dual
# ======================================================================================

def test_dual_test_vector():
    """op-plugin test: bf16 all 8.0, [1, 512] -> y all 119, level0 = 8 * fp32(1/6), level1 all 127."""
    x = torch.full((1, 512), 8.0, dtype=torch.bfloat16)
    d = dual(x)
    assert tuple(d.qdata.shape) == (1, 256)
    assert (d.qdata.view(torch.uint8) == 119).all()
    assert tuple(d.scale_l0.shape) == (1, 1) and d.scale_l0.dtype == torch.float32
    exp_l0 = np.float32(8.0) * L0_RECIP
    assert d.scale_l0.numpy().view(np.uint32)[0, 0] == exp_l0.view(np.uint32)
    assert abs(d.scale_l0.item() - 1.3333334) < 1e-7
    assert tuple(d.scale_l1.shape) == (1, 16)
    assert (d.scale_l1.view(torch.uint8) == 127).all()
    assert tuple(F.scales_to_pairs(d.scale_l1).shape) == (1, 8, 2)
    assert torch.equal(d.dequantize(), torch.full((1, 512), float(6 * np.float32(exp_l0))))


def _varied(rng, rows, K, lo=-30, hi=30, l1_spread=12):
    """randn with a random exponent per 512-block and extra down-scaling of some 32-blocks."""
    x = rng.standard_normal((rows, K))
    x *= np.exp2(rng.integers(lo, hi + 1, (rows, K // 512))).repeat(512, axis=1)
    x *= np.exp2(-rng.integers(0, l1_spread + 1, (rows, K // 32))).repeat(32, axis=1)
    return x


@pytest.mark.parametrize("rm", ["rint", "round", "floor"])
def test_dual_random_bf16(rm):
    rng = np.random.default_rng(100)
    x = torch.from_numpy(_varied(rng, 64, 2048)).to(torch.bfloat16)
    _, (_, _, rl1, _, _) = check_dual_against_ref(x, rm=rm)
    assert rl1.min() < 120  # sanity: some 32-blocks really got small level-1 bytes


@pytest.mark.parametrize("rm", ["rint", "round", "floor"])
def test_dual_random_fp16(rm):
    rng = np.random.default_rng(101)
    x = torch.from_numpy(_varied(rng, 32, 1024, lo=-8, hi=8, l1_spread=8)).to(torch.float16)
    check_dual_against_ref(x, rm=rm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dual_smooth_scale(dtype):
    rng = np.random.default_rng(102)
    lo, hi = (-20, 20) if dtype == torch.bfloat16 else (-6, 6)
    x = torch.from_numpy(_varied(rng, 16, 1024, lo, hi, 6)).to(dtype)
    smooth = torch.from_numpy(rng.uniform(0.3, 3.0, 1024)).to(dtype)
    d, _ = check_dual_against_ref(x, smooth)
    # smoothing is x*smooth in x's dtype before anything else
    d2 = dual((x * smooth).to(dtype))
    assert torch.equal(d.qdata, d2.qdata) and torch.equal(d.scale_l1, d2.scale_l1)
    assert torch.equal(d.scale_l0, d2.scale_l0)


def test_dual_zeros():
    x = torch.zeros(4, 1024, dtype=torch.bfloat16)
    x[1, 512:] = torch.randn(512)  # first 512-block zero, second not
    x[2] = torch.randn(1024)
    x[2, 64:96] = 0.0  # one 32-block of zeros inside a nonzero 512-block
    x[3, :] = -0.0
    d, (_, rl0, rl1, zero_blk, _) = check_dual_against_ref(x)
    l0 = d.scale_l0.numpy()
    assert l0[0].tolist() == [0.0, 0.0] and l0[1, 0] == 0.0 and l0[3].tolist() == [0.0, 0.0]
    l1 = d.scale_l1.view(torch.uint8).numpy()
    assert (l1[0] == 0).all() and (l1[1, :16] == 0).all() and l1[2, 2] == 0
    deq = d.dequantize()
    assert (deq[0] == 0).all() and (deq[1, :512] == 0).all() and (deq[2, 64:96] == 0).all()
    assert (deq[3] == 0).all()
    codes = unpack_nibbles(d.qdata.view(torch.uint8).numpy())
    assert ((codes[3] & 7) == 0).all()  # -0.0 -> a zero code (sign bit not significant)


def test_dual_big_range_within_512_block():
    """One 512-block whose 32-blocks span 2^0 .. 2^-60: small level-1 bytes, level-1 byte 0
    reached through E <= 2 (temp < 2^-124, elements x * 2^127) and E == 0 (temp subnormal)."""
    rows = []
    rng = np.random.default_rng(103)
    for base in (100, 0, -60):
        r = np.empty(512)
        for j in range(16):
            r[32 * j:32 * (j + 1)] = rng.standard_normal(32) * 2.0 ** (base - 4 * j)
        r[0] = 2.0 ** base * 1.5
        rows.append(r)
    # temp exponent field exactly 1 / 2: amax 2^100 -> L0 ~ 2^97.4; a 32-block at ~2^-27 .. 2^-29
    r = np.full(512, 2.0 ** -28)
    r[0] = 2.0 ** 100
    r[32:64] = rng.uniform(1, 2, 32) * 2.0 ** -29
    r[64:96] = rng.uniform(1, 2, 32) * 2.0 ** -36  # temp subnormal in bf16 -> E == 0 or tiny
    r[96:128] = rng.uniform(-2, 2, 32) * 2.0 ** -27
    rows.append(r)
    x = torch.from_numpy(np.stack(rows)).to(torch.bfloat16)
    d, (_, _, rl1, zero_blk, _) = check_dual_against_ref(x)
    assert (rl1[3, 1:4] <= 1).all() and rl1[3, 0] == 127
    assert rl1[1].min() < 80


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("special", [math.inf, -math.inf, math.nan])
def test_dual_inf_nan(dtype, special):
    """Inf/NaN elements count as 0 for the level-0 amax; their 32-block gets byte 0xFF,
    the other 32-blocks of the 512-block are quantized normally."""
    rng = np.random.default_rng(104)
    x = torch.from_numpy(rng.standard_normal((2, 1024))).to(dtype)
    x[0, 40] = special
    x[1, 600] = special
    d, (_, rl0, rl1, _, nan_blk) = check_dual_against_ref(x)
    l1 = d.scale_l1.view(torch.uint8).numpy()
    assert l1[0, 1] == 255 and l1[1, 18] == 255
    assert nan_blk.sum() == 2
    assert np.isfinite(d.scale_l0.numpy()).all()
    # level0 equals the amax of the *finite* values times fp32(1/6)
    xf = x.float().numpy()
    fin = np.where(np.isfinite(xf), np.abs(xf), 0).reshape(2, 2, 512).max(-1).astype(np.float32)
    assert np.array_equal(d.scale_l0.numpy(), (fin * L0_RECIP).astype(np.float32))


def test_dual_level0_flush_to_zero():
    """level0 = fp32(amax) * fp32(1/6) < 2^-126 is flushed to 0; then x / 0 = +-Inf for
    nonzero x (kernel: fp32 division by level0), so those 32-blocks get byte 0xFF and
    all-zero 32-blocks byte 0 (bf16 only: fp16 amax is always >= 2^-24)."""
    x = torch.zeros(1, 512, dtype=torch.bfloat16)
    x[0, 0:32] = 2.0 ** -127  # amax * (1/6) < 2^-126
    d, _ = check_dual_against_ref(x)
    assert d.scale_l0.item() == 0.0
    l1 = d.scale_l1.view(torch.uint8).numpy()[0]
    assert l1[0] == 255 and (l1[1:] == 0).all()


def test_dual_3d_and_multiple_512_blocks():
    rng = np.random.default_rng(105)
    x = torch.from_numpy(_varied(rng, 6, 1536).reshape(2, 3, 1536)).to(torch.bfloat16)
    d, _ = check_dual_against_ref(x)
    assert tuple(d.shape) == (2, 3, 1536)


def test_dual_dequantize_relation():
    rng = np.random.default_rng(106)
    x = torch.from_numpy(_varied(rng, 32, 1024, -10, 10, 8)).to(torch.bfloat16)
    d = dual(x)
    codes, l0, l1 = dual_parts(d)
    deq = d.dequantize(dtype=torch.float32).to(torch.float64).numpy()
    # structural: x_hat = fp4 * 2^(l1-127) * l0 (one fp32 rounding at most)
    rel = ref_dual_dequant(codes, l0, l1)
    np.testing.assert_allclose(deq, rel, rtol=1.2e-7, atol=0)
    # and x_hat approximates x: half an FP4 step at the element's magnitude, plus the bf16
    # rounding of temp (2^-9 relative) -- both in units of 2^(l1-127) * l0
    xs = x.to(torch.float64).numpy()
    unit = (e8m0_f64(l1).repeat(32, axis=-1) * np.asarray(l0, np.float64).repeat(512, axis=-1))
    v = np.abs(xs) / unit
    step = np.where(v < 2, 0.5, np.where(v < 4, 1.0, 2.0))
    # level 1 is a FLOOR scale per 32-block, so |temp| * 2^(127-l1) lies in [4, 8): values
    # above 6 saturate (only the 32-block holding the 512-block max is pinned to ~6)
    sat = v > 6 * (1 + 2.0 ** -8)
    assert sat.any()
    assert np.array_equal(np.abs(deq[sat]), (6 * unit[sat]).astype(np.float32).astype(np.float64))
    bound = (0.5 * step + v * 2.0 ** -8 + 1e-12) * unit
    assert (np.abs(deq - xs) <= bound)[~sat].all()
    assert np.array_equal(np.signbit(deq[xs != 0]), np.signbit(xs[xs != 0]))
    # bf16 output = fp32 output rounded
    assert torch.equal(d.dequantize(dtype=torch.bfloat16), d.dequantize().to(torch.bfloat16))


# ======================================================================================
# reference matmuls
# ======================================================================================

def _dot_bound(a, b):
    return np.abs(a) @ np.abs(b).T


def _golden_dual(da, db, bias=None):
    """ascend-npu-mx.md §1.3 golden, in float64, from raw codes and scales."""
    ca, l0a, l1a = dual_parts(da)
    cb, l0b, l1b = dual_parts(db)
    M, K = ca.shape
    N = cb.shape[0]
    va = ref_decode(ca, "fp4_e2m1").reshape(M, K // 512, 16, 32)
    vb = ref_decode(cb, "fp4_e2m1").reshape(N, K // 512, 16, 32)
    dot32 = np.einsum("mgjk,ngjk->mngj", va, vb)
    e = (l1a.reshape(M, 1, K // 512, 16).astype(np.int64) + l1b.reshape(1, N, K // 512, 16) - 254)
    inner = (dot32 * np.ldexp(1.0, e)).sum(-1)  # [M, N, G0]
    out = (inner * l0a.astype(np.float64)[:, None, :] * l0b.astype(np.float64)[None, :, :]).sum(-1)
    if bias is not None:
        out = out + bias.to(torch.float64).numpy()[None, :]
    return out


@pytest.mark.parametrize("with_bias", [False, True])
def test_dual_mx_matmul(with_bias):
    rng = np.random.default_rng(200)
    M, N, K = 16, 24, 1536
    a = torch.from_numpy(_varied(rng, M, K, -6, 6, 4)).to(torch.bfloat16)
    b = torch.from_numpy(_varied(rng, N, K, -6, 6, 4) * 0.02).to(torch.bfloat16)
    da, db = dual(a), dual(b)
    bias = torch.from_numpy(rng.standard_normal(N)).float() if with_bias else None
    out = F.dual_mx_matmul(da, db, bias=bias, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and tuple(out.shape) == (M, N)
    out = out.to(torch.float64).numpy()
    A = da.dequantize().to(torch.float64).numpy()
    B = db.dequantize().to(torch.float64).numpy()
    ref_deq = A @ B.T + (bias.double().numpy()[None, :] if with_bias else 0)
    gold = _golden_dual(da, db, bias)
    tol = 1e-5 * _dot_bound(A, B) + 1e-30
    assert (np.abs(out - gold) <= tol).all(), np.max(np.abs(out - gold) / tol)
    assert (np.abs(out - ref_deq) <= tol).all()
    # oracle sanity: the golden formula == float64 matmul of the exactly dequantized operands
    # (A, B above went through fp32 dequantize: fp4 * 2^k * l0 rounds to fp32)
    ca, l0a, l1a = dual_parts(da)
    cb, l0b, l1b = dual_parts(db)
    Ae, Be = ref_dual_dequant(ca, l0a, l1a), ref_dual_dequant(cb, l0b, l1b)
    exact = Ae @ Be.T + (bias.double().numpy()[None, :] if with_bias else 0)
    assert (np.abs(gold - exact) <= 1e-12 * _dot_bound(Ae, Be) + 1e-30).all()
    # bf16 output: the same result rounded to bf16
    out16 = F.dual_mx_matmul(da, db, bias=bias, out_dtype=torch.bfloat16)
    assert out16.dtype == torch.bfloat16
    np.testing.assert_allclose(out16.double().numpy(), gold, rtol=2.0 ** -8, atol=1e-6 * _dot_bound(A, B).max())


def _golden_mx(ma, mb, fmt, bias=None):
    ca, cb = qdata_codes(ma), qdata_codes(mb)
    sa, sb = ma.scale.view(torch.uint8).numpy(), mb.scale.view(torch.uint8).numpy()
    M, K = ca.shape
    N = cb.shape[0]
    va = ref_decode(ca, fmt).reshape(M, K // 32, 32)
    vb = ref_decode(cb, fmt).reshape(N, K // 32, 32)
    dot32 = np.einsum("mjk,njk->mnj", va, vb)
    e = sa.astype(np.int64)[:, None, :] + sb.astype(np.int64)[None, :, :] - 254
    with np.errstate(invalid="ignore"):
        sc = np.where((sa[:, None, :] == 255) | (sb[None, :, :] == 255), np.nan, np.ldexp(1.0, e))
        out = (dot32 * sc).sum(-1)
    if bias is not None:
        out = out + bias.to(torch.float64).numpy()[None, :]
    return out


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("fmt", FMTS)
def test_mx_matmul(fmt, with_bias):
    rng = np.random.default_rng(201)
    M, N, K = 12, 20, 512
    a = torch.from_numpy(make_blocks(rng, M * K // 32, exp_lo=-10, exp_hi=10).reshape(M, K))
    b = torch.from_numpy(make_blocks(rng, N * K // 32, exp_lo=-10, exp_hi=10).reshape(N, K))
    ma, mb = F.quantize_mx(a, fmt), F.quantize_mx(b.to(torch.bfloat16), fmt, scale_mode="rceil")
    bias = torch.from_numpy(rng.standard_normal(N)).float() if with_bias else None
    out = F.mx_matmul(ma, mb, bias=bias, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and tuple(out.shape) == (M, N)
    out = out.to(torch.float64).numpy()
    A = ma.dequantize().to(torch.float64).numpy()
    B = mb.dequantize().to(torch.float64).numpy()
    ref_deq = A @ B.T + (bias.double().numpy()[None, :] if with_bias else 0)
    gold = _golden_mx(ma, mb, fmt, bias)
    tol = 1e-5 * _dot_bound(A, B) + 1e-30
    assert (np.abs(out - gold) <= tol).all(), np.max(np.abs(out - gold) / tol)
    assert (np.abs(out - ref_deq) <= tol).all()
    out16 = F.mx_matmul(ma, mb, bias=bias, out_dtype=torch.bfloat16)
    assert out16.dtype == torch.bfloat16
    np.testing.assert_allclose(out16.double().numpy(), gold, rtol=2.0 ** -8, atol=1e-6 * _dot_bound(A, B).max())


@pytest.mark.parametrize("fmt", FMTS)
def test_mx_matmul_nan_scale_block_gives_nan(fmt):
    """E8M0 0xFF = NaN: a NaN/Inf block in A poisons its output row (OCP: X = NaN -> all NaN)."""
    a = torch.randn(3, 64)
    a[1, 40] = math.inf
    b = torch.randn(5, 64)
    out = F.mx_matmul(F.quantize_mx(a, fmt), F.quantize_mx(b, fmt))
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


# ======================================================================================
# packing / layout
# ======================================================================================

def test_pack_unpack_fp4_roundtrip_and_nibble_order():
    rng = np.random.default_rng(300)
    codes = rng.integers(0, 16, (3, 5, 64)).astype(np.uint8)
    packed = F.pack_fp4(torch.from_numpy(codes))
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (3, 5, 32)
    assert np.array_equal(packed.numpy(), pack_nibbles(codes))  # even index -> low nibble
    assert np.array_equal(F.unpack_fp4(packed).numpy(), codes)
    assert F.pack_fp4(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    assert F.unpack_fp4(torch.tensor([0x9C], dtype=torch.uint8)).tolist() == [0xC, 0x9]
    # all 256 byte values survive unpack -> pack
    allb = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(F.pack_fp4(F.unpack_fp4(allb)), allb)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33])
def test_scales_pairs_roundtrip(n):
    rng = np.random.default_rng(n)
    s = torch.from_numpy(rng.integers(0, 256, (4, n)).astype(np.uint8))
    p = F.scales_to_pairs(s)
    assert p.dtype == torch.uint8 and tuple(p.shape) == (4, (n + 1) // 2, 2)
    flat = p.reshape(4, -1)
    assert torch.equal(flat[:, :n], s)
    if n % 2:
        assert (flat[:, n] == 0).all()  # padded with byte 0
    assert torch.equal(F.pairs_to_scales(p, n), s)


FP8_CONTAINER_TABLE = {0.0: 0x00, 0.5: 0x30, 1.0: 0x38, 1.5: 0x3C, 2.0: 0x40, 3.0: 0x44, 4.0: 0x48, 6.0: 0x4C}


def test_fp4_to_fp8_container_byte_table():
    codes = np.arange(16, dtype=np.uint8)
    w = F.fp4_to_fp8_container(torch.from_numpy(pack_nibbles(codes))[None, :])
    assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == (1, 16)
    got = w.view(torch.uint8).numpy()[0]
    exp = list(FP8_CONTAINER_TABLE.values())
    assert got.tolist() == exp + [b | 0x80 for b in exp]
    # value cast: identical to ml_dtypes e4m3 of the FP4 values
    vals = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert np.array_equal(got, vals.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


def test_fp8_container_roundtrip():
    rng = np.random.default_rng(301)
    codes = rng.integers(0, 16, (8, 128)).astype(np.uint8)
    packed = torch.from_numpy(pack_nibbles(codes))
    w = F.fp4_to_fp8_container(packed)
    assert torch.equal(F.fp8_container_to_fp4(w), packed)
    # and from a float8 tensor built by a plain value cast of FP4 grid values
    vals = torch.from_numpy(codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    w2 = vals.to(torch.float8_e4m3fn)
    back = F.fp8_container_to_fp4(w2).numpy()
    # -0.0 and +0.0 are both "zero"; all other codes round-trip exactly
    nz = codes & 7 != 0
    assert np.array_equal(unpack_nibbles(back)[nz], codes[nz])
    assert ((unpack_nibbles(back)[~nz] & 7) == 0).all()


@pytest.mark.parametrize("bad", [0.75, 2.5, 5.0, 8.0, 0.25, 448.0, -7.0, math.nan])
def test_fp8_container_off_grid_raises(bad):
    w = torch.ones(2, 32)
    w[1, 7] = bad
    with pytest.raises(ValueError):
        F.fp8_container_to_fp4(w.to(torch.float8_e4m3fn))
