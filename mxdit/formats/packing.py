"""Layout conversions the NPU kernels and the checkpoint formats need.

* FP4 packing: two codes per byte, the element with the even index along the
  last axis in the low nibble (torchao ``pack_uint4``, msmodelslim
  ``pack_fp4_to_uint8``, torch_npu; ascend-npu-mx.md §0.2).
* FP4 in a float8_e4m3fn "value container": msmodelslim <= 26.0.0 wrote FP4
  weights as one e4m3 *value* per element (ascend-npu-mx.md §3.3).
* E8M0 scales in pairs ``[..., ceil(n/2), 2]``, padded with byte 0, as every
  torch_npu MX op takes them (ascend-npu-mx.md §0.3).
"""
from __future__ import annotations

from typing import Optional

import torch

from mxdit.formats.elements import FP4_E2M1, decode_elements, encode_elements


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 FP4 codes [..., K] -> packed bytes [..., K/2] (even index in the low nibble)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_fp4 expects uint8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4: last dimension {codes.shape[-1]} must be even")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes [..., K/2] -> uint8 FP4 codes [..., K]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_fp4 expects uint8, got {packed.dtype}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def scales_to_pairs(scale: torch.Tensor) -> torch.Tensor:
    """[..., n] e8m0 bytes -> [..., ceil(n/2), 2], padding an odd count with byte 0."""
    n = scale.shape[-1]
    if n % 2:
        scale = torch.nn.functional.pad(scale, (0, 1), value=0)
    return scale.reshape(*scale.shape[:-1], (n + 1) // 2, 2)


def pairs_to_scales(pairs: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
    """[..., m, 2] -> [..., n] (n defaults to 2m; the padding byte is dropped)."""
    if pairs.shape[-1] != 2:
        raise ValueError(f"pairs_to_scales expects a trailing dimension of 2, got shape {tuple(pairs.shape)}")
    flat = pairs.reshape(*pairs.shape[:-2], pairs.shape[-2] * 2)
    if n is None:
        return flat
    if not (2 * pairs.shape[-2] - 1 <= n <= 2 * pairs.shape[-2]):
        raise ValueError(f"pairs_to_scales: {pairs.shape[-2]} pairs cannot hold {n} scales")
    return flat[..., :n]


def fp4_to_fp8_container(packed: torch.Tensor) -> torch.Tensor:
    """Packed FP4 [..., K/2] -> float8_e4m3fn [..., K] holding the FP4 values (exact)."""
    return decode_elements(unpack_fp4(packed), FP4_E2M1).to(torch.float8_e4m3fn)


def fp8_container_to_fp4(values: torch.Tensor, *, name: str = "weight") -> torch.Tensor:
    """float8_e4m3fn [..., K] holding FP4 grid values -> packed FP4 [..., K/2].

    Raises ValueError naming ``name`` if any value is not exactly an FP4 value.
    """
    if values.dtype != torch.float8_e4m3fn:
        raise TypeError(f"tensor '{name}': an FP4 value container must be float8_e4m3fn, got {values.dtype}")
    if values.shape[-1] % 2:
        raise ValueError(f"tensor '{name}': last dimension {values.shape[-1]} must be even to pack FP4")
    v = values.to(torch.float32)
    codes = encode_elements(v, FP4_E2M1, "rint")
    back = decode_elements(codes, FP4_E2M1)
    bad = ~(back == v)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"tensor '{name}': {int(bad.sum())} values are not on the FP4 E2M1 grid "
            f"(first at index {idx}: {float(v[idx])}); expected values in {{0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}}"
        )
    return pack_fp4(codes)
