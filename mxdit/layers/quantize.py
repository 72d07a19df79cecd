"""``quantize_module``: online-quantize the linear layers of any torch module in place, and the one
table of what the online methods quantize by default (the loader uses it too).

Default scope: the Wan **block linears** (``blocks.*``: self- and cross-attention q/k/v/out and the
FFN), as msmodelslim's Wan adapters and ``load_transformer`` do.  Left in high precision by default
(:data:`HIGH_PRECISION`): the timestep and text embedders, the output head, the patch embedding and
every norm / modulation table.  Those are either tiny, run elementwise ops on their weights' dtype
(diffusers casts the timestep to ``time_embedder``'s first parameter dtype and runs SiLU on it: float8
there is ``"silu_cpu" not implemented for 'Float8_e4m3fn'``), or are not linears at all.
``include=`` / ``ignore=`` (glob patterns on layer names; ignore wins) select more or less, and
``quantize_proj_out=True`` adds ``proj_out`` (SGLang quantizes it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mxdit.layers.linear import QuantLinear
from mxdit.quant.registry import get_quant_config

#: layer-name patterns the online methods quantize by default: the Wan block linears
#: (ascend-npu-mx.md §3.5: msmodelslim's Wan adapters quantize exactly these)
DEFAULT_ONLINE_INCLUDE = ("blocks.*",)

#: what the default scope leaves in high precision (the model's dtype; float32 where diffusers keeps
#: float32), by module name (diffusers / mxdit names), and why
HIGH_PRECISION = {
    "patch_embedding": "Conv3d, not a linear",
    "condition_embedder.time_embedder": "timestep MLP; diffusers casts the timestep to its weight dtype and runs SiLU on it",
    "condition_embedder.time_proj": "timestep -> per-block modulation (6 x dim); errors here shift every block",
    "condition_embedder.text_embedder": "text projection (runs once per prompt)",
    "condition_embedder.image_embedder": "CLIP image projection (Wan2.1 I2V)",
    "proj_out": "output head (N = out_channels x patch volume, 64); quantize_proj_out=True quantizes it",
    "norm_out, blocks.*.norm*, *.norm_q / norm_k, scale_shift_table": "norms and modulation tables, not linears",
}


def online_scope(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the default scope applied: ``include`` defaults to
    :data:`DEFAULT_ONLINE_INCLUDE`; ``quantize_proj_out=True`` adds ``proj_out``."""
    opts = dict(options)
    if opts.pop("quantize_proj_out", False):
        opts["include"] = tuple(opts.get("include") or DEFAULT_ONLINE_INCLUDE) + ("proj_out",)
    if opts.get("include") is None:
        opts["include"] = DEFAULT_ONLINE_INCLUDE
    return opts


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
    """Replace the selected ``nn.Linear`` layers of ``module`` with quantized QuantLinears, in place.

    Works on any module (a diffusers ``WanTransformer3DModel`` — ``pipe.transformer`` —, mxdit's own
    model, a single block).  By default only the Wan block linears (``blocks.*``) are quantized, what is
    safe on a diffusers model (see :data:`HIGH_PRECISION` for what stays in float); pass
    ``include=["*"]`` for every linear of a module that is not a Wan transformer.  The layers' existing
    parameters are moved into the QuantLinear (no copy) and quantized at once, so peak memory grows by
    one layer.  ``options``: include, ignore, quantize_proj_out, act_round_mode, scale_mode, backend
    (see :class:`mxdit.quant.online.OnlineQuantConfig`).  Returns a summary; a scope that selects no
    linear layer at all is an error (it would silently quantize nothing).
    """
    opts = online_scope(options)
    config = get_quant_config(method, **opts)
    summary = QuantizeSummary(method=config.name)
    targets = [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    matched = 0
    for name, lin in targets:
        if isinstance(lin, QuantLinear) and lin.is_quantized:
            matched += config.selects(name)
            continue  # already quantized
        if config.get_quant_method(lin, name) is None:
            summary.skipped.append(name)
            continue
        matched += 1
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
    if not matched:
        shown = ", ".join(n for n, _ in targets[:5]) + (", ..." if len(targets) > 5 else "")
        raise ValueError(
            f"quantize_module({method!r}): include={list(config.include)} ignore={list(config.ignore)} selects none of the "
            f"module's {len(targets)} linear layers ({shown or 'none'}); the default scope is the Wan block linears "
            f"{list(DEFAULT_ONLINE_INCLUDE)} — pass include=['*'] to quantize every linear layer"
        )
    return summary
