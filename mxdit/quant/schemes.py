"""The quantization schemes: one record per scheme, read by everything else.

A :class:`Scheme` holds every fact about a scheme that the rest of mxdit needs:

* its **names**: the online method name (``mxdit generate --quantization``, ``get_quant_config``),
  the msmodelslim label (``quant_model_description*.json``; ``mxdit quantize`` recipes) and aliases;
* its **element format**, block sizes and the multiple of K (in_features) it needs;
* its **checkpoint tensors**, ``{suffix: TensorSpec}``: dtype and shape in terms of N (out_features)
  and K, the on-disk shape where it differs (``weight_dual_scale`` [N, K/512, 1]) and the loader that
  turns a stored tensor into the parameter (one place for read and write: :meth:`TensorSpec.to_disk`,
  :meth:`TensorSpec.load`);
* its **activation quantizer** (what the runtime does to x, per token) and the
  :class:`~mxdit.quant.base.LinearMethod` class that runs it.

The registry (``get_quant_config``, ``--quantization`` choices), :class:`OnlineQuantConfig`,
the msmodelslim dispatcher (:class:`ModelSlimConfig`), ``create_weights``, ``mxdit quantize``'s
exporter and recipes, the quality report and README's method table all read :data:`SCHEMES`.
A new scheme is one record here (plus, if it needs new compute, a LinearMethod / kernel-backend
method; plus its weight quantizer in :mod:`mxdit.quant.offline_rules` if ``mxdit quantize``
should write it).  The shape follows vLLM's ``compressed_tensors/schemes`` (one scheme, one
definition of its weights) and torchao's config enums.

Every quantized layer also holds ``bias`` float32 [N] (added in fp32) and, when smoothed
(msmodelslim smooth-quant), ``mul_scale`` float32 [K]: :data:`COMMON_TENSORS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from mxdit import formats as F
from mxdit.kernels import quantize_fp8_per_token, quantize_int4_per_token, quantize_int8_per_token
from mxdit.quant.methods import (
    DualMXLinearMethod,
    FP8LinearMethod,
    Int4LinearMethod,
    Int8LinearMethod,
    MXLinearMethod,
    QuantizedLinearMethod,
)

Dim = Union[str, int]  # "N", "K", "K/2", "K/32", "K/512", or a constant


def _dim(d: Dim, n: int, k: int) -> int:
    if isinstance(d, int):
        return d
    base, _, div = d.partition("/")
    v = {"N": n, "K": k}[base]
    return v // int(div) if div else v


def _shape_error(name, got, want) -> ValueError:
    return ValueError(f"tensor '{name}': shape {tuple(got)} does not match the expected {tuple(want)}")


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor of a quantized layer.

    ``shape``: the parameter's shape in terms of N and K; ``disk_shape``: the shape msmodelslim
    stores when it differs (read and written through :meth:`load` / :meth:`to_disk`, nowhere else);
    ``accepts``: further shapes read as the same values (a reshape); ``loader``: a special
    conversion ``(param, tensor, name=) -> tensor`` (FP4 containers, int64-held floats...), used
    instead of the generic shape / dtype check; ``missing_init``: "zeros" / "ones" if a checkpoint
    may omit it.
    """

    dtype: torch.dtype
    shape: tuple[Dim, ...]
    disk_shape: Optional[tuple[Dim, ...]] = None
    accepts: tuple[tuple[Dim, ...], ...] = ()
    loader: Optional[Callable[..., torch.Tensor]] = None
    missing_init: Optional[str] = None
    doc: str = ""

    def shape_for(self, n: int, k: int) -> tuple[int, ...]:
        return tuple(_dim(d, n, k) for d in self.shape)

    def disk_shape_for(self, n: int, k: int) -> tuple[int, ...]:
        return tuple(_dim(d, n, k) for d in (self.disk_shape or self.shape))

    def to_disk(self, t: torch.Tensor) -> torch.Tensor:
        """The parameter-shaped tensor as msmodelslim stores it (e.g. [N, K/512] -> [N, K/512, 1])."""
        if self.disk_shape is None:
            return t
        return t.reshape(*t.shape, *([1] * (len(self.disk_shape) - len(self.shape))))

    def load(self, param: torch.Tensor, t: torch.Tensor, *, name: str = "?") -> torch.Tensor:
        """A stored tensor -> the parameter's storage (the weight_loader of the parameter)."""
        if self.loader is not None:
            return self.loader(param, t, name=name)
        want = tuple(param.shape)
        extra = tuple(want) + (1,) * (len(self.disk_shape) - len(self.shape)) if self.disk_shape else None
        if tuple(t.shape) != want:
            ok = extra is not None and tuple(t.shape) == extra
            ok = ok or any(t.numel() == param.numel() and t.dim() == len(a) for a in self.accepts)
            if not ok:
                raise _shape_error(name, t.shape, extra or want)
            t = t.reshape(want)
        if t.dtype != self.dtype:
            exact = {torch.uint8, torch.int8, torch.int32, torch.int64, torch.float8_e4m3fn, torch.float8_e5m2}
            if self.dtype in exact or not t.is_floating_point() or t.dtype in exact:
                kind = "floating" if self.dtype not in exact else str(self.dtype)
                raise ValueError(f"tensor '{name}': expected a {kind} tensor ({self.dtype}), got {t.dtype}")
            t = t.to(self.dtype)
        return t


