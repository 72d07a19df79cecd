"""mxdit's kernels as ``torch.library`` custom ops, so ``torch.compile`` sees each one as a single
opaque node (with a fake / meta implementation for shapes) instead of graph-breaking on it.

Ops (namespace ``mxdit``):

``mxdit::quant_linear(x, weight, out_dtype) -> Tensor``
    The quantized linear of the layer that owns ``weight``: activation quantization, the
    quantized matmul, bias, in the layer's own eager code on its kernel backend (reference,
    Triton, NPU) with the weights it prepared once.  ``weight`` is a graph input, so one
    compiled graph serves every block of the model (regional compilation); the op finds its
    layer from the weight tensor (:func:`register_linear`).  Fake: ``[*x.shape[:-1], N]``.
``mxdit::quantize_mx(x, fmt, scale_mode, round_mode) -> (qdata, scale)``
``mxdit::quantize_mx_dual(x, round_mode) -> (qdata, scale_l0, scale_l1)``
    Activation quantization on the tensor's backend (the layouts of :mod:`mxdit.formats`).
``mxdit::quantized_attention(q, k, v, mode) -> Tensor``
    Quantized self-attention (``mode`` "mxfp8" or "fp8_block") on the tensors' backend.

Eager calls go through the same ops (a dispatcher hop, nothing else), so compiled and eager
runs execute the same kernel code.  The fake implementations are checked against the real
ones by ``torch.library.opcheck`` in the tests.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch

from mxdit import formats as F

__all__ = ["register_linear", "register_quantized_linears", "quant_linear", "quantize_mx", "quantize_mx_dual", "quantized_attention"]

# ----------------------------------------------------------------------------- linear
#: id(weight) -> (weakref to the weight, weakref to the eager runner's owner, runner)
_LINEARS: dict[int, tuple[weakref.ref, Callable[[torch.Tensor], torch.Tensor]]] = {}


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, tuple(t.shape), t.data_ptr())


def register_linear(weight: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make ``mxdit::quant_linear(x, weight, ...)`` run ``run(x)`` (the owning layer's eager forward).

    Found by the weight tensor's identity, or else by its storage (another Python wrapper of the
    same memory, e.g. ``weight.detach()``, as a tracer may pass).  The entry goes away with
    ``weight`` (a weak reference)."""
    key = id(weight)

    def _drop(_ref, key=key):
        entry = _LINEARS.get(key)
        if entry is not None and entry[0] is _ref:
            del _LINEARS[key]

    _LINEARS[key] = (weakref.ref(weight, _drop), run)
    _BY_STORAGE[_storage_key(weight)] = key


#: storage key -> id(weight) (second way in; validated against the live weight)
_BY_STORAGE: dict[tuple, int] = {}


def register_quantized_linears(module: torch.nn.Module) -> int:
    """Register every quantized linear of ``module`` (a submodule with a ``quant_method`` whose
    name is not "unquantized" and a ``weight``) for ``mxdit::quant_linear``; returns how many.
    The layers are held weakly: registering never keeps a model alive."""
    n = 0
    for m in module.modules():
        method = getattr(m, "quant_method", None)
        weight = getattr(m, "weight", None)
        if method is None or getattr(method, "name", "unquantized") == "unquantized" or weight is None:
            continue
        ref = weakref.ref(m)

        def run(x, ref=ref):
            layer = ref()
            if layer is None:
                raise RuntimeError("mxdit::quant_linear: the layer owning this weight was deleted")
            return layer.quant_method.apply(layer, x)

        register_linear(weight, run)
        n += 1
    return n


def _runner(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    entry = _LINEARS.get(id(weight))
    if entry is None or entry[0]() is not weight:
        entry = _LINEARS.get(_BY_STORAGE.get(_storage_key(weight), -1))
        live = entry[0]() if entry is not None else None
        if live is None or _storage_key(live) != _storage_key(weight):
            raise RuntimeError(
                f"mxdit::quant_linear: no quantized layer is registered for this weight {tuple(weight.shape)} "
                f"{weight.dtype} (a layer's weight was replaced after it was prepared for torch.compile; "
                "call mxdit.kernels.ops.register_quantized_linears(model) again)")
    return entry[1]


@torch.library.custom_op("mxdit::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    out = _runner(weight)(x)
    if out.dtype != out_dtype:
        raise RuntimeError(f"mxdit::quant_linear: the layer returned {out.dtype}, expected {out_dtype}")
    return out


@quant_linear.register_fake
def _(x, weight, out_dtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


# ----------------------------------------------------------------------------- activations
def _backend(device: torch.device, name: Optional[str]):
    from mxdit.kernels import get_backend, select_backend

    return get_backend(name) if name else select_backend(device)


@torch.library.custom_op("mxdit::quantize_mx", mutates_args=())
def quantize_mx(x: torch.Tensor, fmt: str, scale_mode: str = "floor", round_mode: str = "rint",
                backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    q = _backend(x.device, backend).quantize_mx(x, fmt, scale_mode=scale_mode, round_mode=round_mode)
    return q.qdata, q.scale


@quantize_mx.register_fake
def _(x, fmt, scale_mode="floor", round_mode="rint", backend=None):
    f = F.get_format(fmt)
    k = x.shape[-1]
    if f.name == "fp4_e2m1":
        qdata = x.new_empty((*x.shape[:-1], k // 2), dtype=torch.uint8)
    else:
        qdata = x.new_empty(x.shape, dtype=f.torch_dtype)
    return qdata, x.new_empty((*x.shape[:-1], k // 32), dtype=torch.uint8)


@torch.library.custom_op("mxdit::quantize_mx_dual", mutates_args=())
def quantize_mx_dual(x: torch.Tensor, round_mode: str = "rint",
                     backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = _backend(x.device, backend).quantize_mx_dual(x, round_mode=round_mode)
    return q.qdata, q.scale_l0, q.scale_l1


@quantize_mx_dual.register_fake
def _(x, round_mode="rint", backend=None):
    lead, k = x.shape[:-1], x.shape[-1]
    return (x.new_empty((*lead, k // 2), dtype=torch.uint8),
            x.new_empty((*lead, k // F.L0_BLOCK), dtype=torch.float32),
            x.new_empty((*lead, k // 32), dtype=torch.uint8))


# ----------------------------------------------------------------------------- attention
@torch.library.custom_op("mxdit::quantized_attention", mutates_args=())
def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str,
                        backend: Optional[str] = None) -> torch.Tensor:
    return _backend(q.device, backend).quantized_attention(q, k, v, mode=mode).contiguous()


@quantized_attention.register_fake
def _(q, k, v, mode, backend=None):
    return q.new_empty(q.shape)  # the real op returns a contiguous [B, Lq, H, D]
