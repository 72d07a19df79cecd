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
