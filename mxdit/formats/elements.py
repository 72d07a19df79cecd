"""Element codecs: FP4 E2M1, FP8 E4M3 (fn) and FP8 E5M2.

Codes are the formats' bit patterns in a uint8: FP4 uses bits 3:0 (sign in
bit 3, code 8 is -0), FP8 codes are the float8 bit patterns.

Encoding (``encode_elements``) takes values that are already divided by
their block scale and returns codes.  It always **saturates** finite values
beyond the format's largest normal to +-max (OCP MX spec §6.3, "normal
numbers beyond the element range are clamped"; torchao main likewise, see
../shared/reference/mx-numerics.md §2.3).  Three rounding modes:

* ``"rint"``  round half to even (torchao; torch_npu default),
* ``"round"`` round half away from zero (microxcaling's default "nearest";
  torch_npu ``round_mode="round"``, used by vllm-ascend for activations),
* ``"floor"`` round the magnitude toward zero (torch_npu ``"floor"``).

Implementation: one ``bucketize`` of |y| against the midpoints of the
format's positive grid.  Each midpoint is exactly representable in fp32, and
whether a value equal to a midpoint goes down or up is encoded by using the
midpoint itself (ties go down) or its fp32 predecessor (ties go up), so every
round mode is exact, with no float arithmetic on the data.  FP8 with "rint"
uses torch's own cast after clamping: torch's float8 casts round half to even
and agree with ml_dtypes on every finite value (mx-numerics.md §2.3).

bfloat16 fast path: a bf16 value times a power-of-two scale is again a bf16
value (exactly, or it underflows below 2^-126, where every element format
rounds to a signed zero either way).  So for bf16 inputs the scaled values
stay in bf16 and are encoded by one table lookup on their 16-bit pattern; the
65,536-entry table is built once per (format, round mode) *by the exact path
above*, so both paths give the same codes by construction (and a test checks
every entry).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

ROUND_MODES = ("rint", "round", "floor")


@dataclass(frozen=True)
class ElementFormat:
    name: str
    ebits: int
    mbits: int
    bias: int
    bits: int
    max_value: float  # largest finite magnitude
    emax: int  # floor(log2(max_value)): the exponent the OCP floor rule subtracts
    max_code: int  # code of +max_value
    nan_code: Optional[int]  # code written for NaN (None: the format has no NaN)
    torch_dtype: Optional[torch.dtype]  # native torch storage dtype, if any

    @property
    def sign_bit(self) -> int:
        return 1 << (self.bits - 1)

    def decode_code(self, code: int) -> float:
        """The value of one code, in plain float math (the codec's definition)."""
        sign = -1.0 if code & self.sign_bit else 1.0
        mag = code & (self.sign_bit - 1)
        e = mag >> self.mbits
        m = mag & ((1 << self.mbits) - 1)
        if self.name == "fp8_e4m3" and mag == 0x7F:
            return math.nan
        if self.name == "fp8_e5m2" and e == (1 << self.ebits) - 1:
            return sign * math.inf if m == 0 else math.nan
        if e == 0:
            return sign * m * 2.0 ** (1 - self.bias - self.mbits)
        return sign * (1 + m / 2**self.mbits) * 2.0 ** (e - self.bias)


FP4_E2M1 = ElementFormat("fp4_e2m1", 2, 1, 1, 4, 6.0, 2, 0x7, None, None)
FP8_E4M3 = ElementFormat("fp8_e4m3", 4, 3, 7, 8, 448.0, 8, 0x7E, 0x7F, torch.float8_e4m3fn)
FP8_E5M2 = ElementFormat("fp8_e5m2", 5, 2, 15, 8, 57344.0, 15, 0x7B, 0x7F, torch.float8_e5m2)

FORMATS = {f.name: f for f in (FP4_E2M1, FP8_E4M3, FP8_E5M2)}


def get_format(fmt: "str | ElementFormat") -> ElementFormat:
    if isinstance(fmt, ElementFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown MX element format {fmt!r}; valid: {sorted(FORMATS)}") from None


def check_round_mode(round_mode: str) -> None:
    if round_mode not in ROUND_MODES:
        raise ValueError(f"unknown round_mode {round_mode!r}; valid: {list(ROUND_MODES)}")


@functools.lru_cache(maxsize=None)
def _positive_grid(name: str) -> tuple[float, ...]:
    f = FORMATS[name]
    return tuple(f.decode_code(c) for c in range(f.max_code + 1))


@functools.lru_cache(maxsize=None)
def _boundaries_np(name: str, round_mode: str) -> np.ndarray:
    grid = _positive_grid(name)
    out = []
    for i in range(len(grid) - 1):
        lo, hi = grid[i], grid[i + 1]
        if round_mode == "floor":
            b, ties_up = hi, True  # |y| >= hi goes up
        else:
            b = (lo + hi) / 2  # exact in fp32: one more significant bit than the grid
            ties_up = round_mode == "round" or ((i + 1) % 2 == 0)  # rint: the even code wins
        b32 = np.float32(b)
        assert float(b32) == b, (name, b)
        if ties_up:
            b32 = np.nextafter(b32, np.float32(-np.inf))
        out.append(b32)
    return np.array(out, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _boundaries(name: str, round_mode: str, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_boundaries_np(name, round_mode).copy()).to(device)


@functools.lru_cache(maxsize=None)
def _decode_lut(name: str, device: torch.device) -> torch.Tensor:
    f = FORMATS[name]
    return torch.tensor([f.decode_code(c) for c in range(1 << f.bits)], dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _bf16_table(name: str, round_mode: str, device: torch.device) -> torch.Tensor:
    every_bf16 = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(torch.float32)
    table = _encode_f32(every_bf16, FORMATS[name], round_mode)
    f = FORMATS[name]
    if f.nan_code is not None:  # one NaN code whatever the NaN's sign bit
        table = torch.where(torch.isnan(every_bf16), torch.tensor(f.nan_code, dtype=torch.uint8), table)
    return table.to(device)


def encode_elements(y: torch.Tensor, fmt: "str | ElementFormat", round_mode: str = "rint") -> torch.Tensor:
    """Encode values (already divided by their scale) as element codes (uint8).

    ``y`` is float32 or bfloat16 (other dtypes are converted to float32).
    Saturates finite overflow and +-Inf to +-max.  NaN becomes a NaN code
    (FP8; 0x7F, or 0xFF for a negative NaN on the fp32 "rint" path); FP4 has
    no NaN and encodes NaN as +max (callers mark such blocks with the NaN
    scale 0xFF, which makes the whole block NaN).
    """
    f = get_format(fmt)
    check_round_mode(round_mode)
    if y.dtype == torch.bfloat16:
        table = _bf16_table(f.name, round_mode, y.device)
        idx = y.contiguous().view(torch.uint16).to(torch.int32).reshape(-1)
        return table.index_select(0, idx).reshape(y.shape)
    if y.dtype != torch.float32:
        y = y.float()
    return _encode_f32(y, f, round_mode)


def _encode_f32(y: torch.Tensor, f: ElementFormat, round_mode: str) -> torch.Tensor:
    if f.torch_dtype is not None and round_mode == "rint":
        # torch 2.13 casts round half to even; clamp first so e5m2 (which the
        # cast does not saturate) and Inf saturate as the spec says.  NaN keeps
        # its sign bit here (0x7F or 0xFF); quantize_mx writes 0x7F for NaN blocks.
        return y.clamp(-f.max_value, f.max_value).to(f.torch_dtype).view(torch.uint8)
    bounds = _boundaries(f.name, round_mode, y.device)
    mag = torch.bucketize(y.abs().contiguous(), bounds, out_int32=True).to(torch.uint8)
    codes = mag | (torch.signbit(y).to(torch.uint8) << (f.bits - 1))
    if f.nan_code is not None:
        codes = torch.where(torch.isnan(y), torch.tensor(f.nan_code, dtype=torch.uint8, device=y.device), codes)
    return codes


def decode_elements(codes: torch.Tensor, fmt: "str | ElementFormat") -> torch.Tensor:
    """Element codes (uint8, one per element) to float32 values."""
    f = get_format(fmt)
    if codes.dtype != torch.uint8:
        raise TypeError(f"decode_elements expects uint8 codes, got {codes.dtype}")
    if f.torch_dtype is not None:
        return codes.view(f.torch_dtype).to(torch.float32)
    idx = codes.reshape(-1).to(torch.int32)
    return _decode_lut(f.name, codes.device).index_select(0, idx).reshape(codes.shape)


@functools.lru_cache(maxsize=None)
def _fp4_pair_lut(device: torch.device) -> torch.Tensor:
    lut = _decode_lut(FP4_E2M1.name, torch.device("cpu"))
    b = torch.arange(256)
    return torch.stack((lut[b & 0xF], lut[b >> 4]), dim=-1).to(device)  # [256, 2]: (low, high) nibble


def decode_fp4_packed(packed: torch.Tensor) -> torch.Tensor:
    """Packed FP4 bytes [..., K/2] straight to float32 values [..., K] (one table lookup per byte)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"decode_fp4_packed expects uint8, got {packed.dtype}")
    vals = _fp4_pair_lut(packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
