"""LoRA on any :class:`~mxdit.layers.linear.QuantLinear`, whatever its quantization.

Unmerged (SGLang's ``dynamic`` mode): the layer keeps its base weights untouched and adds a
low-rank branch after the base output::

    y = base(x) + sum_i scale_i * B_i(A_i(x))        (B_i with its optional bias: lora_B.bias / diff_b)

computed as peft's ``LoraLayer`` does (``x`` cast to A's dtype, ``lora_B(lora_A(x)) * scale``
added to the base output).  The branch sits *outside* the LinearMethod, so it works on every
method (MXFP8, MXFP4, dual-level MXFP4, FP8, msmodelslim schemes, unquantized) and every kernel
backend.  A layer holds any number of adapters by nickname; which of them run, and with which
scale, is a cheap per-layer switch (:func:`set_active`) -- no reload, no write to the base.

The LoRA tensors are plain attributes (not parameters or buffers): they are not part of the
model's ``state_dict`` and do not follow ``module.to()``; they are created on the layer's weight
device and moved (once, cached) if the input arrives elsewhere.

Merged: :func:`merge_into_float_weight` adds ``scale * B @ A`` (fp32 math) to a layer's float
weight -- used by the loader *before* online quantization (``process_weights_after_loading``),
so a merged LoRA costs nothing at run time and is quantized with the weight.  On an unquantized
layer after loading, :func:`merge_active` / :func:`unmerge` fold the active adapters in and
restore the exact saved base weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F_nn
from torch import nn

__all__ = [
    "LoRAWeights", "LayerLoRA", "add_adapter", "remove_adapter", "set_active", "layer_lora",
    "merge_into_float_weight", "merge_active", "unmerge", "is_float_weight",
]


@dataclass
class LoRAWeights:
    """One adapter of one layer: ``A`` [r, in_features], ``B`` [out_features, r], ``bias`` [out] or None."""

    A: torch.Tensor
    B: torch.Tensor
    bias: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, scale: float) -> torch.Tensor:
        """``scale * B @ A`` in float32 ([out, in])."""
        return (self.B.float() @ self.A.float()) * float(scale)

    def to(self, device=None, dtype=None) -> "LoRAWeights":
        mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return LoRAWeights(mv(self.A), mv(self.B), mv(self.bias))


def _name(layer: nn.Module) -> str:
    return getattr(layer, "prefix", "") or type(layer).__name__


def check_shapes(layer: nn.Module, w: LoRAWeights, where: str = "") -> None:
    """A/B/bias shapes against the layer (one-line ValueError naming the layer)."""
    k, n = layer.in_features, layer.out_features
    at = f"{where}: " if where else ""
    if w.A.dim() != 2 or w.B.dim() != 2 or w.A.shape[1] != k or w.B.shape[0] != n or w.B.shape[1] != w.A.shape[0]:
        raise ValueError(f"{at}LoRA for layer '{_name(layer)}' has lora_A {list(w.A.shape)} and lora_B "
                         f"{list(w.B.shape)}; the layer needs [r, {k}] and [{n}, r]")
    if w.bias is not None and tuple(w.bias.shape) != (n,):
        raise ValueError(f"{at}LoRA bias for layer '{_name(layer)}' has shape {list(w.bias.shape)}, expected [{n}]")
    for label, t in (("lora_A", w.A), ("lora_B", w.B), ("bias", w.bias)):
        if t is not None and (not t.is_floating_point() or not bool(torch.isfinite(t).all())):
            raise ValueError(f"{at}LoRA {label} for layer '{_name(layer)}' must be finite floating-point values")


class LayerLoRA:
    """The adapters of one layer and the active (adapter, scale) list; called by QuantLinear.forward."""

    def __init__(self, layer: nn.Module):
        self.prefix = _name(layer)
        self.adapters: dict[str, LoRAWeights] = {}
        self.active: tuple[tuple[str, float], ...] = ()
        self._run: list[tuple[str, LoRAWeights, float]] = []
        self.merged: tuple[tuple[str, float], ...] = ()  # merge_active(): folded into the weight
        self._saved: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    def _refresh(self) -> None:
        self._run = [] if self.merged else [(n, self.adapters[n], s) for n, s in self.active if s != 0.0]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for name, w, s in self._run:
            if w.A.device != x.device:  # the model moved: move this adapter once
                w = self.adapters[name] = w.to(device=x.device)
                self._refresh()
            h = F_nn.linear(x.to(w.A.dtype), w.A)
            y = y + F_nn.linear(h, w.B, w.bias) * s
        return y


def layer_lora(layer: nn.Module) -> Optional[LayerLoRA]:
    """The layer's :class:`LayerLoRA`, or None."""
    return layer.__dict__.get("lora")


def _get_or_create(layer: nn.Module) -> LayerLoRA:
    lora = layer_lora(layer)
    if lora is None:
        lora = LayerLoRA(layer)
        layer.__dict__["lora"] = lora  # a plain attribute: never in state_dict / _apply
    return lora


def _compute_dtype(layer: nn.Module) -> torch.dtype:
    dt = getattr(layer, "params_dtype", None)
    return dt if dt in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16


