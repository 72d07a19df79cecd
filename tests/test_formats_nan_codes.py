"""FP8 NaN blocks hold one NaN code (0x7F, torchao main) whatever the input dtype,
the NaN's sign and the code path (bf16 table or fp32 cast)."""
import pytest
import torch

from mxdit.formats import encode_elements, quantize_mx


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("special", [float("nan"), -float("nan"), float("inf"), -float("inf")])
def test_nan_block_codes_are_0x7f(fmt, dtype, special):
    x = -torch.linspace(0.1, 3.0, 64, dtype=torch.float32)  # negative values: products with NaN may carry the sign
    x[5] = special
    q = quantize_mx(x.to(dtype), fmt)
    assert q.scale[0].item() == 255 and q.scale[1].item() != 255
    codes = q.qdata.view(torch.uint8)
    assert torch.all(codes[:32] == 0x7F), codes[:32].tolist()
    assert not torch.any(codes[32:] == 0x7F)


def test_bf16_table_encodes_negative_nan_as_0x7f():
    y = torch.tensor([float("nan"), -float("nan")], dtype=torch.bfloat16)
    assert encode_elements(y, "fp8_e4m3").tolist() == [0x7F, 0x7F]
