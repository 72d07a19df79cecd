"""``get_quant_config(name, **options)``: the quantization methods by name."""
from __future__ import annotations

from typing import Any

from mxdit.quant.base import QuantConfig
from mxdit.quant.modelslim import ModelSlimConfig
from mxdit.quant.online import OnlineQuantConfig

#: canonical names; "mxfp4_npu" is SGLang's name for the dual-level scheme
QUANT_METHODS = ("mxfp8", "mxfp4", "mxfp4_dual", "fp8", "modelslim")
ALIASES = {"mxfp4_npu": "mxfp4_dual"}


def available_quant_methods() -> list[str]:
    return list(QUANT_METHODS) + sorted(ALIASES)


def canonical_name(name: str) -> str:
    n = ALIASES.get(name, name)
    if n not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {name!r}; valid: {available_quant_methods()}")
    return n


def get_quant_config(name: str, **options: Any) -> QuantConfig:
    """Build a QuantConfig.

    Online ("mxfp8", "mxfp4", "mxfp4_dual"/"mxfp4_npu", "fp8") options: include,
    ignore, act_round_mode, scale_mode, backend (see OnlineQuantConfig).
    "modelslim" options: description (dict) or path (export directory), and
    name_map, ignore, act_round_mode, smooth_in_quant, backend (see ModelSlimConfig).
    """
    n = canonical_name(name)
    if n == "modelslim":
        path = options.pop("path", None)
        desc = options.pop("description", None)
        if (path is None) == (desc is None):
            raise ValueError("get_quant_config('modelslim'): pass exactly one of path= (export directory) or description= (dict)")
        return ModelSlimConfig.from_dir(path, **options) if path is not None else ModelSlimConfig(desc, **options)
    return OnlineQuantConfig(n, **options)
