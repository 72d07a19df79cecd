"""Linear methods: online MXFP8 / MXFP4 / dual-level MXFP4 / FP8, and the
msmodelslim offline schemes (W8A8_MXFP8, W4A4_MXFP4, W4A4_MXFP4_DUALSCALE,
W8A8, W8A8_DYNAMIC, W4A4_DYNAMIC).

Storage: each scheme's checkpoint tensors (names, dtypes, shapes) are its record in
:mod:`mxdit.quant.schemes`; ``create_weights`` registers exactly those (online methods: the float
weight, quantized after loading into the same tensors, so an online-quantized layer looks like a
repacked pre-quantized one).

Activations are quantized per token at run time: the input is flattened to
2-D [M, K] (as the NPU ops require), cast to bf16 unless it is bf16/fp16 (the
NPU kernels take bf16/fp16 only; SGLang does the same), and the output comes
back in the input's dtype with its leading shape.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mxdit import formats as F
from mxdit.formats.chunks import row_chunks, rows_per_chunk
from mxdit.kernels import KernelBackend, ops, quantize_fp8_per_token, select_backend
from mxdit.quant.base import LinearMethod, set_weight_attrs

_ACT_DTYPES = (torch.bfloat16, torch.float16)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _empty(shape, dtype, device) -> nn.Parameter:
    return _param(torch.empty(*shape, dtype=dtype, device=device))


class QuantizedLinearMethod(LinearMethod):
    """Shared machinery: fp32 bias, smoothing, kernel backend, 2-D activations."""

    def __init__(self, scheme, *, online: bool = False, smoothed: bool = False, act_round_mode: str = "rint",
                 backend: Optional[str] = None, smooth_in_quant: bool = False):
        F.elements.check_round_mode(act_round_mode)
        #: the scheme's record (:class:`mxdit.quant.schemes.Scheme`): names, tensors, K multiple
        self.scheme, self.online, self.smoothed = scheme, online, smoothed
        self.act_round_mode, self.backend_name, self.smooth_in_quant = act_round_mode, backend, smooth_in_quant
        self.name = scheme.name if online or not scheme.online else scheme.online + "(modelslim)"

    @property
    def k_multiple(self) -> int:
        """K must be a multiple of this for the scheme"""
        return self.scheme.k_multiple

    def create_weights(self, layer, in_features, out_features, bias, params_dtype, device):
        """Online: the checkpoint's float weight as it is.  Offline: the record's tensors."""
        self.check_shape(layer, in_features)
        if self.online:
            self.create_online_weights(layer, in_features, out_features, bias, params_dtype, device)
            return
        for suffix, spec in self.scheme.tensors.items():
            p = _empty(spec.shape_for(out_features, in_features), spec.dtype, device)
            set_weight_attrs(p, weight_loader=spec.load)
            if spec.missing_init is not None:
                set_weight_attrs(p, missing_init=spec.missing_init)
            setattr(layer, suffix, p)
        self.create_bias(layer, out_features, bias, device)
        if self.smoothed:
            self.create_mul_scale(layer, in_features, device)

    # -- creation helpers ---------------------------------------------------
    def check_shape(self, layer: nn.Module, in_features: int) -> None:
        if in_features % self.k_multiple:
            raise ValueError(
                f"layer '{getattr(layer, 'prefix', '?')}': {self.name} needs in_features (K) to be a multiple of "
                f"{self.k_multiple}, got {in_features}; leave the layer unquantized with ignore=['{getattr(layer, 'prefix', '?')}'] "
                f"(command line: --quantization-ignored-layers '{getattr(layer, 'prefix', '?')}')"
            )

    def create_bias(self, layer, out_features, bias, device, dtype=torch.float32) -> None:
        if bias:
            layer.bias = _empty((out_features,), dtype, device)
        else:
            layer.register_parameter("bias", None)

    def create_mul_scale(self, layer, in_features, device) -> None:
        p = _empty((in_features,), torch.float32, device)
        set_weight_attrs(p, missing_init="ones")  # a missing mul_scale means ones (no smoothing)
        layer.mul_scale = p

    # -- load-time ----------------------------------------------------------
    def finish_common(self, layer: nn.Module) -> None:
        if layer.bias is not None and layer.bias.dtype != torch.float32:
            layer.bias = _param(layer.bias.data.to(torch.float32))
        ms = getattr(layer, "mul_scale", None)
        # decided once, here, never per forward
        layer.use_mul_scale = ms is not None and not bool((ms.data == 1).all())
        layer._kernel_device = None

    def create_online_weights(self, layer, in_features, out_features, bias, params_dtype, device) -> None:
        """Online methods load the checkpoint's float weight as it is."""
        layer.weight = _empty((out_features, in_features), params_dtype, device)
        self.create_bias(layer, out_features, bias, device, params_dtype)

    @staticmethod
    def quantize_rows(fn, w: torch.Tensor):
        """Apply a row-wise quantizer ``fn`` to ``w`` chunk by chunk of rows, writing each
        result into preallocated outputs: blocks run along K, so rows are independent and
        the result is identical, while the temporaries stay those of one chunk (about 7x
        a chunk's bf16 bytes) instead of 7x the whole weight."""
        n = w.shape[0]
        rows = rows_per_chunk(w.shape[-1])
        first = fn(w[:rows])
        if n <= rows:
            return first
        is_tuple = isinstance(first, tuple)
        fields = dict(enumerate(first)) if is_tuple else dict(vars(first))
        out = {k: (torch.empty((n, *v.shape[1:]), dtype=v.dtype, device=v.device) if isinstance(v, torch.Tensor) else v)
               for k, v in fields.items()}
        for i, i1 in row_chunks(n, w.shape[-1]):
            part = first if i == 0 else fn(w[i:i1])
            vals = dict(enumerate(part)) if is_tuple else vars(part)
            for k, v in vals.items():
                if isinstance(v, torch.Tensor):
                    out[k][i : i + v.shape[0]] = v
            del part, vals
        return tuple(out[k] for k in sorted(out)) if is_tuple else type(first)(**out)

    def weight_to_quantize(self, layer: nn.Module) -> tuple[torch.Tensor, KernelBackend]:
        """The loaded float weight, checked finite and in bf16/fp16 (what the NPU quant ops take,
        as SGLang casts), and the backend that quantizes it on its device."""
        w = layer.weight.data
        check_finite(layer, w)
        if w.dtype not in _ACT_DTYPES:
            w = w.to(torch.bfloat16)
        return w, select_backend(w.device, self.backend_name)

    def backend(self, layer: nn.Module) -> KernelBackend:
        dev = layer.weight.device
        if getattr(layer, "_kernel_device", None) != dev:
            layer._kernel = select_backend(dev, self.backend_name)
            layer._kernel_weight = self.prepare(layer, layer._kernel)
            layer._kernel_device = dev
        return layer._kernel

    def prepare(self, layer: nn.Module, kernel: KernelBackend):
        raise NotImplementedError

    # -- forward ------------------------------------------------------------
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque custom op for torch.compile (mxdit.kernels.ops)
            return ops.quant_linear(x, layer.weight, x.dtype)
        kernel = self.backend(layer)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        if x2d.dtype not in _ACT_DTYPES:
            x2d = x2d.to(torch.bfloat16)
        smooth = layer.mul_scale if getattr(layer, "use_mul_scale", False) else None
        out = self.forward_2d(layer, kernel, x2d, smooth, x.dtype)
        return out.reshape(*lead, out.shape[-1])

    def forward_2d(self, layer, kernel, x2d, smooth, out_dtype) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self, layer) -> str:
        return self.name + (", smoothed" if getattr(layer, "use_mul_scale", False) else "")


