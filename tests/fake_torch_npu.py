"""An emulated ``torch_npu`` for the tests: the documented semantics of the ops
mxdit's NPU backend calls, computed on CPU tensors with mxdit's reference
numerics (``mxdit.formats``), plus the argument checks the real ops make, so
that a wrong argument order, layout, dtype id or format fails.

Install it with ``monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu)``.
Sources: ../shared/reference/ascend-npu-mx.md §0-2, sglang-diffusion-mx.md §3-5,
the torch_npu API docs of npu_quantize / npu_quant_matmul (int8 dtype table).

Not emulated (raise NotImplementedError rather than guess): FP4 quantization
along a non-last axis, scale_alg 1/2, float4_e1m2 / hifloat8, padding of a short last
block (K not a multiple of the block), batched (>2-D) matmuls, int8 outputs,
W4A8 pseudo-quant, offset / y_scale.  FRACTAL_NZ is a tag on the tensor object
(``_npu_format``); its values and logical shape are unchanged, as in torch_npu.
Every op call is appended to :data:`CALLS` as ``(name, kwargs-ish dict)``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from mxdit import formats as F
from mxdit.formats import attention as FA
from mxdit.kernels.base import quantize_int4_per_token, quantize_int8_per_token

__version__ = "0.0.0+mxdit.emulated"
EMULATED = True

# torch_npu custom dtype ids: ACL enum + 256 (ascend-npu-mx.md §0.1)
hifloat8 = 290
float8_e5m2 = 291
float8_e4m3fn = 292
float8_e8m0fnu = 293
float4_e2m1fn_x2 = 296
float4_e1m2fn_x2 = 297

_ID_NAMES = {290: "hifloat8", 291: "float8_e5m2", 292: "float8_e4m3fn", 293: "float8_e8m0fnu",
             296: "float4_e2m1fn_x2", 297: "float4_e1m2fn_x2"}
_TORCH_TO_ID = {torch.float8_e5m2: 291, torch.float8_e4m3fn: 292, torch.float8_e8m0fnu: 293}
_FP8_TORCH = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}

ND = 2
FRACTAL_NZ = 29
ROUND_MODES_FP4 = ("rint", "round", "floor")

CALLS: list[tuple[str, dict[str, Any]]] = []


class NPUOpError(RuntimeError):
    """What a failed op-plugin / aclnn check raises (torch_npu raises RuntimeError)."""


def reset_calls() -> None:
    CALLS.clear()


def _fail(op: str, msg: str) -> None:
    raise NPUOpError(f"{op}: {msg}")


def _dtype_id(d: Any, op: str, what: str) -> Any:
    """A torch_npu dtype id (int >= 256), or a torch.dtype; real float8 torch dtypes map to their ids."""
    if isinstance(d, bool):
        _fail(op, f"{what} must be a dtype, got {d!r}")
    if isinstance(d, int):
        if d < 256 or d not in _ID_NAMES:
            _fail(op, f"{what}={d} is not a torch_npu dtype id (valid: {_ID_NAMES})")
        return d
    if isinstance(d, torch.dtype):
        return _TORCH_TO_ID.get(d, d)
    _fail(op, f"{what} must be a torch_npu dtype id or torch.dtype, got {type(d).__name__}")


def _tensor(t: Any, op: str, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{what} must be a Tensor, got {type(t).__name__}")
    return t


def get_npu_format(t: torch.Tensor) -> int:
    return getattr(t, "_npu_format", ND)


def _is_nz(t: torch.Tensor) -> bool:
    return get_npu_format(t) == FRACTAL_NZ


def _layout(t: torch.Tensor) -> str:
    """"N" contiguous, "T" the transpose of dims 0,1 of a contiguous tensor, "*" both (size-1 dims), "?" neither."""
    n = t.is_contiguous()
    tr = t.transpose(0, 1).is_contiguous()
    return "*" if n and tr else "N" if n else "T" if tr else "?"


def _same_layout(a: str, b: str) -> bool:
    return a == "*" or b == "*" or a == b


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# ---- npu_dynamic_mx_quant -----------------------------------------------------

def npu_dynamic_mx_quant(input, *, axis=-1, round_mode="rint", dst_type=float4_e2m1fn_x2, block_size=32,
                         scale_alg=0, dst_type_max=0.0, max_low_bound=0.0):
    """(y, mxscale): y FP4 uint8 [..., K/2] or FP8 [..., K]; mxscale uint8 [..., ceil(K/bs/2), 2]."""
    op = "npu_dynamic_mx_quant"
    x = _tensor(input, op, "input")
    CALLS.append((op, dict(shape=tuple(x.shape), dtype=x.dtype, axis=axis, round_mode=round_mode,
                           dst_type=dst_type, block_size=block_size, scale_alg=scale_alg)))
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        _fail(op, f"input dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if not 1 <= x.dim() <= 7:
        _fail(op, f"input must have 1 to 7 dimensions, got {x.dim()}")
    if x.numel() == 0:
        _fail(op, "empty input")
    dst = _dtype_id(dst_type, op, "dst_type")
    if dst in (float4_e1m2fn_x2,):
        raise NotImplementedError(f"{op}: dst_type float4_e1m2fn_x2 is not emulated")
    if dst not in (float4_e2m1fn_x2, float8_e4m3fn, float8_e5m2):
        _fail(op, f"dst_type must be float4_e2m1fn_x2 (296), float4_e1m2fn_x2 (297), float8_e4m3fn (292) or "
                  f"float8_e5m2 (291), got {dst}")
    fp4 = dst == float4_e2m1fn_x2
    if fp4:
        if round_mode not in ROUND_MODES_FP4:
            _fail(op, f"round_mode must be one of {ROUND_MODES_FP4} for FP4 targets, got {round_mode!r}")
    elif round_mode != "rint":
        _fail(op, f"round_mode must be 'rint' for FP8 targets, got {round_mode!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size % 32 or not 32 <= block_size <= 1024:
        _fail(op, f"block_size must be a multiple of 32 in [32, 1024], got {block_size!r}")
    if x.dtype == torch.float32 and block_size != 32:
        _fail(op, f"float32 input requires block_size 32, got {block_size}")
    if scale_alg not in (0, 1, 2):
        _fail(op, f"scale_alg must be 0, 1 or 2, got {scale_alg!r}")
    if scale_alg == 1 and fp4 or scale_alg == 2 and not fp4:
        _fail(op, f"scale_alg {scale_alg} does not apply to dst_type {_ID_NAMES[dst]}")
    if scale_alg != 0:
        raise NotImplementedError(f"{op}: scale_alg {scale_alg} is not emulated")
    ax = axis + x.dim() if axis < 0 else axis
    if not 0 <= ax < x.dim():
        _fail(op, f"axis {axis} out of range for a {x.dim()}-D input")
    if ax != x.dim() - 1 or (not fp4 and x.shape[-1] % block_size):
        # FP8 along any axis, a short tail block allowed: blocks along `axis`, pairs interleaved
        # for a non-last axis (ascend-npu-mx.md §1.1; mxdit.formats.attention.npu_scale_layout)
        if fp4:
            raise NotImplementedError(f"{op}: FP4 along a non-last axis is not emulated")
        fmt = "fp8_e4m3" if dst == float8_e4m3fn else "fp8_e5m2"
        qd, sc = FA.quantize_mx_along(x, ax, fmt, block_size)
        return qd, FA.npu_scale_layout(sc, ax)
    k = x.shape[-1]
    if fp4 and k % 2:
        _fail(op, f"the last dimension must be even for FP4 output, got {k}")
    if k % block_size:
        raise NotImplementedError(f"{op}: a short last block (K={k}, block_size={block_size}) is not emulated")
    fmt = "fp4_e2m1" if fp4 else ("fp8_e4m3" if dst == float8_e4m3fn else "fp8_e5m2")
    q = F.quantize_mx(x, fmt, block_size=block_size, scale_mode="floor", round_mode=round_mode)
    return q.qdata, F.scales_to_pairs(q.scale)


# ---- npu_dynamic_dual_level_mx_quant ----------------------------------------------

def npu_dynamic_dual_level_mx_quant(input, *, smooth_scale=None, round_mode="rint"):
    """(y uint8 [..., K/2], level0 fp32 [..., K/512], level1 uint8 [..., K/64, 2])."""
    op = "npu_dynamic_dual_level_mx_quant"
    x = _tensor(input, op, "input")
    CALLS.append((op, dict(shape=tuple(x.shape), dtype=x.dtype, smooth_scale=smooth_scale, round_mode=round_mode)))
    if x.dtype not in (torch.bfloat16, torch.float16):
        _fail(op, f"input dtype must be bfloat16 or float16, got {x.dtype}")
    if not 1 <= x.dim() <= 7:
        _fail(op, f"input must have 1 to 7 dimensions, got {x.dim()}")
    if x.numel() == 0:
        _fail(op, "empty input")
    k = x.shape[-1]
    if k % 2:
        _fail(op, f"the last dimension must be even, got {k}")
    if round_mode not in ROUND_MODES_FP4:
        _fail(op, f"round_mode must be one of {ROUND_MODES_FP4}, got {round_mode!r}")
    if smooth_scale is not None:
        s = _tensor(smooth_scale, op, "smooth_scale")
        if s.dim() != 1 or s.shape[0] != k:
            _fail(op, f"smooth_scale must be 1-D of length {k}, got shape {tuple(s.shape)}")
        if s.dtype != x.dtype:
            _fail(op, f"smooth_scale dtype {s.dtype} must equal the input dtype {x.dtype}")
    if k % F.L0_BLOCK:
        raise NotImplementedError(f"{op}: K={k} not a multiple of 512 (padding) is not emulated")
    q = F.quantize_mx_dual(x, smooth_scale=smooth_scale, round_mode=round_mode)
    return q.qdata, q.scale_l0, F.scales_to_pairs(q.scale_l1)


# ---- npu_format_cast / npu_dtype_cast ---------------------------------------------

def npu_format_cast(self, acl_format, *, customize_dtype=None, input_dtype=None):
    """A copy tagged with the format; values and logical shape unchanged."""
    op = "npu_format_cast"
    x = _tensor(self, op, "self")
    CALLS.append((op, dict(shape=tuple(x.shape), dtype=x.dtype, acl_format=acl_format, customize_dtype=customize_dtype)))
    if isinstance(acl_format, bool) or not isinstance(acl_format, int):
        _fail(op, f"acl_format must be an int, got {acl_format!r}")
    if acl_format not in (ND, FRACTAL_NZ):
        raise NotImplementedError(f"{op}: only ND (2) and FRACTAL_NZ (29) are emulated, got {acl_format}")
    if customize_dtype is not None and not isinstance(customize_dtype, (torch.dtype, int)):
        _fail(op, f"customize_dtype must be a dtype, got {customize_dtype!r}")
    if acl_format == FRACTAL_NZ and x.dim() < 2:
        _fail(op, f"FRACTAL_NZ needs at least 2 dimensions, got {x.dim()}")
    out = x.clone()
    out._npu_format = acl_format
    return out


def npu_dtype_cast(self, dtype, input_dtype=None):
    """Value cast.  To float4_e2m1fn_x2: uint8 [..., K/2] packed (RNE, saturating; the real rounding
    of off-grid values is undocumented).  From FP4 (input_dtype=float4_e2m1fn_x2): unpack + decode."""
    op = "npu_dtype_cast"
    x = _tensor(self, op, "self")
    CALLS.append((op, dict(shape=tuple(x.shape), dtype=x.dtype, dst=dtype, input_dtype=input_dtype)))
    dst = _dtype_id(dtype, op, "dtype")
    src = None if input_dtype is None else _dtype_id(input_dtype, op, "input_dtype")
    if src == float4_e2m1fn_x2:
        if x.dtype not in (torch.uint8, torch.int8):
            _fail(op, f"an FP4 input must be held in uint8/int8, got {x.dtype}")
        vals = F.decode_elements(F.unpack_fp4(x.view(torch.uint8)), F.FP4_E2M1)
        if not isinstance(dst, torch.dtype):
            raise NotImplementedError(f"{op}: FP4 -> {_ID_NAMES.get(dst, dst)} is not emulated")
        return vals.to(dst)
    if src is not None:
        raise NotImplementedError(f"{op}: input_dtype {input_dtype!r} is not emulated")
    if dst == float4_e2m1fn_x2:
        if x.shape[-1] % 2:
            _fail(op, f"the last dimension must be even to cast to float4_e2m1fn_x2, got {x.shape[-1]}")
        codes = F.encode_elements(x.to(torch.float32), F.FP4_E2M1, "rint")
        return F.pack_fp4(codes)
    if isinstance(dst, torch.dtype):
        return x.to(dst)
    if dst in (float8_e4m3fn, float8_e5m2):
        return x.to(torch.float8_e4m3fn if dst == float8_e4m3fn else torch.float8_e5m2)
    raise NotImplementedError(f"{op}: dtype {_ID_NAMES.get(dst, dst)} is not emulated")


# ---- npu_quant_matmul ---------------------------------------------------------------

def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                     x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None,
                     group_sizes=None, y_scale=None):
    op = "npu_quant_matmul"
    x1 = _tensor(x1, op, "x1")
    x2 = _tensor(x2, op, "x2")
    scale = _tensor(scale, op, "scale")
    CALLS.append((op, dict(x1=(tuple(x1.shape), x1.dtype), x2=(tuple(x2.shape), x2.dtype, tuple(x2.stride())),
                           scale=(tuple(scale.shape), scale.dtype), pertoken_scale=None if pertoken_scale is None
                           else (tuple(pertoken_scale.shape), pertoken_scale.dtype), bias=None if bias is None
                           else (tuple(bias.shape), bias.dtype), output_dtype=output_dtype, x1_dtype=x1_dtype,
                           x2_dtype=x2_dtype, scale_dtype=scale_dtype, pertoken_scale_dtype=pertoken_scale_dtype,
                           group_sizes=group_sizes)))
    if offset is not None or y_scale is not None:
        raise NotImplementedError(f"{op}: offset / y_scale are not emulated")
    mx = (
        any(a is not None for a in (x1_dtype, x2_dtype, scale_dtype, pertoken_scale_dtype))
        or x1.dtype in _FP8_TORCH or x1.dtype == torch.uint8
    )
    if x1.dtype == torch.int32 or x2.dtype == torch.int32:
        return _quant_matmul_int4(x1, x2, scale, pertoken_scale, bias, output_dtype, group_sizes)
    if mx:
        return _quant_matmul_mx(x1, x2, scale, pertoken_scale, bias, output_dtype, x1_dtype, x2_dtype,
                                pertoken_scale_dtype, scale_dtype, group_sizes)
    return _quant_matmul_int8(x1, x2, scale, pertoken_scale, bias, output_dtype, group_sizes)


def _quant_matmul_mx(x1, x2, scale, pertoken_scale, bias, output_dtype, x1_dtype, x2_dtype,
                     pertoken_scale_dtype, scale_dtype, group_sizes):
    op = "npu_quant_matmul (MX)"
    if x1.dim() != 2:
        _fail(op, f"x1 must be 2-D [M, K] (a {x1.dim()}-D x1 needs a {x1.dim() + 1}-D pertoken_scale; "
                  f"dimension of x1Scale(pertoken_scale) should be 3); flatten the activations")
    if x2.dim() != 2:
        _fail(op, f"x2 must be 2-D [K, N], got {x2.dim()}-D")
    sd = None if scale_dtype is None else _dtype_id(scale_dtype, op, "scale_dtype")
    pd = None if pertoken_scale_dtype is None else _dtype_id(pertoken_scale_dtype, op, "pertoken_scale_dtype")
    if sd != float8_e8m0fnu:
        _fail(op, f"scale_dtype must be torch_npu.float8_e8m0fnu (293) in MX mode, got {scale_dtype!r}")
    if pertoken_scale is None:
        _fail(op, "pertoken_scale (the activation MX scales) is required in MX mode")
    if pd != float8_e8m0fnu:
        _fail(op, f"pertoken_scale_dtype must be torch_npu.float8_e8m0fnu (293) in MX mode, got {pertoken_scale_dtype!r}")
    d1 = None if x1_dtype is None else _dtype_id(x1_dtype, op, "x1_dtype")
    d2 = None if x2_dtype is None else _dtype_id(x2_dtype, op, "x2_dtype")
    # element formats
    if d1 is None and d2 is None:
        if x1.dtype not in _FP8_TORCH:
            _fail(op, f"x1 of dtype {x1.dtype} needs x1_dtype (FP4 data in uint8 is float4_e2m1fn_x2)")
        if x2.dtype not in _FP8_TORCH:
            _fail(op, f"x2 of dtype {x2.dtype} needs x2_dtype (or an FP8 x2 with an FP8 x1)")
        fp4 = False
        k1, k2, n = x1.shape[1], x2.shape[0], x2.shape[1]
    else:
        if d1 != float4_e2m1fn_x2 or d2 != float4_e2m1fn_x2:
            if d1 is None and d2 == float4_e2m1fn_x2:
                raise NotImplementedError(f"{op}: W4A8 pseudo-quant (FP8 x1, FP4 x2) is not emulated")
            _fail(op, f"x1_dtype and x2_dtype must both be torch_npu.float4_e2m1fn_x2 (296) for MXFP4, "
                      f"got {x1_dtype!r}, {x2_dtype!r}")
        for name, t in (("x1", x1), ("x2", x2)):
            if t.dtype not in (torch.uint8, torch.int8):
                _fail(op, f"{name} holds FP4x2 data and must be uint8/int8, got {t.dtype}")
        fp4 = True
        if _layout(x2) != "T" and not (_layout(x2) == "*"):
            _fail(op, "an FP4 x2 must be the .transpose(0, 1) view of the packed [N, K/2] weight "
                      f"(a contiguous x2 is read as packed along N); got shape {tuple(x2.shape)}, "
                      f"strides {tuple(x2.stride())}")
        k1, k2, n = 2 * x1.shape[1], 2 * x2.shape[0], x2.shape[1]
    if _layout(x1) not in ("N", "*"):
        _fail(op, "x1 must be contiguous (not transposed)")
    if _layout(x2) == "?":
        _fail(op, f"x2 must be contiguous or a transposed view, got strides {tuple(x2.stride())}")
    if k1 != k2:
        _fail(op, f"K of x1 ({k1}) and x2 ({k2}) differ")
    k, m = k1, x1.shape[0]
    if fp4 and (k % 2 or k <= 2):
        _fail(op, f"FP4 needs an even K > 2, got {k}")
    if not _is_nz(x2) and k <= 64:
        _fail(op, f"with an ND fp8/fp4 x2, K must be > 64 in eager mode, got {k}")
    # scales
    kb = _ceil(_ceil(k, 32), 2)
    for name, t, want in (("scale", scale, (kb, n, 2)), ("pertoken_scale", pertoken_scale, (m, kb, 2))):
        if t.dtype != torch.uint8:
            _fail(op, f"{name} must be uint8 (e8m0 bytes), got {t.dtype}")
        if tuple(t.shape) != want:
            _fail(op, f"{name} must have shape {list(want)}, got {list(t.shape)}")
    if not _same_layout(_layout(scale), _layout(x2)):
        _fail(op, f"the transpose of scale must match x2: x2 is {'transposed' if _layout(x2) == 'T' else 'not transposed'}, "
                  f"scale is {'transposed' if _layout(scale) == 'T' else 'not transposed'}")
    if not _same_layout(_layout(pertoken_scale), _layout(x1)):
        _fail(op, "the transpose of pertoken_scale must match x1 (not transposed)")
    if group_sizes is None or [int(g) for g in group_sizes] != [1, 1, 32]:
        _fail(op, f"group_sizes must be [1, 1, 32] for MX full quantization, got {group_sizes!r}")
    if bias is not None:
        if bias.dtype != torch.float32:
            _fail(op, f"bias must be float32 in MX mode, got {bias.dtype}")
        if tuple(bias.shape) not in ((n,), (1, n)):
            _fail(op, f"bias must have shape [{n}] or [1, {n}], got {list(bias.shape)}")
    if output_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        _fail(op, f"output_dtype must be float16, bfloat16 or float32 in MX mode, got {output_dtype!r}")
    if k % 32:
        raise NotImplementedError(f"{op}: a short last K block (K={k}) is not emulated")
    nb = k // 32
    if fp4:
        a = F.MXTensor(x1.view(torch.uint8).contiguous(), F.pairs_to_scales(pertoken_scale, nb), "fp4_e2m1")
        b = F.MXTensor(x2.transpose(0, 1).view(torch.uint8).contiguous(),
                       F.pairs_to_scales(scale.transpose(0, 1), nb), "fp4_e2m1")
    else:
        a = F.MXTensor(x1.contiguous(), F.pairs_to_scales(pertoken_scale, nb), _FP8_TORCH[x1.dtype])
        b = F.MXTensor(x2.transpose(0, 1).contiguous(), F.pairs_to_scales(scale.transpose(0, 1), nb),
                       _FP8_TORCH[x2.dtype])
    return F.mx_matmul(a, b, None if bias is None else bias.reshape(-1), output_dtype)


def _quant_matmul_int4(x1, x2, scale, pertoken_scale, bias, output_dtype, group_sizes):
    """int4 x int4 (the doc: "int32 represents int4 matmul, each int32 holds 8 int4"): x1 int32 [M, K/8]
    (npu_dynamic_quant quint4x2), x2 int32 [K, N/8] (npu_convert_weight_to_int4pack of W^T)."""
    op = "npu_quant_matmul (int4)"
    if x1.dtype != torch.int32 or x2.dtype != torch.int32:
        _fail(op, f"x1 and x2 must both be int32 (8 packed int4 each), got {x1.dtype}, {x2.dtype}")
    if x1.dim() != 2 or x2.dim() != 2:
        raise NotImplementedError(f"{op}: only 2-D x1 [M, K/8] and x2 [K, N/8] are emulated")
    if x2.shape[0] != 8 * x1.shape[1]:
        _fail(op, f"x2 must be the packed [K, N/8] = [{8 * x1.shape[1]}, N/8] (pack weight.T), got {list(x2.shape)}")
    return _quant_matmul_int8(_unpack_int4(x1), _unpack_int4(x2), scale, pertoken_scale, bias, output_dtype,
                              group_sizes, op=op)


def _quant_matmul_int8(x1, x2, scale, pertoken_scale, bias, output_dtype, group_sizes, op="npu_quant_matmul (int8)"):
    """int8 x int8 (torch_npu API doc dtype table): acc (+ int32 bias) * scale [* pertoken] (+ float bias)."""
    if x1.dtype != torch.int8 or x2.dtype != torch.int8:
        _fail(op, f"x1 and x2 must be int8, got {x1.dtype}, {x2.dtype}")
    if x1.dim() != 2 or x2.dim() != 2:
        raise NotImplementedError(f"{op}: only 2-D x1 [M, K] and x2 [K, N] are emulated")
    if group_sizes is not None:
        _fail(op, "group_sizes applies to MX mode only")
    m, k = x1.shape
    if x2.shape[0] != k:
        _fail(op, f"x2 must be [K, N] = [{k}, N] (pass weight.transpose(0, 1)), got {list(x2.shape)}")
    n = x2.shape[1]
    if scale.dim() != 1 or scale.shape[0] not in (1, n):
        _fail(op, f"scale must be 1-D of length 1 or {n}, got {list(scale.shape)}")
    if pertoken_scale is not None:
        if pertoken_scale.dtype != torch.float32 or tuple(pertoken_scale.shape) != (m,):
            _fail(op, f"pertoken_scale must be float32 [{m}], got {pertoken_scale.dtype} {list(pertoken_scale.shape)}")
    if output_dtype is None or output_dtype == torch.int8:
        raise NotImplementedError(f"{op}: int8 output is not emulated")
    if output_dtype == torch.bfloat16:
        scale_ok, bias_ok = (torch.float32, torch.bfloat16), (torch.int32, torch.bfloat16, torch.float32)
    elif output_dtype == torch.float16 and pertoken_scale is None:
        scale_ok, bias_ok = (torch.int64, torch.float32), (torch.int32,)
    elif output_dtype == torch.float16:
        scale_ok, bias_ok = (torch.float32,), (torch.int32, torch.float16, torch.float32)
    else:
        _fail(op, f"output_dtype must be int8, float16 or bfloat16, got {output_dtype!r}")
    if scale.dtype not in scale_ok:
        _fail(op, f"scale dtype {scale.dtype} is not allowed with output_dtype {output_dtype} "
                  f"({'with' if pertoken_scale is not None else 'without'} pertoken_scale); allowed: {scale_ok}")
    if bias is not None:
        if bias.dtype not in bias_ok:
            _fail(op, f"bias dtype {bias.dtype} is not allowed here; allowed: {bias_ok}")
        if tuple(bias.shape) != (n,):
            _fail(op, f"bias must be [{n}], got {list(bias.shape)}")
    acc = x1.to(torch.float64) @ x2.to(torch.float64)  # exact int32-valued accumulation
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.to(torch.float64)
    s = scale
    if s.dtype == torch.int64:  # npu_trans_quant_param: float32 bits in the low 32 bits
        s = (s & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    out = acc.to(torch.float32)
    if pertoken_scale is not None:
        out = out * pertoken_scale.unsqueeze(1)
    out = out * s.to(torch.float32).reshape(1, -1)
    if bias is not None and bias.dtype != torch.int32:
        out = out + bias.to(torch.float32)
    return out.to(output_dtype)


# ---- npu_dual_level_quant_matmul ----------------------------------------------------

def npu_dual_level_quant_matmul(x1, x2, x1_level0_scale, x2_level0_scale, x1_level1_scale, x2_level1_scale, *,
                                bias=None, output_dtype=torch.bfloat16):
    op = "npu_dual_level_quant_matmul"
    args = dict(x1=x1, x2=x2, x1_level0_scale=x1_level0_scale, x2_level0_scale=x2_level0_scale,
                x1_level1_scale=x1_level1_scale, x2_level1_scale=x2_level1_scale)
    for name, t in args.items():
        _tensor(t, op, name)
    CALLS.append((op, dict({k: (tuple(v.shape), v.dtype) for k, v in args.items()}, x2_nz=_is_nz(x2),
                           bias=None if bias is None else (tuple(bias.shape), bias.dtype), output_dtype=output_dtype)))
    if output_dtype == 15:
        output_dtype = torch.bfloat16
    elif output_dtype == 5:
        output_dtype = torch.float16
    if x1.dim() != 2:
        _fail(op, f"x1 must be 2-D [M, K/2], got {x1.dim()}-D {list(x1.shape)}; flatten the activations")
    if x2.dim() != 2:
        _fail(op, f"x2 must be 2-D [N, K/2], got {x2.dim()}-D")
    for name, t in (("x1", x1), ("x2", x2)):
        if t.dtype not in (torch.uint8, torch.int8):
            _fail(op, f"{name} holds FP4x2 data and must be uint8/int8, got {t.dtype}")
    if _is_nz(x1):
        _fail(op, "x1 must be ND")
    if not _is_nz(x2):
        _fail(op, "x2 must be FRACTAL_NZ: npu_format_cast(weight.view(torch.int8), 29, customize_dtype=torch.int8)")
    if x1.shape[1] * 2 != x2.shape[1] * 2:
        _fail(op, f"K of x1 ({2 * x1.shape[1]}) and x2 ({2 * x2.shape[1]}) differ")
    m, n, k = x1.shape[0], x2.shape[0], 2 * x1.shape[1]
    g0, kb = _ceil(k, 512), _ceil(_ceil(k, 32), 2)
    want = dict(x1_level0_scale=((m, g0), torch.float32), x2_level0_scale=((g0, n), torch.float32),
                x1_level1_scale=((m, kb, 2), torch.uint8), x2_level1_scale=((n, kb, 2), torch.uint8))
    for name, (shape, dtype) in want.items():
        t = args[name]
        if t.dtype != dtype:
            _fail(op, f"{name} must be {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            _fail(op, f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if bias is not None:
        if bias.dtype != torch.float32:
            _fail(op, f"bias must be float32, got {bias.dtype}")
        if tuple(bias.shape) != (n,):
            _fail(op, f"bias must be [{n}], got {list(bias.shape)}")
    if output_dtype not in (torch.float16, torch.bfloat16):
        _fail(op, f"output_dtype must be float16 or bfloat16, got {output_dtype!r}")
    if k % 512:
        raise NotImplementedError(f"{op}: K={k} not a multiple of 512 is not emulated")
    nb = k // 32
    a = F.DualMXTensor(x1.view(torch.uint8), x1_level0_scale, F.pairs_to_scales(x1_level1_scale, nb))
    b = F.DualMXTensor(x2.view(torch.uint8), x2_level0_scale.transpose(0, 1), F.pairs_to_scales(x2_level1_scale, nb))
    return F.dual_mx_matmul(a, b, bias, output_dtype)


# ---- int8 activation quantization --------------------------------------------------

def npu_quantize(input, scales, zero_points, dtype, axis=1, div_mode=True):
    """div_mode True: round(x / scales + zero_points); False: round(x * scales + zero_points); saturating."""
    op = "npu_quantize"
    x = _tensor(input, op, "input")
    scales = _tensor(scales, op, "scales")
    CALLS.append((op, dict(shape=tuple(x.shape), dtype=x.dtype, scales=(tuple(scales.shape), scales.dtype),
                           zero_points=None if zero_points is None else (tuple(zero_points.shape), zero_points.dtype),
                           out_dtype=dtype, axis=axis, div_mode=div_mode)))
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        _fail(op, f"input dtype must be float32, float16 or bfloat16, got {x.dtype}")
    ax = axis + x.dim() if axis < 0 else axis
    if ax != x.dim() - 1:
        _fail(op, f"only the last axis is supported (axis={axis} for a {x.dim()}-D input)")
    k = x.shape[-1]
    if scales.dim() != 1 or scales.shape[0] not in (1, k):
        _fail(op, f"scales must be 1-D of length 1 or {k}, got {list(scales.shape)}")
    if div_mode:
        s_ok, z_ok, d_ok = (torch.float32, torch.bfloat16), (torch.int8, torch.uint8, torch.int32, torch.bfloat16), \
            (torch.qint8, torch.quint8, torch.int32)
    else:
        s_ok, z_ok, d_ok = (torch.float32, torch.float16, torch.bfloat16), (scales.dtype,), (torch.qint8,)
    if scales.dtype not in s_ok:
        _fail(op, f"scales dtype {scales.dtype} not allowed with div_mode={div_mode}; allowed {s_ok}")
    if zero_points is not None:
        _tensor(zero_points, op, "zero_points")
        if zero_points.dtype not in z_ok:
            _fail(op, f"zero_points dtype {zero_points.dtype} not allowed with div_mode={div_mode}; allowed {z_ok}")
        if tuple(zero_points.shape) != tuple(scales.shape):
            _fail(op, f"zero_points shape {list(zero_points.shape)} must equal the scales shape {list(scales.shape)}")
    if dtype not in d_ok:
        _fail(op, f"dtype {dtype} not allowed with div_mode={div_mode}; allowed {d_ok}")
    xf = x.to(torch.float32)
    v = xf / scales.to(torch.float32) if div_mode else xf * scales.to(torch.float32)
    if zero_points is not None:
        v = v + zero_points.to(torch.float32)
    q = torch.round(v)
    if dtype == torch.qint8:
        return q.clamp(-128, 127).to(torch.int8)
    if dtype == torch.quint8:
        return q.clamp(0, 255).to(torch.uint8)
    return q.clamp(-2**31, 2**31 - 1).to(torch.int32)


def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None):
    """Per-token symmetric int8: (y int8 like input, scale fp32 input.shape[:-1]); scale = amax / 127."""
    op = "npu_dynamic_quant"
    x = _tensor(input, op, "input")
    CALLS.append((op, dict(shape=tuple(x.shape), dtype=x.dtype, dst_type=dst_type)))
    if x.dtype not in (torch.float16, torch.bfloat16):
        _fail(op, f"input dtype must be float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.numel() == 0:
        _fail(op, "input must be a non-empty tensor")
    if smooth_scales is not None or group_index is not None:
        raise NotImplementedError(f"{op}: smooth_scales / group_index are not emulated")
    if dst_type == torch.quint4x2:  # int4: y int32 [..., K/8] (8 int4 per int32), scale = amax / 7
        if x.shape[-1] % 8:
            _fail(op, f"int4 output needs the last dim to be a multiple of 8, got {x.shape[-1]}")
        q, s = quantize_int4_per_token(x.reshape(-1, x.shape[-1]))
        return _pack_int4(q).reshape(*x.shape[:-1], x.shape[-1] // 8), s.reshape(x.shape[:-1])
    if dst_type not in (None, torch.int8):
        raise NotImplementedError(f"{op}: dst_type {dst_type!r} is not emulated")
    q, s = quantize_int8_per_token(x.reshape(-1, x.shape[-1]))
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


# ---- fused infer attention (MXFP8, modes 6/6/8; BF16 fallback) --------------------

FIA_QUANT_MODES = {"query_quant_mode": 6, "key_quant_mode": 6, "value_quant_mode": 8}


def _cum_lengths(x: Any, op: str, what: str, total: int) -> list[int]:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.dim() != 1:
        _fail(op, f"{what} must be a 1-D int64 tensor of cumulative lengths")
    vals = [int(i) for i in x.tolist()]
    if not vals or vals[-1] != total or any(b <= a for a, b in zip([0] + vals[:-1], vals)):
        _fail(op, f"{what} must be strictly increasing cumulative lengths ending at T={total}, got {vals}")
    return vals


def npu_fused_infer_attention_score_v2(query, key, value, *, input_layout, num_query_heads, num_key_value_heads,
                                       softmax_scale, dequant_scale_query, dequant_scale_key, dequant_scale_value,
                                       actual_seq_qlen, actual_seq_kvlen, sparse_mode, query_quant_mode,
                                       key_quant_mode, value_quant_mode, query_dtype, key_dtype, value_dtype,
                                       dequant_scale_query_dtype, dequant_scale_key_dtype,
                                       dequant_scale_value_dtype, out_dtype):
    """The MXFP8 call SGLang makes (mx-attention.md §1): TND FP8 operands, E8M0 scale pairs,
    modes 6/6/8.  Computes mxdit.formats.attention.P_HANDLING (fp32 P, unquantized) per sequence."""
    op = "npu_fused_infer_attention_score_v2"
    q, k, v = (_tensor(t, op, n) for t, n in ((query, "query"), (key, "key"), (value, "value")))
    CALLS.append((op, dict(query=query, key=key, value=value, input_layout=input_layout,
                           num_query_heads=num_query_heads, num_key_value_heads=num_key_value_heads,
                           softmax_scale=softmax_scale, dequant_scale_query=dequant_scale_query,
                           dequant_scale_key=dequant_scale_key, dequant_scale_value=dequant_scale_value,
                           actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                           sparse_mode=sparse_mode, query_quant_mode=query_quant_mode,
                           key_quant_mode=key_quant_mode, value_quant_mode=value_quant_mode,
                           query_dtype=query_dtype, key_dtype=key_dtype, value_dtype=value_dtype,
                           dequant_scale_query_dtype=dequant_scale_query_dtype,
                           dequant_scale_key_dtype=dequant_scale_key_dtype,
                           dequant_scale_value_dtype=dequant_scale_value_dtype, out_dtype=out_dtype)))
    if input_layout != "TND":
        _fail(op, f"input_layout must be 'TND' for the MX-quantized path, got {input_layout!r}")
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != 3:
            _fail(op, f"{name} must be [T, N, D] for TND, got shape {list(t.shape)}")
        if t.dtype != torch.float8_e4m3fn:
            _fail(op, f"{name} dtype must be float8_e4m3fn, got {t.dtype}")
        if not t.is_contiguous():
            _fail(op, f"{name} must be contiguous")
    for name, d in (("query_dtype", query_dtype), ("key_dtype", key_dtype), ("value_dtype", value_dtype)):
        if _dtype_id(d, op, name) != float8_e4m3fn:
            _fail(op, f"{name} must be float8_e4m3fn, got {d!r}")
    for name, d in (("dequant_scale_query_dtype", dequant_scale_query_dtype),
                    ("dequant_scale_key_dtype", dequant_scale_key_dtype),
                    ("dequant_scale_value_dtype", dequant_scale_value_dtype)):
        if _dtype_id(d, op, name) != float8_e8m0fnu:
            _fail(op, f"{name} must be float8_e8m0fnu (293), got {d!r}")
    modes = dict(query_quant_mode=query_quant_mode, key_quant_mode=key_quant_mode, value_quant_mode=value_quant_mode)
    for name, want in FIA_QUANT_MODES.items():
        if modes[name] != want:
            _fail(op, f"{name} must be {want} for MXFP8 (Q/K per 32 along D, V per 32 tokens), got {modes[name]!r}")
    if sparse_mode != 0:
        _fail(op, f"sparse_mode must be 0 (no mask), got {sparse_mode!r}")
    t_q, n, d = q.shape
    t_k = k.shape[0]
    if num_query_heads != n or num_key_value_heads != k.shape[1]:
        _fail(op, f"num_query_heads/num_key_value_heads ({num_query_heads}, {num_key_value_heads}) must equal "
                  f"the head dims of query/key ({n}, {k.shape[1]})")
    if k.shape[1] != n:
        _fail(op, "MX-quantized attention needs as many key/value heads as query heads")
    if k.shape != v.shape or k.shape[2] != d:
        _fail(op, f"key and value must both be [T_kv, N, {d}], got {list(k.shape)} and {list(v.shape)}")
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, float):
        _fail(op, f"softmax_scale must be a float, got {softmax_scale!r}")
    if out_dtype not in (torch.bfloat16, torch.float16):
        _fail(op, f"out_dtype must be bfloat16 or float16, got {out_dtype!r}")
    nd = _ceil(d, 32)
    want_shapes = {"dequant_scale_query": (t_q, n, _ceil(nd, 2), 2), "dequant_scale_key": (t_k, n, _ceil(nd, 2), 2),
                   "dequant_scale_value": (_ceil(_ceil(t_k, 32), 2), n, d, 2)}
    scales = {"dequant_scale_query": dequant_scale_query, "dequant_scale_key": dequant_scale_key,
              "dequant_scale_value": dequant_scale_value}
    for name, sc in scales.items():
        _tensor(sc, op, name)
        if sc.dtype != torch.uint8 or tuple(sc.shape) != want_shapes[name]:
            _fail(op, f"{name} must be uint8 {list(want_shapes[name])}, got {sc.dtype} {list(sc.shape)}")
    cq = _cum_lengths(actual_seq_qlen, op, "actual_seq_qlen", t_q)
    ck = _cum_lengths(actual_seq_kvlen, op, "actual_seq_kvlen", t_k)
    if len(cq) != len(ck):
        _fail(op, "actual_seq_qlen and actual_seq_kvlen must describe the same batch")
    qd = FA.dequantize_mx_along(q, FA.npu_scale_unlayout(dequant_scale_query, -1, nd), -1)
    kd = FA.dequantize_mx_along(k, FA.npu_scale_unlayout(dequant_scale_key, -1, nd), -1)
    vd = FA.dequantize_mx_along(v, FA.npu_scale_unlayout(dequant_scale_value, 0, _ceil(t_k, 32)), 0)
    out = torch.empty(t_q, n, d, dtype=torch.float32)
    for (q0, q1), (k0, k1) in zip(zip([0] + cq[:-1], cq), zip([0] + ck[:-1], ck)):
        out[q0:q1] = FA.attention_fp32(qd[None, q0:q1], kd[None, k0:k1], vd[None, k0:k1], softmax_scale)[0]
    return out.to(out_dtype), torch.empty(0)


def npu_fused_infer_attention_score(query, key, value, *, num_heads, num_key_value_heads, scale, input_layout,
                                    softmax_lse_flag=False, atten_mask=None):
    """The BF16 fallback SGLang calls (BNSD): softmax(Q K^T * scale) V in fp32, output in query's dtype."""
    op = "npu_fused_infer_attention_score"
    q, k, v = (_tensor(t, op, n) for t, n in ((query, "query"), (key, "key"), (value, "value")))
    CALLS.append((op, dict(shape=tuple(q.shape), input_layout=input_layout, num_heads=num_heads,
                           num_key_value_heads=num_key_value_heads, scale=scale, atten_mask=atten_mask)))
    if input_layout != "BNSD":
        _fail(op, f"only input_layout 'BNSD' is emulated, got {input_layout!r}")
    if q.dim() != 4 or q.shape[1] != num_heads or k.shape[1] != num_key_value_heads:
        _fail(op, f"BNSD query/key must be [B, N, S, D] with N = num_heads/num_key_value_heads, "
                  f"got {list(q.shape)} / {list(k.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        _fail(op, f"query/key/value must share a bfloat16/float16 dtype, got {q.dtype}/{k.dtype}/{v.dtype}")
    if atten_mask is not None or softmax_lse_flag:
        raise NotImplementedError(f"{op}: masks and LSE are not emulated")
    out = FA.attention_fp32(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), float(scale))
    return out.transpose(1, 2).to(q.dtype), torch.empty(0)

