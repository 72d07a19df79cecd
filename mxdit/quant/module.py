"""``quantize_module``: online-quantize the nn.Linear layers of any torch module in place."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mxdit.layers.linear import QuantLinear
from mxdit.quant.registry import get_quant_config


def _quantized_nbytes(layer: nn.Module) -> int:
    """Bytes of the weight and its scales (bias and mul_scale excluded)."""
    names = ("weight", "weight_scale", "weight_dual_scale", "weight_offset", "deq_scale", "quant_bias")
    return sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for n in names if getattr(layer, n, None) is not None)


@dataclass
class QuantizeSummary:
    method: str
    layers: list[str] = field(default_factory=list)  # quantized
    skipped: list[str] = field(default_factory=list)  # linear layers left in float
    weight_elements: int = 0
    bytes_before: int = 0  # weights of the quantized layers, before
    bytes_after: int = 0  # weights + scales of the quantized layers, after

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_after / max(self.weight_elements, 1)

    def __str__(self) -> str:
        return (
            f"{self.method}: {len(self.layers)} linear layers quantized, {len(self.skipped)} left in float; "
            f"weights {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
            f"({self.bits_per_weight:.3f} bits per weight)"
        )


def quantize_module(module: nn.Module, method: str, **options: Any) -> QuantizeSummary:
    """Replace every selected ``nn.Linear`` of ``module`` with a quantized QuantLinear.

    Works on any module (a diffusers ``WanTransformer3DModel``, mxdit's own
    model, a single block).  The layers' existing parameters are moved into the
    QuantLinear (no copy) and quantized at once, so peak memory grows by one
    layer.  ``options`` are those of :func:`get_quant_config` (include,
    ignore, act_round_mode, scale_mode, backend).  Returns a summary.
    """
    config = get_quant_config(method, **options)
    summary = QuantizeSummary(method=config.name)
    targets = [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    for name, lin in targets:
        if isinstance(lin, QuantLinear) and lin.quant_method.name != "unquantized":
            continue  # already quantized
        if config.get_quant_method(lin, name) is None:
            summary.skipped.append(name)
            continue
        w, b = lin.weight, lin.bias
        ql = QuantLinear(lin.in_features, lin.out_features, bias=b is not None, quant_config=config,
                         prefix=name, params_dtype=w.dtype, device="meta")
        ql.weight = nn.Parameter(w.data, requires_grad=False)
        if b is not None:
            ql.bias = nn.Parameter(b.data, requires_grad=False)
        before = w.numel() * w.element_size()
        ql.process_weights_after_loading()
        summary.layers.append(name)
        summary.weight_elements += w.numel()
        summary.bytes_before += before
        summary.bytes_after += _quantized_nbytes(ql)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, ql)
    return summary
