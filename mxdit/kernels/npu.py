"""The Ascend NPU kernel backend: torch_npu ops, called exactly as the seed
implementations call them (SGLang ``mxfp8_npu.py`` / ``mxfp4_npu.py`` /
``modelslim_mx*_scheme.py``, MindIE-SD ``W*QuantLinear``, vllm-ascend
``w4a4_mxfp4.py``; ../shared/reference/sglang-diffusion-mx.md §3-5 and
ascend-npu-mx.md §1-2).

``import mxdit.kernels.npu`` works without torch_npu; constructing or using
:class:`NPUBackend` without it raises :class:`NPUUnavailableError` (both an
ImportError and a RuntimeError) saying what to install.  ``torch_npu`` is
looked up on every call, never cached at import.

Per scheme (weights converted once in ``prepare_*``, activations per call):

=====================  ==========================================================
MXFP8 (mxfp8,          weight float8_e4m3fn [N, K] kept ND; scale [N, K/32] ->
W8A8_MXFP8)            pairs [N, K/64, 2].  ``npu_dynamic_mx_quant(x,
                       dst_type=float8_e4m3fn)`` then ``npu_quant_matmul(x1,
                       w.T, scale.T, scale_dtype=e8m0, pertoken_scale=s1,
                       pertoken_scale_dtype=e8m0, bias=fp32, output_dtype,
                       group_sizes=[1, 1, 32])``.  FP8 allows only
                       round_mode "rint": anything else raises.
MXFP4 single level     packed uint8 [N, K/2] kept ND; scale pairs as above.
(mxfp4, W4A4_MXFP4)    ``npu_dynamic_mx_quant(x, dst_type=float4_e2m1fn_x2,
                       round_mode)``; the same matmul plus ``x1_dtype =
                       x2_dtype = float4_e2m1fn_x2`` (vllm-ascend / MindIE-SD).
dual-level MXFP4       ``npu_format_cast(w.view(int8), 29, customize_dtype=
(mxfp4_dual,           int8)`` (FRACTAL_NZ; our canonical weight is already
W4A4_MXFP4_DUALSCALE)  packed, so no ``npu_dtype_cast``); L0 [N, K/512] ->
                       [K/512, N] contiguous; L1 [N, K/32] -> pairs.
                       ``npu_dynamic_dual_level_mx_quant(x, smooth_scale,
                       round_mode)`` then ``npu_dual_level_quant_matmul(x1,
                       w_nz, l0, w_l0, l1, w_l1, bias=fp32, output_dtype)``.
                       Smoothing: by default SGLang's ``x * mul_scale`` then
                       ``smooth_scale=None``; with ``smooth_in_quant=True``
                       MindIE-SD's fused ``smooth_scale=mul_scale`` (x dtype).
W8A8 (static)          ``npu_quantize(x, scales=input_scale, zero_points=
                       input_offset (int8), dtype=qint8, axis=-1)`` (div_mode
                       True: x / scale + offset) then ``npu_quant_matmul(xq,
                       w.T, deq_scale, bias=quant_bias, output_dtype)``.
W8A8_DYNAMIC           ``npu_dynamic_quant(x)`` then ``npu_quant_matmul(xq,
                       w.T, weight_scale, pertoken_scale, bias, output_dtype)``.
W4A4_DYNAMIC           as SGLang's NPU_W4A4DynamicLinearMethodImpl (srt/hardware_
(int4)                 backend/npu/quantization/w4a4.py): at load
                       ``npu_convert_weight_to_int4pack(w.T.contiguous()
                       .to(int32))`` -> int32 [K, N/8]; per call
                       ``npu_dynamic_quant(x, dst_type=torch.quint4x2)`` ->
                       (int32 [M, K/8], fp32 [M]) then ``npu_quant_matmul(xq,
                       w_packed, weight_scale (fp32 [N]), pertoken_scale,
                       bias, output_dtype)``.  Needs K % 8 == N % 8 == 0 and
                       bf16/fp16 in and out, else the reference numerics.
fp8 (per channel)      no NPU op here: the reference implementation (on the
                       tensors' device).
MXFP8 attention        SGLang's ``ascend_fa.py``: BSND -> TND [B*S, N, D],
(self-attention)       per head chunk (``SGLANG_DIFFUSION_MXFP8_FA_HEAD_CHUNK_SIZE``,
                       default 4) ``npu_dynamic_mx_quant(x, dst_type=float8_e4m3fn,
                       axis=-1)`` for q, k, ``axis=0`` for v, then
                       ``npu_fused_infer_attention_score_v2(..., input_layout="TND",
                       quant modes 6/6/8, e8m0 scale dtypes, actual_seq_qlen/kvlen
                       cumulative)``; BF16 ``npu_fused_infer_attention_score`` (BNSD)
                       unless (B*S) % 64 == 0 and q/k/v shapes agree.  fp8_block
                       (MindIE-SD): the reference numerics on the device.
=====================  ==========================================================

The reference docs disagree on the static int8 call: SGLang / vllm-ascend pass
``scales=1/input_scale`` with ``div_mode=False`` (x * (1/s)), MindIE-SD passes
``input_scale`` with the default ``div_mode=True`` (x / s).  We use the
division form: it is what mxdit's reference computes bit for bit (x * fp32(1/s)
can differ from x / s by one rounding).  With ``div_mode=True`` the op takes an
integer zero point, so the (integer-valued) fp32 ``input_offset`` is passed as
int8.

Where the documented ops cannot express a request exactly, the backend runs
the reference numerics instead (same device, same result as the ``reference``
backend): weight ``scale_mode="rceil"``; mixed activation/weight MX formats;
K <= 64 for MX (the op's ND-weight limit); inputs the quant ops reject
(fp32 into the dual-level quant, K not a multiple of 32/512, empty); an fp32
``out_dtype`` for the dual-level and int8 matmuls (they output fp16/bf16
only); a non-integer ``input_offset``.  (W8A8 static never passes a float
bias: msmodelslim folds it into ``quant_bias``, which fills the op's bias slot.)

What is verified, and what is not
---------------------------------
Verified here (tests/test_npu_backend.py, on CPU, against the emulated
torch_npu in tests/fake_torch_npu.py): that this backend calls the ops with
the documented argument names, order, dtypes, dtype ids and layouts (the
emulation makes the real ops' argument checks: 2-D inputs, transposed scale
views matching x2 and pertoken_scale matching x1, [K/512, N] L0, NZ-tagged dual
weight, fp32 bias, group_sizes, round modes, block sizes, output dtypes), and
that with the ops' *documented* semantics (computed by mxdit's reference
numerics) every online method and msmodelslim scheme gives bit-identical
quantized activations and layer outputs to the reference backend, up to a
tiny Wan transformer end to end.

Not verified here: real Ascend hardware and CANN / torch_npu versions (e.g.
whether a given release accepts ``smooth_scale`` — the op-plugin 26.1.0 doc
says "not supported" — or the early-2026 CANN defect where ``smooth_scale=None``
failed inside the op, ops-nn #1876); the ops' real rounding / accumulation
order where the docs are silent (fp32 summation order, int8 scale order);
performance; the physical FRACTAL_NZ layout (emulated as a tag, values
unchanged); graph mode (the dual matmul is single-op mode only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from mxdit import formats as F
from mxdit.kernels.base import KernelBackend

INSTALL_HINT = (
    "the 'npu' backend needs torch_npu (pip install torch-npu matching your CANN; "
    "see https://github.com/Ascend/pytorch)"
)

ACL_FORMAT_ND = 2
ACL_FORMAT_FRACTAL_NZ = 29
MX_GROUP_SIZES = [1, 1, 32]  # (group_m, group_n, group_k)
MX_BLOCK = 32

_HALF = (torch.bfloat16, torch.float16)
_MX_OUT = (torch.bfloat16, torch.float16, torch.float32)
_MX_IN = (torch.bfloat16, torch.float16, torch.float32)


class NPUUnavailableError(ImportError, RuntimeError):
    """torch_npu is missing (an ImportError for an optional dependency, and a RuntimeError)."""


def _torch_npu():
    """The torch_npu module, looked up now (tests install an emulation in sys.modules)."""
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        raise NPUUnavailableError(INSTALL_HINT) from None
    return torch_npu


def check_npu_available() -> None:
    """For ``--device npu``: raise RuntimeError (one line) unless torch_npu imports and sees an NPU."""
    _torch_npu()
    npu = getattr(torch, "npu", None)
    is_avail = getattr(npu, "is_available", None)
    if callable(is_avail) and not is_avail():
        raise RuntimeError(
            "torch_npu is installed but torch.npu.is_available() is False: no Ascend NPU is visible "
            "(check the driver, CANN's set_env.sh and ASCEND_RT_VISIBLE_DEVICES)"
        )


def is_npu_device(device: Any) -> bool:
    """True for "npu", "npu:N", a torch.device of type npu, or a tensor on one (no torch_npu needed)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    if isinstance(device, torch.device):
        return device.type == "npu"
    if isinstance(device, str):
        return device.split(":", 1)[0].strip().lower() == "npu"
    return False


