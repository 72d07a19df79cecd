"""Single-level MX block quantization along the last axis.

Semantics (torchao main, ../shared/reference/mx-numerics.md §2; OCP MX v1.0):

* blocks of ``block_size`` (32) consecutive elements of the last axis share
  one E8M0 scale byte;
* ``scale_mode="floor"``: byte = clamp(exponent(amax) - emax, -127, 127) + 127,
  the exponent read from the fp32 bits (§2.2 FLOOR); ``"rceil"``: the exact
  bit-ceiling of log2(fp32(amax) * fp32(1/max_elem)) (§2.2 RCEIL, torchao main);
* elements are ``x * 2^(127 - byte)`` — an exact power-of-two multiply, also
  for byte 0 (x * 2^127), so tiny and zero blocks round-trip exactly (§2.6,
  main; 0.18.0 divided by 2^-126 there) — then saturated and rounded
  (:mod:`mxdit.formats.elements`);
* a block holding Inf or NaN gets scale byte 0xFF (§2.6 "block contains
  Inf/NaN", main); its FP8 E4M3/E5M2 elements are NaN codes (main); FP4 has
  no NaN code, so its elements are written as 0 — the 0xFF scale alone makes
  the whole block dequantize to NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mxdit.formats.e8m0 import NAN_BYTE, e8m0_reciprocal, e8m0_to_float, scale_floor, scale_rceil
from mxdit.formats.elements import FP4_E2M1, ElementFormat, check_round_mode, decode_elements, decode_fp4_packed, encode_elements, get_format
from mxdit.formats.packing import pack_fp4, unpack_fp4

SCALE_MODES = ("floor", "rceil")
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class MXTensor:
    """An MX-quantized tensor, blocks along the last axis.

    qdata: FP4 -> uint8 [..., K/2] (even index in the low nibble);
           FP8 -> torch.float8_e4m3fn / float8_e5m2 [..., K].
    scale: uint8 E8M0 bytes [..., K/block_size].
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    fmt: str
    block_size: int = 32

    @property
    def element_format(self) -> ElementFormat:
        return get_format(self.fmt)

    @property
    def shape(self) -> torch.Size:
        k = self.qdata.shape[-1] * (2 if self.fmt == "fp4_e2m1" else 1)
        return torch.Size((*self.qdata.shape[:-1], k))

    def codes(self) -> torch.Tensor:
        """Element codes, one uint8 per element [..., K]."""
        if self.fmt == "fp4_e2m1":
            return unpack_fp4(self.qdata)
        return self.qdata.view(torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        vals = decode_fp4_packed(self.qdata) if self.fmt == "fp4_e2m1" else decode_elements(self.codes(), self.fmt)
        k = vals.shape[-1]
        vals = vals.reshape(*vals.shape[:-1], k // self.block_size, self.block_size)
        out = vals * e8m0_to_float(self.scale).unsqueeze(-1)
        return out.reshape(*out.shape[:-2], k).to(dtype)

    def to(self, device) -> "MXTensor":
        return MXTensor(self.qdata.to(device), self.scale.to(device), self.fmt, self.block_size)

    @property
    def nbytes(self) -> int:
        return self.qdata.numel() * self.qdata.element_size() + self.scale.numel()


def _check_input(x: torch.Tensor, block_size: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{what}: input dtype must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{what}: input must have at least one dimension")
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"{what}: block_size must be a positive even number, got {block_size}")
    if x.shape[-1] % block_size:
        raise ValueError(
            f"{what}: the last dimension ({x.shape[-1]}) must be a multiple of the block size "
            f"{block_size}; shape {tuple(x.shape)}"
        )


def compute_scales(amax: torch.Tensor, fmt: ElementFormat, scale_mode: str) -> torch.Tensor:
    if scale_mode == "floor":
        return scale_floor(amax, fmt.emax)
    if scale_mode == "rceil":
        return scale_rceil(amax, fmt.max_value)
    raise ValueError(f"unknown scale_mode {scale_mode!r}; valid: {list(SCALE_MODES)}")


def quantize_mx(
    x: torch.Tensor,
    fmt: str,
    *,
    block_size: int = 32,
    scale_mode: str = "floor",
    round_mode: str = "rint",
) -> MXTensor:
    """Quantize ``x`` to MX along its last axis. See the module docstring."""
    f = get_format(fmt)
    check_round_mode(round_mode)
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; valid: {list(SCALE_MODES)}")
    _check_input(x, block_size, "quantize_mx")
    k = x.shape[-1]
    xb = x.reshape(*x.shape[:-1], k // block_size, block_size)
    # amax in the input dtype is exact; torch.amax propagates NaN, and Inf stays Inf.
    amax = xb.abs().amax(dim=-1, keepdim=True)
    scale = compute_scales(amax, f, scale_mode)
    recip = e8m0_reciprocal(scale)
    if x.dtype == torch.bfloat16:
        y = xb * recip.to(torch.bfloat16)  # exact in bf16 (see elements.py, "bfloat16 fast path")
    else:
        y = xb.to(torch.float32) * recip  # exact power-of-two product
    codes = encode_elements(y, f, round_mode).reshape(*x.shape)
    scale = scale.squeeze(-1)
    bad = scale == NAN_BYTE
    if bool(bad.any()):  # rare: FP8 NaN blocks are all 0x7F (torchao main), FP4 ones 0
        fill = 0 if f.nan_code is None else f.nan_code
        codes = codes.reshape(xb.shape).masked_fill(bad.unsqueeze(-1), fill).reshape(x.shape)
    if f is FP4_E2M1:
        qdata = pack_fp4(codes)
    else:
        qdata = codes.view(f.torch_dtype)
    return MXTensor(qdata=qdata, scale=scale, fmt=f.name, block_size=block_size)
