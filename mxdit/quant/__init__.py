"""Quantization: the scheme records (:mod:`mxdit.quant.schemes`), the QuantConfig / LinearMethod
interface, online methods, msmodelslim dispatch and the registry (``quantize_module`` lives in
:mod:`mxdit.layers.quantize`, the layer that owns QuantLinear; ``mxdit.quantize_module`` is the public name)."""
from mxdit.quant.base import LinearMethod, QuantConfig, UnquantizedLinearMethod, default_weight_loader, get_weight_loader
from mxdit.quant.methods import DualMXLinearMethod, FP8LinearMethod, Int8LinearMethod, MXLinearMethod
from mxdit.quant.modelslim import ModelSlimConfig, find_description_file, find_weight_files, strip_modelslim_wrappers
from mxdit.quant.online import OnlineQuantConfig
from mxdit.quant.registry import QUANT_METHODS, available_quant_methods, canonical_name, get_quant_config
from mxdit.quant.schemes import SCHEMES, Scheme, TensorSpec

__all__ = [
    "LinearMethod", "QuantConfig", "UnquantizedLinearMethod", "default_weight_loader", "get_weight_loader",
    "MXLinearMethod", "DualMXLinearMethod", "FP8LinearMethod", "Int8LinearMethod",
    "ModelSlimConfig", "OnlineQuantConfig", "find_description_file", "find_weight_files", "strip_modelslim_wrappers",
    "QUANT_METHODS", "available_quant_methods", "canonical_name", "get_quant_config",
    "SCHEMES", "Scheme", "TensorSpec",
]

