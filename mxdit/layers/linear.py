"""QuantLinear: a linear layer whose storage and numerics come from a LinearMethod."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mxdit.quant.base import LinearMethod, QuantConfig, UnquantizedLinearMethod


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with weights stored as the layer's method decides.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        quant_config: the model's :class:`QuantConfig`; None means unquantized.
        prefix: the layer's full name in the model (``blocks.0.attn1.to_q``);
            quant configs dispatch on it and errors name it.
        params_dtype: dtype of floating parameters (default: torch's default dtype).
        device: where parameters are created; ``"meta"`` for streamed loading.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_config: Optional[QuantConfig] = None,
        prefix: str = "",
        params_dtype: Optional[torch.dtype] = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.prefix = prefix
        self.params_dtype = params_dtype or torch.get_default_dtype()
        method: Optional[LinearMethod] = None
        if quant_config is not None:
            method = quant_config.get_quant_method(self, prefix)
        self.quant_method: LinearMethod = method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, out_features, bias, self.params_dtype, device)
        self._processed = False

    def process_weights_after_loading(self) -> None:
        """Idempotent: the loader (or quantize_module) calls it once tensors are in."""
        if not self._processed:
            self.quant_method.process_weights_after_loading(self)
            self._processed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0:
            raise ValueError(f"layer '{self.prefix}': input is a 0-d tensor; expected [..., {self.in_features}]")
        if not x.is_floating_point():
            raise TypeError(f"layer '{self.prefix}': input dtype {x.dtype} is not a floating-point type "
                            "(expected bfloat16, float16 or float32)")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"layer '{self.prefix}': input has {x.shape[-1]} features, expected {self.in_features}"
            )
        y = self.quant_method.apply(self, x)
        lora = self.__dict__.get("lora")  # mxdit.layers.lora: an unmerged low-rank branch, outside the method
        return y if lora is None else lora(x, y)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"method={self.quant_method.extra_repr(self)}, prefix='{self.prefix}'"
        )

    # ---- module casts and state dicts: quantized storage keeps its dtypes -----------------------
    @property
    def is_quantized(self) -> bool:
        return self.quant_method.name != "unquantized"

    def _drop_kernel_cache(self) -> None:
        """Forget the backend's prepared weight (re-prepared from the parameters on the next forward)."""
        self._kernel_device = None
        self.__dict__.pop("_kernel_weight", None)
        self.__dict__.pop("_kernel", None)

    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)`` / ``.half()`` / ``.bfloat16()`` / ``.float()`` keep a quantized layer's storage.

        torch's casts convert every floating tensor, float8 weights and float32 scales included
        (``pipe.to(torch.bfloat16)`` would turn an MXFP8 weight back into BF16, twice the memory, and
        round the fp32 L0 scales).  A quantized layer's tensors all have fixed dtypes — the weight and
        its scales, the float32 bias (added in fp32) and the float32 ``mul_scale`` — so here a cast
        changes only ``params_dtype``; outputs keep following the input's dtype.  Device moves
        (``.to(device)``, ``.cuda()``, ``.to_empty()``...) apply to every tensor.  An unquantized layer
        casts as ``nn.Linear`` does."""
        if self.quant_method.name == "unquantized":
            return super()._apply(fn, recurse)

        def keep_dtype(t):
            probe = fn(t.new_empty(0))  # what fn does to this dtype, without touching the data
            return fn(t) if probe.dtype == t.dtype else t.to(device=probe.device)

        cast = fn(torch.empty(0, dtype=self.params_dtype, device=self.weight.device))
        if cast.is_floating_point():
            self.params_dtype = cast.dtype
        self._drop_kernel_cache()
        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Quantized storage is loaded bit for bit: a tensor whose dtype differs from the parameter's is an
        error naming it (torch would cast a BF16 weight into a float8 parameter silently)."""
        if self.quant_method.name != "unquantized":
            for name, p in self._parameters.items():
                t = state_dict.get(prefix + name)
                if p is not None and isinstance(t, torch.Tensor) and t.dtype != p.dtype:
                    error_msgs.append(
                        f"layer '{self.prefix or prefix.rstrip('.')}' ({self.quant_method.name}): '{prefix + name}' is "
                        f"{t.dtype}, the quantized storage is {p.dtype}; load a state_dict of a model quantized the same way"
                    )
                    return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if self.quant_method.name != "unquantized" and self._processed:
            finish = getattr(self.quant_method, "finish_common", None)
            if finish is not None:
                finish(self)  # mul_scale use decided again, from the loaded tensor
            self._drop_kernel_cache()
