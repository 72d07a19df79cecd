"""``get_quant_config(name, **options)``: the quantization methods by name."""
from __future__ import annotations

from typing import Any

from mxdit.quant.base import QuantConfig
from mxdit.quant.modelslim import ModelSlimConfig
from mxdit.quant.online import OnlineQuantConfig
from mxdit.quant.schemes import MODELSLIM, ONLINE_ALIASES, available_quant_methods, canonical_name, online_methods

#: canonical names (the online schemes' names, then "modelslim"); aliases: ALIASES
#: ("mxfp4_npu" is SGLang's name for the dual-level scheme).  All from mxdit.quant.schemes.
QUANT_METHODS = (*online_methods(), MODELSLIM)
ALIASES = ONLINE_ALIASES
__all__ = ["QUANT_METHODS", "ALIASES", "available_quant_methods", "canonical_name", "get_quant_config"]


def get_quant_config(name: str, **options: Any) -> QuantConfig:
    """Build a QuantConfig.

    Online ("mxfp8", "mxfp4", "mxfp4_dual"/"mxfp4_npu", "fp8") options: include,
    ignore, act_round_mode, scale_mode, backend (see OnlineQuantConfig).
    "modelslim" options: description (dict) or path (export directory), and
    name_map, ignore, act_round_mode, smooth_in_quant, backend (see ModelSlimConfig).
    """
    n = canonical_name(name)
    if n == MODELSLIM:
        path = options.pop("path", None)
        desc = options.pop("description", None)
        if (path is None) == (desc is None):
            raise ValueError("get_quant_config('modelslim'): pass exactly one of path= (export directory) or description= (dict)")
        return ModelSlimConfig.from_dir(path, **options) if path is not None else ModelSlimConfig(desc, **options)
    return OnlineQuantConfig(n, **options)