# ---- prepared weights --------------------------------------------------------

@dataclass
class NPUMXWeight:
    """weight: float8 [N, K] or packed uint8 [N, K/2] (ND); scale: uint8 pairs [N, ceil(K/64), 2]."""

    weight: torch.Tensor
    scale: torch.Tensor
    fmt: str
    canonical: F.MXTensor  # the layer's own tensors (no copy), for the reference fallbacks


@dataclass
class NPUDualWeight:
    """weight: int8 [N, K/2] FRACTAL_NZ; scale_l0: fp32 [K/512, N]; scale_l1: uint8 pairs [N, K/64, 2]."""

    weight: torch.Tensor
    scale_l0: torch.Tensor
    scale_l1: torch.Tensor
    canonical: F.DualMXTensor


def _fp8_round_check(fmt: F.ElementFormat, round_mode: str) -> None:
    if fmt is not F.FP4_E2M1 and round_mode != "rint":
        raise ValueError(
            f"the 'npu' backend quantizes {fmt.name} with torch_npu.npu_dynamic_mx_quant, which allows only "
            f"round_mode='rint' for FP8 targets (got {round_mode!r}); use act_round_mode='rint' for MXFP8"
        )


def _check_smooth(smooth_scale: torch.Tensor, k: int) -> None:
    if tuple(smooth_scale.shape) != (k,):
        raise ValueError(f"smooth_scale must have shape ({k},), got {tuple(smooth_scale.shape)}")


