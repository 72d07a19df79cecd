"""Quantized attention on a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs it).

The MX quantization on the GPU equals the CPU bit for bit, the GPU attention equals
the CPU reference up to fp32 accumulation order, and the Triton MXFP8 kernel (compiled, no
interpreter) matches the reference.
"""
import pytest
import torch

from mxdit.formats import attention as FA
from mxdit.kernels import get_backend
from mxdit.layers.attention import attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def qkv(s=320, h=4, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(2, s, h, d, generator=g) for _ in range(3)]
    x[0][..., 3] *= 10
    x[1][..., 3] *= 10
    return [t.to(torch.bfloat16) for t in x]


def test_mx_quantization_gpu_bit_exact():
    q, _, v = qkv()
    a = FA.quantize_qk_mxfp8(q)
    b = FA.quantize_qk_mxfp8(q.cuda())
    assert torch.equal(a[0].view(torch.uint8), b[0].cpu().view(torch.uint8)) and torch.equal(a[1], b[1].cpu())
    vt = v.reshape(-1, 4, 128)
    a = FA.quantize_v_mxfp8(vt)
    b = FA.quantize_v_mxfp8(vt.cuda())
    assert torch.equal(a[0].view(torch.uint8), b[0].cpu().view(torch.uint8)) and torch.equal(a[1], b[1].cpu())


@pytest.mark.parametrize("name", ["mxfp8", "mxfp8_rotated", "fp8_block", "fp8_block_rotated"])
def test_quantized_attention_gpu_matches_cpu(name):
    q, k, v = qkv(s=200)
    cpu = attention(q, k, v, backend=name, self_attention=True).float()
    gpu = attention(q.cuda(), k.cuda(), v.cuda(), backend=name, self_attention=True).float().cpu()
    assert torch.allclose(gpu, cpu, rtol=1e-2, atol=1e-2 * float(cpu.abs().max()))
    assert get_backend("reference").quantized_attention(q.cuda(), k.cuda(), v.cuda()).is_cuda


@pytest.mark.parametrize("s", [200, 4096 + 17])
def test_triton_mxfp8_kernel_on_gpu(s):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need capability >= 8.9")
    from mxdit.kernels.triton.attention import mxfp8_attention

    q, k, v = (t.cuda() for t in qkv(s=s))
    out = mxfp8_attention(q, k, v)
    ref = get_backend("reference").quantized_attention(q, k, v, out_dtype=torch.float32)
    # Hopper's FP8 MMA accumulates Q K^T with reduced precision (bench_gpu.py measures it): 1e-3 of max
    assert torch.allclose(out, ref, rtol=0, atol=1e-3 * float(ref.abs().max()))
