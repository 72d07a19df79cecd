"""The Triton MXFP8 flash-attention kernel against the reference backend under TRITON_INTERPRET=1.

Same quantized operands (mxdit.formats.attention), same P choice (fp32, unquantized); the
kernel sums head_dim per 32-chunk and rescales the softmax per key tile, so outputs agree
up to fp32 summation order: |out - ref| <= 1e-5 * max|ref|.  Shapes: ragged sequence
lengths, lengths not divisible by 64 or 32, batch > 1 with V scale blocks crossing sequences.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton / mxdit.kernels.triton are imported

import pytest
import torch

pytest.importorskip("triton")

from mxdit.kernels import get_backend  # noqa: E402
from mxdit.kernels.triton import TritonBackend  # noqa: E402
from mxdit.kernels.triton.attention import mxfp8_attention  # noqa: E402

REF = get_backend("reference")


def qkv(b, s, h, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(b, s, h, d, generator=g) for _ in range(3)]
    x[0][..., 1] *= 8
    x[1][..., 1] *= 8
    return [t.to(torch.bfloat16) for t in x]


@pytest.mark.parametrize("b,s,h,d,bm,bn", [
    (1, 70, 2, 64, 32, 32),    # not a multiple of 64 (nor 32): a ragged last tile and V block
    (2, 48, 1, 32, 32, 16),    # batch 2, S % 32 != 0: V scale blocks span the two sequences
    (1, 100, 1, 128, 64, 64),  # Wan's head_dim, ragged query and key tiles
])
def test_kernel_matches_reference(b, s, h, d, bm, bn):
    q, k, v = qkv(b, s, h, d, seed=s)
    out = mxfp8_attention(q, k, v, block_m=bm, block_n=bn)
    ref = REF.quantized_attention(q, k, v, mode="mxfp8", out_dtype=torch.float32)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_backend_dispatch():
    q, k, v = qkv(1, 40, 1, 32, seed=1)
    tb = TritonBackend()
    out = tb.quantized_attention(q, k, v)
    ref = REF.quantized_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref.float(), rtol=2 ** -7, atol=1e-5 * float(ref.abs().max()))
    # fp8_block is not a kernel here: the reference numerics, bit for bit
    assert torch.equal(tb.quantized_attention(q, k, v, mode="fp8_block"), REF.quantized_attention(q, k, v, mode="fp8_block"))