class MXLinearMethod(QuantizedLinearMethod):
    """W8A8 MXFP8 or W4A4 single-level MXFP4 (the scheme record's fmt: fp8_e4m3 / fp4_e2m1).

    online=True: BF16 weights are loaded and quantized once at load (floor
    scales and rint by default, as ``npu_dynamic_mx_quant``); online=False:
    msmodelslim storage is loaded as is (FP4 weights in either container).
    """

    def __init__(self, scheme, *, scale_mode: str = "floor", weight_round_mode: str = "rint", **kw):
        super().__init__(scheme, **kw)
        self.fmt = F.get_format(scheme.fmt).name
        self.scale_mode = scale_mode
        self.weight_round_mode = weight_round_mode

    def process_weights_after_loading(self, layer):
        if self.online:
            w, kernel = self.weight_to_quantize(layer)
            q = self.quantize_rows(
                lambda c: kernel.quantize_mx(c, self.fmt, scale_mode=self.scale_mode, round_mode=self.weight_round_mode), w
            )
            layer.weight = _param(q.qdata)
            layer.weight_scale = _param(q.scale)
        self.finish_common(layer)

    def prepare(self, layer, kernel):
        return kernel.prepare_mx_weight(F.MXTensor(layer.weight.data, layer.weight_scale.data, self.fmt, self.scheme.block))

    def forward_2d(self, layer, kernel, x2d, smooth, out_dtype):
        return kernel.mx_linear(
            x2d, layer._kernel_weight, layer.bias, act_fmt=self.fmt, scale_mode="floor",
            round_mode=self.act_round_mode, smooth_scale=smooth, out_dtype=out_dtype,
        )


