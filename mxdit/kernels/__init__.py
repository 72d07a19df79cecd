"""Kernel backends behind one interface (see :mod:`mxdit.kernels.base`).

Selection: an explicit name (quant option ``backend=`` or the environment
variable ``MXDIT_KERNEL_BACKEND``) wins; otherwise the weights' device decides:
``npu`` -> the torch_npu backend, ``cuda`` -> Triton when it is importable
and the GPU has FP8 tensor cores (capability >= 8.9), anything else -> the
reference backend.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from mxdit.kernels.base import (
    KernelBackend,
    quantize_fp8_per_token,
    quantize_int8_per_token,
    quantize_int4_per_token,
    quantize_int8_static,
)
from mxdit.kernels.reference import ReferenceBackend

# name -> "module:Class", imported on first use so optional dependencies stay optional
_BACKENDS: dict[str, str] = {
    "reference": "mxdit.kernels.reference:ReferenceBackend",
    "npu": "mxdit.kernels.npu:NPUBackend",
    "triton": "mxdit.kernels.triton:TritonBackend",
}
_INSTANCES: dict[str, KernelBackend] = {}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def register_backend(name: str, target: str) -> None:
    """Register ``name`` -> ``"package.module:Class"`` (a KernelBackend subclass)."""
    _BACKENDS[name] = target
    _INSTANCES.pop(name, None)


def get_backend(name: str) -> KernelBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {available_backends()}")
    if name not in _INSTANCES:
        mod, cls = _BACKENDS[name].split(":")
        _INSTANCES[name] = getattr(importlib.import_module(mod), cls)()
    return _INSTANCES[name]


def default_device() -> str:
    """The first accelerator present ("cuda", then "npu" when torch_npu is installed), else "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError:
        pass
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return "npu"
    return "cpu"


def select_backend(device: torch.device | str, override: Optional[str] = None) -> KernelBackend:
    name = override or os.environ.get("MXDIT_KERNEL_BACKEND") or None
    if name:
        return get_backend(name)
    dev = torch.device(device)
    if dev.type == "npu":
        return get_backend("npu")
    if dev.type == "cuda" and "triton" in _BACKENDS:
        cap = torch.cuda.get_device_capability(dev)
        if cap < TRITON_MIN_CAPABILITY:
            _warn_once(f"cuda capability {cap[0]}.{cap[1]} has no FP8 tensor cores (needs >= 8.9): "
                       "MX layers use the reference backend (correct, not fast)")
        else:
            try:
                return get_backend("triton")
            except ImportError:
                _warn_once("triton is not installed: MX layers on CUDA use the reference backend (pip install triton)")
    return get_backend("reference")


#: the Triton kernels run FP8 tensor-core dots: Ada (8.9), Hopper (9.0), Blackwell (10.x)
TRITON_MIN_CAPABILITY = (8, 9)
_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        import warnings

        warnings.warn(msg, RuntimeWarning, stacklevel=3)


__all__ = [
    "KernelBackend", "ReferenceBackend", "available_backends", "default_device", "register_backend", "get_backend", "select_backend",
    "quantize_fp8_per_token", "quantize_int8_per_token", "quantize_int4_per_token", "quantize_int8_static",
]