# ---- special loaders (tensor conversions a shape/dtype check cannot express) ---------------

def fp4_weight_loader(param: torch.Tensor, t: torch.Tensor, *, name: str = "?") -> torch.Tensor:
    """FP4 weights in either msmodelslim container: packed uint8 [N, K/2] (since
    msmodelslim 4557940) or float8_e4m3fn values [N, K] (<= 26.0.0); both become packed."""
    n, kh = param.shape
    if t.dtype == torch.uint8:
        if tuple(t.shape) != (n, kh):
            raise _shape_error(name, t.shape, (n, kh))
        return t
    if t.dtype == torch.float8_e4m3fn:
        if tuple(t.shape) != (n, 2 * kh):
            raise _shape_error(name, t.shape, (n, 2 * kh))
        return F.fp8_container_to_fp4(t, name=name)
    raise ValueError(
        f"tensor '{name}': an FP4 weight must be packed uint8 [N, K/2] or float8_e4m3fn values [N, K], got {t.dtype}"
    )


def deq_scale_loader(param: torch.Tensor, t: torch.Tensor, *, name: str = "?") -> torch.Tensor:
    """deq_scale: float32, or (ascendv1, fp16 models) float32 bits held in int64 / int32."""
    t = t.reshape(-1) if t.dim() == 2 and 1 in t.shape else t
    if tuple(t.shape) != tuple(param.shape):
        raise _shape_error(name, t.shape, param.shape)
    if t.dtype in (torch.int64, torch.int32):
        return t.to(torch.int32).view(torch.float32)  # low 32 bits are the float32 pattern
    if not t.is_floating_point():
        raise ValueError(f"tensor '{name}': deq_scale must be float32 or int64 holding float32 bits, got {t.dtype}")
    return t.to(torch.float32)


def any_numeric_loader(param: torch.Tensor, t: torch.Tensor, *, name: str = "?") -> torch.Tensor:
    """Any numeric dtype and any shape of the same size (msmodelslim's input_offset)."""
    if t.numel() != param.numel():
        raise _shape_error(name, t.shape, param.shape)
    return t.reshape(param.shape).to(param.dtype)


def int4_weight_loader(param: torch.Tensor, t: torch.Tensor, *, name: str = "?") -> torch.Tensor:
    """W4A4_DYNAMIC weight: int8 [N, K] holding int4 values, each in [-8, 7]."""
    if tuple(t.shape) != tuple(param.shape):
        raise _shape_error(name, t.shape, param.shape)
    if t.dtype != torch.int8:
        raise ValueError(f"tensor '{name}': a W4A4_DYNAMIC weight must be int8 (one int4 value per byte), got {t.dtype}")
    lo, hi = int(t.min()) if t.numel() else 0, int(t.max()) if t.numel() else 0
    if lo < -8 or hi > 7:
        raise ValueError(f"tensor '{name}': W4A4_DYNAMIC weight values must be int4 in [-8, 7], found [{lo}, {hi}]")
    return t