class NPUBackend(KernelBackend):
    """torch_npu kernels (Ascend 950PR/950DT for the MX ops). See the module docstring."""

    name = "npu"

    def __init__(self) -> None:
        _torch_npu()  # fail fast with the install hint
        self._zero_points: dict[int, tuple[torch.Tensor, int, Optional[torch.Tensor]]] = {}

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        try:
            _torch_npu()
        except NPUUnavailableError:
            return False
        return True

    def quantized_attention(self, q, k, v, *, mode="mxfp8", softmax_scale=None, out_dtype=None):
        """MXFP8 attention as SGLang calls it (see :func:`_npu_quantized_attention`)."""
        return _npu_quantized_attention(self, q, k, v, mode=mode, softmax_scale=softmax_scale, out_dtype=out_dtype)

    @staticmethod
    def _mx_dst(t, fmt: F.ElementFormat):
        return {"fp4_e2m1": t.float4_e2m1fn_x2, "fp8_e4m3": t.float8_e4m3fn, "fp8_e5m2": t.float8_e5m2}[fmt.name]

    # ---- activations ------------------------------------------------------
    def quantize_mx(self, x, fmt, *, scale_mode="floor", round_mode="rint"):
        f = F.get_format(fmt)
        F.elements.check_round_mode(round_mode)
        _fp8_round_check(f, round_mode)
        ok = (
            scale_mode == "floor" and isinstance(x, torch.Tensor) and x.dtype in _MX_IN
            and 1 <= x.dim() <= 7 and x.numel() > 0 and x.shape[-1] % MX_BLOCK == 0
        )
        if not ok:  # rceil (no NPU equivalent) or an input the op rejects: reference numerics / errors
            return super().quantize_mx(x, fmt, scale_mode=scale_mode, round_mode=round_mode)
        t = _torch_npu()
        if f is F.FP4_E2M1:
            y, s = t.npu_dynamic_mx_quant(x, dst_type=t.float4_e2m1fn_x2, round_mode=round_mode)
        else:
            y, s = t.npu_dynamic_mx_quant(x, dst_type=self._mx_dst(t, f))
        return F.MXTensor(y, F.pairs_to_scales(s, x.shape[-1] // MX_BLOCK), f.name, MX_BLOCK)

    def quantize_mx_dual(self, x, *, smooth_scale=None, round_mode="rint", smooth_in_quant: bool = False):
        F.elements.check_round_mode(round_mode)
        ok = (
            isinstance(x, torch.Tensor) and x.dtype in _HALF and 1 <= x.dim() <= 7 and x.numel() > 0
            and x.shape[-1] % F.L0_BLOCK == 0
        )
        if not ok:  # fp32 (the op takes bf16/fp16) or a shape it rejects: reference numerics / errors
            return super().quantize_mx_dual(x, smooth_scale=smooth_scale, round_mode=round_mode)
        t = _torch_npu()
        k = x.shape[-1]
        fused = None
        if smooth_scale is not None:
            _check_smooth(smooth_scale, k)
            s = smooth_scale.to(x.dtype)
            if smooth_in_quant:
                fused = s  # MindIE-SD: the op multiplies, in x's dtype
            else:
                x = x * s  # SGLang: explicit multiply in x's dtype
        y, l0, l1 = t.npu_dynamic_dual_level_mx_quant(x, smooth_scale=fused, round_mode=round_mode)
        return F.DualMXTensor(y, l0, F.pairs_to_scales(l1, k // F.L1_BLOCK))

    # ---- weights, once at load -------------------------------------------
    def prepare_mx_weight(self, w: F.MXTensor) -> NPUMXWeight:
        if w.block_size != MX_BLOCK or w.qdata.dim() != 2:
            raise ValueError(
                f"npu backend: MX weights must be 2-D with block size 32, got shape {tuple(w.shape)}, "
                f"block size {w.block_size}"
            )
        return NPUMXWeight(weight=w.qdata, scale=F.scales_to_pairs(w.scale), fmt=w.fmt, canonical=w)

    def prepare_dual_weight(self, w: F.DualMXTensor) -> NPUDualWeight:
        if w.qdata.dim() != 2:
            raise ValueError(f"npu backend: dual-level weights must be 2-D [N, K/2], got {tuple(w.qdata.shape)}")
        t = _torch_npu()
        w_nz = t.npu_format_cast(w.qdata.view(torch.int8), ACL_FORMAT_FRACTAL_NZ, customize_dtype=torch.int8)
        l0 = w.scale_l0.transpose(0, 1).contiguous()  # x2Level0Scale must be [K/512, N]
        l1 = F.scales_to_pairs(w.scale_l1)  # [N, K/64, 2], not transposed
        return NPUDualWeight(weight=w_nz, scale_l0=l0, scale_l1=l1, canonical=w)

    # ---- matmuls ----------------------------------------------------------
    def mx_linear(self, x, w, bias, *, act_fmt, scale_mode="floor", round_mode="rint", smooth_scale=None,
                  out_dtype=torch.bfloat16):
        if isinstance(w, F.MXTensor):
            w = self.prepare_mx_weight(w)
        f = F.get_format(act_fmt)
        F.elements.check_round_mode(round_mode)
        _fp8_round_check(f, round_mode)
        lead, k = x.shape[:-1], x.shape[-1]
        x2d = x.reshape(-1, k)
        if smooth_scale is not None:
            x2d = x2d * smooth_scale.to(x2d.dtype)
        native = (
            f.name == w.fmt and scale_mode == "floor" and out_dtype in _MX_OUT and x2d.dtype in _MX_IN
            and x2d.shape[0] > 0 and k % MX_BLOCK == 0 and k > 64
        )
        if not native:
            xq = self.quantize_mx(x2d, act_fmt, scale_mode=scale_mode, round_mode=round_mode)
            out = F.mx_matmul(xq, w.canonical, bias, out_dtype)
            return out.reshape(*lead, out.shape[-1])
        t = _torch_npu()
        b = None if bias is None else bias.to(torch.float32)
        if f is F.FP4_E2M1:
            x1, s1 = t.npu_dynamic_mx_quant(x2d, dst_type=t.float4_e2m1fn_x2, round_mode=round_mode)
            out = t.npu_quant_matmul(
                x1, w.weight.transpose(0, 1), w.scale.transpose(0, 1),
                scale_dtype=t.float8_e8m0fnu, pertoken_scale=s1, pertoken_scale_dtype=t.float8_e8m0fnu,
                bias=b, output_dtype=out_dtype,
                x1_dtype=t.float4_e2m1fn_x2, x2_dtype=t.float4_e2m1fn_x2, group_sizes=MX_GROUP_SIZES,
            )
        else:
            x1, s1 = t.npu_dynamic_mx_quant(x2d, dst_type=self._mx_dst(t, f))
            out = t.npu_quant_matmul(
                x1, w.weight.transpose(0, 1), w.scale.transpose(0, 1),
                scale_dtype=t.float8_e8m0fnu, pertoken_scale=s1, pertoken_scale_dtype=t.float8_e8m0fnu,
                bias=b, output_dtype=out_dtype, group_sizes=MX_GROUP_SIZES,
            )
        return out.reshape(*lead, out.shape[-1])

    def dual_linear(self, x, w, bias, *, round_mode="rint", smooth_scale=None, out_dtype=torch.bfloat16,
                    smooth_in_quant: bool = False):
        """``smooth_in_quant``: pass ``smooth_scale`` to the quant op (MindIE-SD) instead of
        multiplying first (SGLang, the default); the two are numerically identical."""
        if isinstance(w, F.DualMXTensor):
            w = self.prepare_dual_weight(w)
        lead, k = x.shape[:-1], x.shape[-1]
        x2d = x.reshape(-1, k)
        xq = self.quantize_mx_dual(x2d, smooth_scale=smooth_scale, round_mode=round_mode,
                                   smooth_in_quant=smooth_in_quant)
        if out_dtype not in _HALF:  # the op outputs fp16/bf16 only
            out = F.dual_mx_matmul(xq, w.canonical, bias, out_dtype)
        else:
            t = _torch_npu()
            out = t.npu_dual_level_quant_matmul(
                xq.qdata, w.weight, xq.scale_l0, w.scale_l0, F.scales_to_pairs(xq.scale_l1), w.scale_l1,
                bias=None if bias is None else bias.to(torch.float32), output_dtype=out_dtype,
            )
        return out.reshape(*lead, out.shape[-1])

    # fp8_linear / prepare_fp8_weight: inherited reference numerics (no NPU op wired for per-channel FP8).

    def _int8_zero_point(self, input_offset: torch.Tensor) -> Optional[torch.Tensor]:
        """input_offset (fp32, integer-valued) as the int8 zero point npu_quantize takes with div_mode=True;
        None if it is not an integer in [-128, 127].  Cached per tensor (no host sync per call)."""
        key = id(input_offset)
        hit = self._zero_points.get(key)
        if hit is not None and hit[0] is input_offset and hit[1] == input_offset._version:
            return hit[2]
        off = input_offset.to(torch.float32)
        ok = bool(((off == off.round()) & (off >= -128) & (off <= 127)).all())
        zp = off.to(torch.int8) if ok else None
        self._zero_points[key] = (input_offset, input_offset._version, zp)
        return zp

    def int8_linear(self, x, w, bias, *, input_scale=None, input_offset=None, quant_bias=None, deq_scale=None,
                    weight_scale=None, smooth_scale=None, out_dtype=torch.bfloat16):
        static = deq_scale is not None
        lead, k = x.shape[:-1], x.shape[-1]
        x2d = x.reshape(-1, k)
        if smooth_scale is not None:
            x2d = x2d * smooth_scale.to(x2d.dtype)
        zp = self._int8_zero_point(input_offset) if static else None
        native = out_dtype in _HALF and x2d.dtype in _HALF and x2d.shape[0] > 0
        if static:
            native = native and bias is None and zp is not None
        if not native:
            out = super().int8_linear(
                x2d, w, bias, input_scale=input_scale, input_offset=input_offset, quant_bias=quant_bias,
                deq_scale=deq_scale, weight_scale=weight_scale, out_dtype=out_dtype,
            )
            return out.reshape(*lead, out.shape[-1])
        t = _torch_npu()
        if static:
            xq = t.npu_quantize(x2d, scales=input_scale.to(torch.float32), zero_points=zp, dtype=torch.qint8, axis=-1)
            out = t.npu_quant_matmul(
                xq, w.transpose(0, 1), deq_scale.to(torch.float32), bias=quant_bias.to(torch.int32),
                output_dtype=out_dtype,
            )
        else:
            xq, x_scale = t.npu_dynamic_quant(x2d)
            out = t.npu_quant_matmul(
                xq, w.transpose(0, 1), weight_scale.reshape(-1).to(torch.float32), pertoken_scale=x_scale.reshape(-1),
                bias=None if bias is None else bias.to(torch.float32), output_dtype=out_dtype,
            )
        return out.reshape(*lead, out.shape[-1])


    # ---- W4A4_DYNAMIC (int4) ------------------------------------------------
    def prepare_int4_weight(self, w: torch.Tensor) -> "NPUInt4Weight":
        n, k = w.shape
        packed = None
        if n % 8 == 0 and k % 8 == 0:
            packed = _torch_npu().npu_convert_weight_to_int4pack(w.transpose(0, 1).contiguous().to(torch.int32))
        return NPUInt4Weight(w, packed)

    def int4_linear(self, x, w, bias, *, weight_scale, smooth_scale=None, out_dtype=torch.bfloat16):
        lead, k = x.shape[:-1], x.shape[-1]
        x2d = x.reshape(-1, k)
        if smooth_scale is not None:
            x2d = x2d * smooth_scale.to(x2d.dtype)
        native = w.packed is not None and out_dtype in _HALF and x2d.dtype in _HALF and x2d.shape[0] > 0
        if not native:
            out = super().int4_linear(x2d, w.weight, bias, weight_scale=weight_scale, out_dtype=out_dtype)
            return out.reshape(*lead, out.shape[-1])
        t = _torch_npu()
        xq, x_scale = t.npu_dynamic_quant(x2d, dst_type=torch.quint4x2)
        out = t.npu_quant_matmul(
            xq, w.packed, weight_scale.reshape(-1).to(torch.float32), pertoken_scale=x_scale.reshape(-1),
            bias=None if bias is None else bias.to(torch.float32), output_dtype=out_dtype,
        )
        return out.reshape(*lead, out.shape[-1])


class NPUInt4Weight:
    """weight: the canonical int8 [N, K] (int4 values); packed: int32 [K, N/8] from
    npu_convert_weight_to_int4pack, or None when N or K is not a multiple of 8 (reference path)."""

    def __init__(self, weight: torch.Tensor, packed: Optional[torch.Tensor]):
        self.weight = weight
        self.packed = packed


__all__ = [
    "NPUBackend", "NPUInt4Weight", "NPUUnavailableError", "NPUMXWeight", "NPUDualWeight", "check_npu_available", "is_npu_device",
    "INSTALL_HINT", "ACL_FORMAT_FRACTAL_NZ",
]


# ---- MXFP8 attention (SGLang v0.5.23 ascend_fa.py; mx-attention.md §1) ---------------

#: heads per npu_fused_infer_attention_score_v2 call (SGLang's env var, default 4)
MXFP8_FA_HEAD_CHUNK_ENV = "SGLANG_DIFFUSION_MXFP8_FA_HEAD_CHUNK_SIZE"
MXFP8_FA_HEAD_CHUNK_DEFAULT = 4
#: query / key / value quant modes of the MXFP8 FA call
MXFP8_FA_QUANT_MODES = (6, 6, 8)
#: SGLang runs the MXFP8 path only when the packed token count is a multiple of this
MXFP8_FA_TOKEN_MULTIPLE = 64


def mxfp8_fa_head_chunk() -> int:
    """Heads per fused-attention call from ``SGLANG_DIFFUSION_MXFP8_FA_HEAD_CHUNK_SIZE`` (default 4)."""
    import os

    raw = os.environ.get(MXFP8_FA_HEAD_CHUNK_ENV, "").strip()
    if not raw:
        return MXFP8_FA_HEAD_CHUNK_DEFAULT
    try:
        val = int(raw)
    except ValueError:
        val = 0
    if val <= 0:
        raise ValueError(f"{MXFP8_FA_HEAD_CHUNK_ENV} must be a positive integer, got {raw!r}")
    return val


def mxfp8_fa_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """SGLang's gate (BSND): same (S, N) for q and k, k.shape == v.shape, (B*S) % 64 == 0."""
    return (q.shape[1:3] == k.shape[1:3] and k.shape == v.shape
            and (q.shape[0] * q.shape[1]) % MXFP8_FA_TOKEN_MULTIPLE == 0)


def _npu_quantized_attention(self, q, k, v, *, mode="mxfp8", softmax_scale=None, out_dtype=None):
    """MXFP8: SGLang's call per head chunk; BF16 fused attention where SGLang falls back.

    ``fp8_block`` (MindIE-SD, modes 7/7/7) runs the reference numerics on the
    tensors' device: its ``npu_dynamic_quant`` block call is not reproduced here.
    """
    if mode != "mxfp8":
        return KernelBackend.quantized_attention(self, q, k, v, mode=mode, softmax_scale=softmax_scale,
                                                 out_dtype=out_dtype)
    t = _torch_npu()
    b, s, n, d = q.shape
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    out_dtype = out_dtype or q.dtype
    if not mxfp8_fa_eligible(q, k, v):
        from mxdit.kernels import _warn_once

        _warn_once(f"MXFP8 attention: B*S = {b * s} is not a multiple of {MXFP8_FA_TOKEN_MULTIPLE} (or q/k/v "
                   "shapes differ): BF16 npu_fused_infer_attention_score is used instead, as SGLang does")
        out, _ = t.npu_fused_infer_attention_score(
            q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
            num_heads=n, num_key_value_heads=k.shape[2], scale=scale, input_layout="BNSD",
            softmax_lse_flag=False, atten_mask=None)
        return out.transpose(1, 2).to(out_dtype)
    seq_q = torch.arange(s, s * (b + 1), s, dtype=torch.int64, device=q.device)
    seq_kv = torch.arange(k.shape[1], k.shape[1] * (b + 1), k.shape[1], dtype=torch.int64, device=k.device)
    qt, kt, vt = (x.reshape(-1, x.shape[2], d) for x in (q, k, v))
    chunk = mxfp8_fa_head_chunk()
    groups = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    fp8, e8m0 = torch.float8_e4m3fn, t.float8_e8m0fnu
    qm, km, vm = MXFP8_FA_QUANT_MODES
    outs = []
    for qc, kc, vc in zip(qt.split(groups, dim=1), kt.split(groups, dim=1), vt.split(groups, dim=1)):
        qc, kc, vc = qc.contiguous(), kc.contiguous(), vc.contiguous()
        q8, qs = t.npu_dynamic_mx_quant(qc, dst_type=fp8, axis=-1)
        k8, ks = t.npu_dynamic_mx_quant(kc, dst_type=fp8, axis=-1)
        v8, vs = t.npu_dynamic_mx_quant(vc, dst_type=fp8, axis=0)
        outs.append(t.npu_fused_infer_attention_score_v2(
            q8, k8, v8, input_layout="TND", num_query_heads=qc.shape[1], num_key_value_heads=kc.shape[1],
            softmax_scale=scale, dequant_scale_query=qs, dequant_scale_key=ks, dequant_scale_value=vs,
            actual_seq_qlen=seq_q, actual_seq_kvlen=seq_kv, sparse_mode=0,
            query_quant_mode=qm, key_quant_mode=km, value_quant_mode=vm,
            query_dtype=fp8, key_dtype=fp8, value_dtype=fp8,
            dequant_scale_query_dtype=e8m0, dequant_scale_key_dtype=e8m0, dequant_scale_value_dtype=e8m0,
            out_dtype=q.dtype)[0])
    return torch.cat(outs, dim=1).reshape(b, s, n, d).to(out_dtype)