class DualMXLinearMethod(QuantizedLinearMethod):
    """W4A4 dual-level MXFP4 (Ascend A5 ``npu_dual_level_quant_matmul``)."""

    def process_weights_after_loading(self, layer):
        if self.online:
            w, kernel = self.weight_to_quantize(layer)
            q = self.quantize_rows(lambda c: kernel.quantize_mx_dual(c, round_mode="rint"), w)
            layer.weight = _param(q.qdata)
            layer.weight_scale = _param(_zero_flushed_weight_blocks(q.scale_l0, q.scale_l1))
            layer.weight_dual_scale = _param(q.scale_l0)
        self.finish_common(layer)

    def prepare(self, layer, kernel):
        w = F.DualMXTensor(layer.weight.data, layer.weight_dual_scale.data, layer.weight_scale.data)
        return kernel.prepare_dual_weight(w)

    def forward_2d(self, layer, kernel, x2d, smooth, out_dtype):
        return kernel.dual_linear(
            x2d, layer._kernel_weight, layer.bias, round_mode=self.act_round_mode,
            smooth_scale=smooth, out_dtype=out_dtype, smooth_in_quant=self.smooth_in_quant,
        )


class FP8LinearMethod(QuantizedLinearMethod):
    """Online FP8 E4M3: per-output-channel weight scales, per-token dynamic activation scales."""

    def create_weights(self, layer, in_features, out_features, bias, params_dtype, device):
        self.create_online_weights(layer, in_features, out_features, bias, params_dtype, device)

    def process_weights_after_loading(self, layer):
        w = layer.weight.data
        check_finite(layer, w)
        q, s = self.quantize_rows(quantize_fp8_per_token, w)
        layer.weight = _param(q)
        layer.weight_scale = _param(s.reshape(-1))
        self.finish_common(layer)

    def prepare(self, layer, kernel):
        return kernel.prepare_fp8_weight(layer.weight.data, layer.weight_scale.data)

    def forward_2d(self, layer, kernel, x2d, smooth, out_dtype):
        return kernel.fp8_linear(x2d, layer._kernel_weight, layer.bias, out_dtype=out_dtype)