def _weight_device(layer: nn.Module) -> torch.device:
    w = getattr(layer, "weight", None)
    return w.device if isinstance(w, torch.Tensor) and w.device.type != "meta" else torch.device("cpu")


def add_adapter(layer: nn.Module, nickname: str, weights: LoRAWeights, *, dtype: Optional[torch.dtype] = None) -> None:
    """Store ``weights`` on ``layer`` under ``nickname`` (in ``dtype``, default the layer's compute
    dtype, on its weight device).  Replaces an adapter of the same nickname; not activated."""
    check_shapes(layer, weights)
    lora = _get_or_create(layer)
    lora.adapters[nickname] = weights.to(device=_weight_device(layer), dtype=dtype or _compute_dtype(layer))
    lora._refresh()


def remove_adapter(layer: nn.Module, nickname: str) -> None:
    lora = layer_lora(layer)
    if lora is None or nickname not in lora.adapters:
        return
    if any(n == nickname for n, _ in lora.merged):
        raise ValueError(f"layer '{lora.prefix}': adapter '{nickname}' is merged; unmerge it first")
    del lora.adapters[nickname]
    lora.active = tuple((n, s) for n, s in lora.active if n != nickname)
    lora._refresh()


def set_active(layer: nn.Module, active: Sequence[tuple[str, float]]) -> None:
    """Run exactly these (nickname, scale) adapters on ``layer`` (nicknames it lacks are skipped:
    an adapter need not cover every layer).  ``[]`` turns LoRA off; the base is never touched."""
    lora = layer_lora(layer)
    if lora is None:
        return
    if lora.merged and tuple(active) != lora.merged:
        raise ValueError(f"layer '{lora.prefix}': LoRA weights are merged; unmerge before switching adapters")
    lora.active = tuple((n, float(s)) for n, s in active if n in lora.adapters)
    lora._refresh()


def is_float_weight(layer: nn.Module) -> bool:
    """True if the layer's ``weight`` holds float values a LoRA delta can be added to (not int /
    packed / 8-bit storage)."""
    w = getattr(layer, "weight", None)
    return isinstance(w, torch.Tensor) and w.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def merge_into_float_weight(layer: nn.Module, items: Iterable[tuple[LoRAWeights, float]]) -> None:
    """``W += sum scale * B @ A`` and ``b += sum scale * bias`` (float32 math, cast back to W's
    dtype).  For the loader, before ``process_weights_after_loading`` (online quantization then
    quantizes the merged weight).  Raises naming the layer if its weight is not float."""
    items = list(items)
    if not items:
        return
    if not is_float_weight(layer):
        w = getattr(layer, "weight", None)
        raise ValueError(f"layer '{_name(layer)}': its weight is stored as {getattr(w, 'dtype', None)} "
                         "(pre-quantized), a LoRA cannot be merged into it; use the unmerged mode (dynamic)")
    with torch.no_grad():
        w = layer.weight
        acc = w.data.to(torch.float32, copy=True)  # never in place: merge_active keeps the base
        bias_acc = None
        for lw, s in items:
            check_shapes(layer, lw)
            acc += lw.delta(s).to(acc.device)
            if lw.bias is not None:
                if layer.bias is None:
                    raise ValueError(f"layer '{_name(layer)}' has no bias; the LoRA's lora_B.bias / diff_b cannot "
                                     "be merged (use the unmerged mode)")
                bias_acc = (layer.bias.data.float() if bias_acc is None else bias_acc) + lw.bias.float().to(acc.device) * s
        layer.weight = nn.Parameter(acc.to(w.dtype), requires_grad=False)
        for k, v in vars(w).items():  # keep loader attributes
            setattr(layer.weight, k, v)
        if bias_acc is not None:
            b = layer.bias
            layer.bias = nn.Parameter(bias_acc.to(b.dtype), requires_grad=False)
            for k, v in vars(b).items():
                setattr(layer.bias, k, v)


def merge_active(layer: nn.Module) -> bool:
    """Fold the active adapters into an unquantized layer's weight (the exact base is saved for
    :func:`unmerge`).  Returns False when there is nothing active.  Raises naming the layer when
    the weight is quantized: its float weight no longer exists."""
    lora = layer_lora(layer)
    if lora is None or not lora.active or lora.merged:
        return False
    method = getattr(getattr(layer, "quant_method", None), "name", "unquantized")
    if method != "unquantized" or not is_float_weight(layer):
        raise ValueError(f"layer '{lora.prefix}' is quantized ({method}): its BF16 weight is gone, so LoRAs run "
                         "unmerged (dynamic); merge at load time instead (--lora-merge-mode merge)")
    lora._saved = (layer.weight.data, None if layer.bias is None else layer.bias.data)
    merge_into_float_weight(layer, [(lora.adapters[n], s) for n, s in lora.active])
    lora.merged = lora.active
    lora._refresh()
    return True


def unmerge(layer: nn.Module) -> bool:
    """Restore the exact base weight saved by :func:`merge_active`; the adapters run unmerged again."""
    lora = layer_lora(layer)
    if lora is None or not lora.merged:
        return False
    w, b = lora._saved
    layer.weight.data = w
    if b is not None:
        layer.bias.data = b
    lora._saved = None
    lora.merged = ()
    lora._refresh()
    return True
