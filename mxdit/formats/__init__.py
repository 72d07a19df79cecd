"""MX numerics: element codecs, E8M0 scales, block quantize/dequantize,
dual-level MXFP4, packing and layout helpers, reference matmuls.

Pure torch, any device, vectorised (no Python loop over blocks).  Semantics
and their sources are documented next to the code in each module.
"""
from mxdit.formats.dual import L0_BLOCK, L1_BLOCK, DualMXTensor, quantize_mx_dual
from mxdit.formats.e8m0 import e8m0_reciprocal, e8m0_to_float, scale_floor, scale_rceil
from mxdit.formats.elements import (
    FORMATS,
    FP4_E2M1,
    FP8_E4M3,
    FP8_E5M2,
    ROUND_MODES,
    ElementFormat,
    decode_elements,
    encode_elements,
    get_format,
)
from mxdit.formats.matmul import dual_mx_matmul, mx_matmul
from mxdit.formats.mx import SCALE_MODES, MXTensor, quantize_mx
from mxdit.formats.packing import (
    fp4_to_fp8_container,
    fp8_container_to_fp4,
    pack_fp4,
    pairs_to_scales,
    scales_to_pairs,
    unpack_fp4,
)

__all__ = [
    "FORMATS", "FP4_E2M1", "FP8_E4M3", "FP8_E5M2", "ROUND_MODES", "SCALE_MODES", "L0_BLOCK", "L1_BLOCK",
    "ElementFormat", "MXTensor", "DualMXTensor",
    "quantize_mx", "quantize_mx_dual", "encode_elements", "decode_elements", "get_format",
    "e8m0_to_float", "e8m0_reciprocal", "scale_floor", "scale_rceil",
    "pack_fp4", "unpack_fp4", "scales_to_pairs", "pairs_to_scales", "fp4_to_fp8_container", "fp8_container_to_fp4",
    "mx_matmul", "dual_mx_matmul",
]