class Int8LinearMethod(QuantizedLinearMethod):
    """msmodelslim W8A8 (static) and W8A8_DYNAMIC (ascend-npu-mx.md §2.5, §3.2).

    Static: y = (x_q W_q^T + quant_bias) * deq_scale, with the float bias already
    folded into quant_bias by msmodelslim (the stored bias tensor is loaded and
    not added).  Dynamic: y = (x_q W_q^T) * x_scale * weight_scale + bias.
    """

    def __init__(self, scheme, *, dynamic: bool, **kw):
        super().__init__(scheme, **kw)
        self.dynamic = dynamic

    def process_weights_after_loading(self, layer):
        if self.dynamic and getattr(layer, "weight_offset", None) is not None:
            if bool((layer.weight_offset.data != 0).any()):
                raise ValueError(
                    f"layer '{layer.prefix}': W8A8_DYNAMIC with a non-zero weight_offset (asymmetric weights) is not supported"
                )
        self.finish_common(layer)

    def prepare(self, layer, kernel):
        return kernel.prepare_int8_weight(layer.weight.data)

    def forward_2d(self, layer, kernel, x2d, smooth, out_dtype):
        if self.dynamic:
            return kernel.int8_linear(
                x2d, layer._kernel_weight, layer.bias, weight_scale=layer.weight_scale.data,
                smooth_scale=smooth, out_dtype=out_dtype,
            )
        # msmodelslim folds the float bias into quant_bias (quant_bias = round(bias / deq_scale
        # - sum_k W_q * input_offset)); the stored FLOAT bias is not added again (as vllm-ascend).
        return kernel.int8_linear(
            x2d, layer._kernel_weight, None, input_scale=layer.input_scale.data,
            input_offset=layer.input_offset.data, quant_bias=layer.quant_bias.data,
            deq_scale=layer.deq_scale.data, smooth_scale=smooth, out_dtype=out_dtype,
        )


class Int4LinearMethod(QuantizedLinearMethod):
    """msmodelslim W4A4_DYNAMIC (mx-attention.md §5; ascend-npu-mx.md §3.2).

    Weights: int4 per output channel, stored one value per int8 byte [N, K], with
    fp32 ``weight_scale`` / ``weight_offset`` [N, 1].  Activations: int4 per token,
    quantized at run time (:func:`mxdit.kernels.base.quantize_int4_per_token`).
    y = (x_q W_q^T) * x_scale * weight_scale + bias.  msmodelslim can write asymmetric
    weights (non-zero weight_offset); SGLang ignores the offset (and would compute
    wrong outputs), mxdit refuses such a layer with a clear error instead.
    """

    def process_weights_after_loading(self, layer):
        off = getattr(layer, "weight_offset", None)
        if off is not None and bool((off.data != 0).any()):
            raise ValueError(
                f"layer '{layer.prefix}': W4A4_DYNAMIC with a non-zero weight_offset (asymmetric int4 weights) "
                f"is not supported; export symmetric weights"
            )
        self.finish_common(layer)

    def prepare(self, layer, kernel):
        return kernel.prepare_int4_weight(layer.weight.data)

    def forward_2d(self, layer, kernel, x2d, smooth, out_dtype):
        return kernel.int4_linear(
            x2d, layer._kernel_weight, layer.bias, weight_scale=layer.weight_scale.data,
            smooth_scale=smooth, out_dtype=out_dtype,
        )


def _zero_flushed_weight_blocks(l0: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
    """A weight 512-block whose L0 flushes to 0 (amax/6 < 2^-126, ascend-npu-mx.md §1.2 step 2)
    gets the op's rule for an all-zero block (L1 byte 0, outputs 0: step 4, E = 0) instead of
    the NaN L1 that x/0 would give it: the block dequantizes to exactly 0 (its true values
    are below 7e-38), so a tiny weight row is a zero output column, not a NaN one.  The codes
    of such a block are already 0 (dual.py writes 0 for 0xFF blocks)."""
    flushed = l0 == 0
    if not bool(flushed.any()):
        return l1
    per = l1.shape[-1] // l0.shape[-1]  # 16 L1 blocks per L0 block
    return l1.masked_fill(flushed.repeat_interleave(per, dim=-1), 0)


def check_finite(layer: nn.Module, w: torch.Tensor) -> None:
    """Raise naming the layer if ``w`` holds Inf or NaN (checked in row chunks: no full-size mask)."""
    if not w.is_floating_point():
        return
    for i, i1 in row_chunks(w.shape[0], w.shape[-1] if w.dim() > 1 else w.shape[0]):
        if not bool(torch.isfinite(w[i:i1]).all()):
            bad = ~torch.isfinite(w)
            idx = tuple(int(j) for j in bad.nonzero()[0])
            raise ValueError(
                f"layer '{getattr(layer, 'prefix', '?')}': weight has {int(bad.sum())} non-finite values "
                f"(first at {idx}: {float(w[idx])}); online quantization needs finite weights"
            )
