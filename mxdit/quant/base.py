"""The quantization interface, in the vLLM / SGLang shape.

A :class:`QuantConfig` decides, per layer, which :class:`LinearMethod` a
:class:`~mxdit.layers.linear.QuantLinear` uses.  The method owns the layer's
parameters:

* ``create_weights`` registers the parameters *in the storage the checkpoint
  holds* (BF16 for online methods, the quantized tensors for pre-quantized
  checkpoints), so a loader can stream tensors straight into them and no BF16
  copy of a pre-quantized model is ever materialised.
* ``process_weights_after_loading`` runs once, after the layer's tensors are
  loaded: online methods quantize here, offline methods convert layouts.
* ``apply`` computes ``y = x W^T + b`` with the method's numerics.

Parameters may carry a ``weight_loader(param, tensor) -> Tensor`` attribute:
the loader calls it to turn a checkpoint tensor into the parameter's storage
(e.g. an FP4 weight held as float8 values becomes packed nibbles).  Without
one, :func:`default_weight_loader` applies: shapes must match exactly and the
tensor is cast to the parameter dtype only between floating types.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import torch
from torch import nn


class LinearMethod(ABC):
    """How one linear layer stores its weights and computes its output."""

    #: short name used in summaries and errors, e.g. "mxfp8"
    name: str = "unquantized"

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        in_features: int,
        out_features: int,
        bias: bool,
        params_dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        """Register the layer's parameters (possibly on the meta device)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Convert loaded tensors into their compute form (quantize, re-layout)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Return the layer output for input ``x`` of shape [..., in_features]."""

    def extra_repr(self, layer: nn.Module) -> str:
        return self.name


class QuantConfig(ABC):
    """A quantization scheme for a whole model: picks a method per layer."""

    #: registry name, e.g. "mxfp8"
    name: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantConfig":
        """Build from a config dict (a checkpoint's description or options)."""
        return cls(**config)

    @staticmethod
    def get_config_filenames() -> list[str]:
        """Files in a checkpoint directory that describe this scheme."""
        return []

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> Optional[LinearMethod]:
        """The method for the layer named ``prefix``; None means unquantized."""


def set_weight_attrs(param: torch.Tensor, **attrs: Any) -> None:
    for k, v in attrs.items():
        setattr(param, k, v)


def default_weight_loader(param: torch.Tensor, tensor: torch.Tensor, *, name: str = "?") -> torch.Tensor:
    """Check ``tensor`` against ``param`` and return it in the parameter's dtype.

    Floating tensors may be cast between floating dtypes (a checkpoint's fp32
    bias into a bf16 parameter); integer and float8 storage must match exactly.
    """
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(
            f"tensor '{name}': shape {tuple(tensor.shape)} does not match the expected {tuple(param.shape)}"
        )
    if tensor.dtype != param.dtype:
        exact = {torch.uint8, torch.int8, torch.int32, torch.int64, torch.float8_e4m3fn, torch.float8_e5m2}
        if tensor.dtype in exact or param.dtype in exact:
            raise ValueError(
                f"tensor '{name}': dtype {tensor.dtype} does not match the expected {param.dtype}"
            )
        tensor = tensor.to(param.dtype)
    return tensor


def get_weight_loader(param: torch.Tensor) -> Callable[..., torch.Tensor]:
    return getattr(param, "weight_loader", default_weight_loader)


class UnquantizedLinearMethod(LinearMethod):
    """Plain ``F.linear`` in the parameters' dtype."""

    name = "unquantized"

    def create_weights(self, layer, in_features, out_features, bias, params_dtype, device):
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=params_dtype, device=device), requires_grad=False
        )
        if bias:
            layer.bias = nn.Parameter(torch.empty(out_features, dtype=params_dtype, device=device), requires_grad=False)
        else:
            layer.register_parameter("bias", None)

    def apply(self, layer, x):
        w = layer.weight
        b = layer.bias
        if x.dtype != w.dtype:
            x = x.to(w.dtype)
        return torch.nn.functional.linear(x, w, None if b is None else b.to(w.dtype))