# ---- int4 (W4A4_DYNAMIC) --------------------------------------------------------
# The real packing "8 int4 per int32, interleaved" (torch_npu doc of npu_convert_weight_to_int4pack) is
# opaque to callers: only the ops that produce and consume it look inside.  The emulation uses nibble j of
# each int32 (little-endian) for element j of its group of 8; it checks what a caller controls (dtypes,
# shapes, contiguity, value range), not the hardware's bit order.

def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], [..., K] (K % 8 == 0) -> int32 [..., K/8]."""
    nib = (q.to(torch.int64) & 0xF).reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
    word = (nib << (4 * torch.arange(8, dtype=torch.int64))).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """int32 [..., K/8] -> int8 [..., K] (sign-extended nibbles)."""
    nib = (p.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8, dtype=torch.int64))) & 0xF
    nib = torch.where(nib >= 8, nib - 16, nib)
    return nib.reshape(*p.shape[:-1], p.shape[-1] * 8).to(torch.int8)


def npu_convert_weight_to_int4pack(weight, inner_k_tiles=0):
    """torch_npu doc: weight int32, 2-D, contiguous, last dim 8-aligned, values in [-8, 7] -> int32 [k, n/8]."""
    op = "npu_convert_weight_to_int4pack"
    w = _tensor(weight, op, "weight")
    CALLS.append((op, dict(shape=tuple(w.shape), dtype=w.dtype, contiguous=w.is_contiguous(),
                           inner_k_tiles=inner_k_tiles)))
    if w.dtype != torch.int32:
        _fail(op, f"weight must be int32, got {w.dtype}")
    if w.dim() != 2:
        _fail(op, f"weight must be 2-D, got {w.dim()}-D")
    if not w.is_contiguous():
        _fail(op, "weight must be contiguous (pass weight.transpose(0, 1).contiguous())")
    if w.shape[-1] % 8:
        _fail(op, f"the last dim must be a multiple of 8, got {w.shape[-1]}")
    if w.numel() and (int(w.min()) < -8 or int(w.max()) > 7):
        _fail(op, f"values must be int4 in [-8, 7], found [{int(w.min())}, {int(w.max())}]")
    if inner_k_tiles != 0:
        _fail(op, "inner_k_tiles is reserved and must be 0")
    return _pack_int4(w)