# ---- activation quantizers: bf16 [M, K] -> the dequantized activations the runtime uses (fp32) -----

def _mx_act(fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def act(x: torch.Tensor) -> torch.Tensor:
        return F.quantize_mx(x, fmt, scale_mode="floor", round_mode="rint").dequantize(torch.float32)
    return act


def _dual_act(x: torch.Tensor) -> torch.Tensor:
    return F.quantize_mx_dual(x, round_mode="rint").dequantize(torch.float32)


def _per_token_act(fn) -> Callable[[torch.Tensor], torch.Tensor]:
    def act(x: torch.Tensor) -> torch.Tensor:
        q, s = fn(x)
        return q.to(torch.float32) * s
    return act


# ---- the record -------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Scheme:
    """One quantization scheme (see the module docstring)."""

    #: the online method name (``--quantization``), or None for checkpoint-only schemes
    online: Optional[str]
    #: the msmodelslim label, or None for online-only schemes
    label: Optional[str]
    #: the LinearMethod class (constructed with ``scheme=self``)
    method: type
    fmt: str  # element format: fp8_e4m3, fp4_e2m1, int8, int4
    weights: str  # README: what the weights are
    activations: str  # README: what the activations are
    bits_per_weight: Optional[float]
    #: the checkpoint tensors of a quantized layer (besides COMMON_TENSORS)
    tensors: dict[str, TensorSpec]
    #: bf16 [M, K] -> dequantized fp32 activations as the runtime quantizes them (None: needs the layer's scales)
    act_quant: Optional[Callable[[torch.Tensor], torch.Tensor]]
    aliases: tuple[str, ...] = ()  # online-name aliases (SGLang's "mxfp4_npu")
    #: recipe spellings of the label (case-insensitive); the first also names the built-in recipe all-<it>
    label_aliases: tuple[str, ...] = ()
    block: Optional[int] = None  # elements per scale (MX: 32)
    l0_block: Optional[int] = None  # dual-level: elements per L0 scale (512)
    k_multiple: int = 1
    #: extra constructor arguments of ``method``
    method_kw: dict = field(default_factory=dict)
    #: options of OnlineQuantConfig that this scheme's method takes (besides act_round_mode, backend)
    online_options: tuple[str, ...] = ()
    #: ``mxdit quantize`` writes it (its weight quantizer is in mxdit.quant.offline_rules), with this
    #: default weight rule (mxdit.formats.rules; measured best, see offline_rules)
    exportable: bool = False
    default_rule: Optional[str] = None

    @property
    def name(self) -> str:
        """The name layers report: the online name, else the label."""
        return self.online or self.label

    def make_method(self, *, online: bool, **kw) -> QuantizedLinearMethod:
        return self.method(self, online=online, **self.method_kw, **kw)

    def tensor_shapes(self, n: int, k: int, *, disk: bool = True) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """{suffix: (dtype, shape)} of a quantized [N, K] layer (on disk, or as parameters)."""
        return {s: (t.dtype, t.disk_shape_for(n, k) if disk else t.shape_for(n, k)) for s, t in self.tensors.items()}


_MX_SCALE = TensorSpec(torch.uint8, ("N", "K/32"), doc="E8M0 bytes, one per 32 along K")
_FP4_WEIGHT = TensorSpec(torch.uint8, ("N", "K/2"), loader=fp4_weight_loader,
                         doc="packed FP4 E2M1 (even k in the low nibble); float8_e4m3fn [N, K] values accepted")
_INT_COLUMN = TensorSpec(torch.float32, ("N", 1), accepts=(("N",),))

SCHEMES: tuple[Scheme, ...] = (
    Scheme(
        online="mxfp8", label="W8A8_MXFP8", method=MXLinearMethod, fmt="fp8_e4m3", block=32, k_multiple=32,
        online_options=("scale_mode",), exportable=True, default_rule="mse", label_aliases=("mxfp8",),
        weights="MXFP8 E4M3, e8m0 scale per 32", activations="per token, MXFP8", bits_per_weight=8.25,
        tensors={"weight": TensorSpec(torch.float8_e4m3fn, ("N", "K")), "weight_scale": _MX_SCALE},
        act_quant=_mx_act("fp8_e4m3"),
    ),
    Scheme(
        online="mxfp4", label="W4A4_MXFP4", method=MXLinearMethod, fmt="fp4_e2m1", block=32, k_multiple=32,
        online_options=("scale_mode",), exportable=True, default_rule="mse", label_aliases=("mxfp4",),
        weights="MXFP4 E2M1, e8m0 scale per 32", activations="per token, MXFP4", bits_per_weight=4.25,
        tensors={"weight": _FP4_WEIGHT, "weight_scale": _MX_SCALE},
        act_quant=_mx_act("fp4_e2m1"),
    ),
    Scheme(
        online="mxfp4_dual", label="W4A4_MXFP4_DUALSCALE", method=DualMXLinearMethod, fmt="fp4_e2m1",
        block=32, l0_block=F.L0_BLOCK, k_multiple=F.L0_BLOCK, aliases=("mxfp4_npu",), exportable=True, default_rule="mse",
        label_aliases=("mxfp4_dual", "mxfp4-dual", "dualscale"),
        weights="dual-level MXFP4: fp32 per 512 + e8m0 per 32", activations="per token, dual-level",
        bits_per_weight=4.31,
        tensors={"weight": _FP4_WEIGHT, "weight_scale": _MX_SCALE,
                 # required (no missing_init): a checkpoint without it is reported as missing
                 "weight_dual_scale": TensorSpec(torch.float32, ("N", "K/512"), disk_shape=("N", "K/512", 1),
                                                 doc="L0 scales; msmodelslim stores [N, K/512, 1]")},
        act_quant=_dual_act,
    ),
    Scheme(  # online only: its tensors are the layer's after quantization at load
        online="fp8", label=None, method=FP8LinearMethod, fmt="fp8_e4m3",
        weights="FP8 E4M3, fp32 scale per output channel", activations="per token, dynamic", bits_per_weight=8.0,
        tensors={"weight": TensorSpec(torch.float8_e4m3fn, ("N", "K")),
                 "weight_scale": TensorSpec(torch.float32, ("N",))},
        act_quant=_per_token_act(quantize_fp8_per_token),
    ),
    Scheme(
        online=None, label="W8A8", method=Int8LinearMethod, fmt="int8", method_kw={"dynamic": False},
        weights="int8, static per-tensor activation scale/offset, int32 quant_bias (float bias folded in)",
        activations="per tensor, static int8", bits_per_weight=None,
        tensors={"weight": TensorSpec(torch.int8, ("N", "K")),
                 "input_scale": TensorSpec(torch.float32, (1,)),
                 "input_offset": TensorSpec(torch.float32, (1,), loader=any_numeric_loader),
                 "quant_bias": TensorSpec(torch.int32, ("N",)),
                 "deq_scale": TensorSpec(torch.float32, ("N",), loader=deq_scale_loader,
                                         doc="float32, or its bits held in int64 (fp16 models)")},
        act_quant=None,
    ),
    Scheme(
        online=None, label="W8A8_DYNAMIC", method=Int8LinearMethod, fmt="int8", method_kw={"dynamic": True},
        weights="int8, fp32 scale per output channel", activations="per token, dynamic int8", bits_per_weight=None,
        tensors={"weight": TensorSpec(torch.int8, ("N", "K")),
                 "weight_scale": TensorSpec(torch.float32, ("N", 1)),
                 "weight_offset": TensorSpec(torch.float32, ("N", 1), missing_init="zeros")},
        act_quant=_per_token_act(quantize_int8_per_token),
    ),
    Scheme(
        online=None, label="W4A4_DYNAMIC", method=Int4LinearMethod, fmt="int4", k_multiple=8,
        label_aliases=("int4",), exportable=True, default_rule="minmax",
        weights="int4 held in int8, fp32 scale per output channel (symmetric)",
        activations="per token, dynamic int4 (scale = rowMax(abs(x)) / 7, round half to even)", bits_per_weight=None,
        tensors={"weight": TensorSpec(torch.int8, ("N", "K"), loader=int4_weight_loader),
                 "weight_scale": _INT_COLUMN,
                 "weight_offset": TensorSpec(torch.float32, ("N", 1), accepts=(("N",),), missing_init="zeros")},
        act_quant=_per_token_act(quantize_int4_per_token),
    ),
)

#: tensors every quantized layer may hold (bias if the layer has one; mul_scale when smoothed)
COMMON_TENSORS = {
    "bias": TensorSpec(torch.float32, ("N",), doc="added in fp32"),
    "mul_scale": TensorSpec(torch.float32, ("K",), missing_init="ones", doc="smooth-quant 1/s (x * mul_scale)"),
}

#: msmodelslim's label for an unquantized tensor
FLOAT = "FLOAT"
#: description-only attention labels (``<attn>.quant_type``: FA3 dynamic FP8, msmodelslim W8A8F8 / W4A4F8)
ATTENTION_LABELS = ("FP8_DYNAMIC",)
#: the name of the pre-quantized-checkpoint method (every record with a label)
MODELSLIM = "modelslim"

BY_ONLINE: dict[str, Scheme] = {s.online: s for s in SCHEMES if s.online}
ONLINE_ALIASES: dict[str, str] = {a: s.online for s in SCHEMES for a in s.aliases}
BY_LABEL: dict[str, Scheme] = {s.label: s for s in SCHEMES if s.label}
EXPORTABLE: dict[str, Scheme] = {s.label: s for s in SCHEMES if s.exportable}


def online_methods() -> tuple[str, ...]:
    return tuple(BY_ONLINE)


def available_quant_methods() -> list[str]:
    """Every name ``--quantization`` / ``get_quant_config`` accepts (canonical names, then aliases)."""
    return list(BY_ONLINE) + [MODELSLIM] + sorted(ONLINE_ALIASES)


class UnknownMethodError(ValueError):
    """An unknown quantization method name (a bad input: the CLI prints it on one line, exit 2)."""


def canonical_name(name: str, *, what: str = "quantization method", online_only: bool = False) -> str:
    """The one check of a quantization method name (``--quantization``, ``get_quant_config``,
    ``load_transformer``, ``config.json``'s ``quant_method``, OnlineQuantConfig): the canonical name
    (aliases resolved), or :class:`UnknownMethodError` naming ``what`` and the valid names."""
    n = ONLINE_ALIASES.get(name, name) if isinstance(name, str) else name
    if n in BY_ONLINE or (n == MODELSLIM and not online_only):
        return n
    valid = list(online_methods()) if online_only else available_quant_methods()
    raise UnknownMethodError(f"unknown {what} {name!r}; valid: {valid}")


def canonical_label(name: str) -> Optional[str]:
    """A recipe's scheme spelling -> the msmodelslim label of an exportable scheme, ``FLOAT``, or None."""
    low = name.lower()
    if low in ("float", "bf16", "none"):
        return FLOAT
    for s in EXPORTABLE.values():
        if low == s.label.lower() or low in s.label_aliases:
            return s.label
    return None


def readme_table() -> str:
    """The README's "Quantization methods" table, from the records (a test keeps README equal to it)."""
    rows = ["| `--quantization` | msmodelslim label | weights | activations | bits/weight | checkpoint tensors (N x K layer) |",
            "|---|---|---|---|---|---|"]
    for s in SCHEMES:
        name = f"`{s.online}`" + (f" (alias {', '.join(f'`{a}`' for a in s.aliases)})" if s.aliases else "") \
            if s.online else f"`{MODELSLIM}` only"
        label = f"`{s.label}`" if s.label else "-"
        bits = f"{s.bits_per_weight}" if s.bits_per_weight else "-"
        tens = "; ".join(f"`{k}` {str(t.dtype).replace('torch.', '')} [{', '.join(map(str, t.disk_shape or t.shape))}]"
                         for k, t in s.tensors.items())
        rows.append(f"| {name} | {label} | {s.weights} | {s.activations} | {bits} | {tens} |")
    return "\n".join(rows) + "\n"
