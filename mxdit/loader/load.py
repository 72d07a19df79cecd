"""``load_transformer``: a Wan transformer from any supported layout, quantized
weights materialised directly.

1. Headers are read and checked against the model built on the meta device:
   unexpected tensors, missing ones and shape/dtype mismatches are reported
   together in one error before any data is read.
2. Tensors are streamed layer by layer in the model's order (mmap, pages
   released after each copy); a layer is finished (``process_weights_after_loading``:
   online methods quantize here) as soon as its last tensor arrives, so an
   online-quantized model never holds more than one layer in BF16, and a
   pre-quantized one never holds BF16 weights at all.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from mxdit.layers.attention import resolve_attention_quantization
from mxdit.layers.linear import QuantLinear
from mxdit.loader.checkpoint import TransformerCheckpoint, open_checkpoint
from mxdit.loader.safetensors_io import CheckpointError
from mxdit.models.wan.config import WanTransformerConfig
from mxdit.models.wan.transformer import WanTransformer3DModel
from mxdit.quant import get_weight_loader

_MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
    """Missing, unexpected and mismatched tensors, all at once."""

    def __init__(self, where: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = [f"checkpoint '{where}' does not match the model:"]
        for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("mismatched tensors", mismatched)):
            if items:
                listed = "; ".join(items[:_MAX_LISTED]) + (f"; ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")
                parts.append(f"  {len(items)} {title}: {listed}")
        super().__init__("\n".join(parts))


@dataclass
class LoadReport:
    path: str
    layout: str
    quantization: str
    seconds: float = 0.0
    tensors: int = 0
    layers_quantized: dict[str, int] = field(default_factory=dict)  # method name -> count
    parameter_bytes: int = 0

    def __str__(self) -> str:
        q = ", ".join(f"{n} x{c}" for n, c in sorted(self.layers_quantized.items())) or "none"
        return (f"loaded {self.path} ({self.layout} layout, quantization: {self.quantization}; layers: {q}); "
                f"{self.tensors} tensors, {self.parameter_bytes / 2**30:.3f} GiB of parameters in {self.seconds:.1f} s")


def _release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc keeps allocations below its mmap
    threshold in the heap, so quantization temporaries would otherwise stay in RSS)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _owner(model: nn.Module, pname: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = pname.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def check_checkpoint(ckpt: TransformerCheckpoint, quantization: Optional[str] = None, *,
                     dtype: torch.dtype = torch.bfloat16, **quant_options: Any):
    """Step 1 of loading, usable on its own (``mxdit repack`` checks what it will write with
    it): resolve the quant config, build the model on the meta device (every layer's label
    dispatched to its method) and check every tensor's name, shape and dtype from the headers.
    Returns ``(meta model, quant config, where the config came from)``; raises
    :class:`CheckpointMismatchError` (or a ValueError / NotImplementedError naming the layer)."""
    qc, qsource = ckpt.quant_config(quantization, quant_options)
    model = WanTransformer3DModel(ckpt.config, quant_config=qc, params_dtype=dtype, device="meta")
    params = dict(model.named_parameters())
    if any(True for _ in model.buffers()):
        raise RuntimeError("internal: the Wan model has buffers; the streaming loader expects parameters only")
    rotations = _rotation_names(model, ckpt, str(ckpt.directory))  # W8A8F8 / W4A4F8 q_rot / k_rot
    unexpected = sorted(ckpt.names[m] for m in ckpt.names if m not in params and m not in rotations)
    missing, mismatched = [], []
    for pname, p in params.items():
        if pname not in ckpt.names:
            if getattr(p, "missing_init", None) is None:
                missing.append(pname)
            continue
        info = ckpt.files.info(ckpt.names[pname])
        try:
            get_weight_loader(p)(p, torch.empty(info.shape, dtype=info.dtype, device="meta"), name=info.name)
        except ValueError as e:
            mismatched.append(str(e))
        except (RuntimeError, NotImplementedError):
            pass  # the loader needs real data to check more; done while streaming
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(ckpt.directory, missing, unexpected, mismatched)
    return model, qc, qsource


def load_transformer(
    path: str,
    *,
    quantization: Optional[str] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    config: Optional[WanTransformerConfig | dict] = None,
    progress: bool = True,
    attention_quantization: Optional[str] = None,
    lora_merge: Any = None,
    **quant_options: Any,
) -> WanTransformer3DModel:
    """Load a Wan2.x transformer directory (diffusers, original Wan, msmodelslim export or repacked).

    Args:
        path: the transformer directory (e.g. ``<model>/transformer``).
        quantization: None (auto-detect: description file, config.json, safetensors
            metadata) or a method name ("mxfp8", "mxfp4", "mxfp4_dual"/"mxfp4_npu",
            "fp8" online from BF16; "modelslim" for an export's description).
        device: where the weights go (and where online quantization runs).
        dtype: dtype of the floating parameters (fp32-kept modules stay fp32).
        config: override the architecture (default: config.json or inferred).
        attention_quantization: quantized self-attention ("mxfp8", "mxfp8_rotated",
            "fp8_block", "fp8_block_rotated"; "none"); None: the environment
            variable SGLANG_DIFFUSION_ENABLE_MXFP8_ATTENTION (truthy -> "mxfp8_rotated"),
            else what an msmodelslim W8A8F8 / W4A4F8 description says (attentions labelled
            ``<attn>.quant_type: FP8_DYNAMIC`` -> "mxfp8", with the checkpoint's q_rot /
            k_rot), else BF16 (see :mod:`mxdit.layers.attention`).  An explicit value applies
            to every self-attention.  Cross-attention stays BF16.
        lora_merge: a :class:`mxdit.loader.lora.LoadTimeMerge`: LoRAs added to each float weight
            as it arrives, before online quantization (checked on the meta model first).
        quant_options: method options — include / ignore (glob patterns on layer
            names; online default: the block linears), quantize_proj_out,
            act_round_mode, scale_mode, smooth_in_quant, backend.
    Returns the model in eval mode, with ``.load_report`` and ``.quant_config``.
    """
    t0 = time.perf_counter()
    attn_mode = resolve_attention_quantization(attention_quantization)  # bad values fail before any I/O
    device = torch.device(device)
    if device.type == "npu":
        from mxdit.kernels.npu import check_npu_available

        check_npu_available()
    ckpt: TransformerCheckpoint = open_checkpoint(path, config=config)
    try:
        model, qc, qsource = check_checkpoint(ckpt, quantization, dtype=dtype, **quant_options)
        if lora_merge is not None:
            lora_merge.prepare(model)  # LoRA names / shapes / a pre-quantized base: before any read
    except BaseException:
        ckpt.files.close()
        raise
    params = dict(model.named_parameters())
    rotations = _rotation_names(model, ckpt, path)  # validated in check_checkpoint

    # ---- 2. stream, layer by layer ----------------------------------------------------
    by_module: dict[str, list[str]] = defaultdict(list)
    for pname in params:
        by_module[pname.rpartition(".")[0]].append(pname)
    report = LoadReport(path, ckpt.layout, f"{qc.name if qc else 'none'} [{qsource}]")
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(params), desc="loading transformer", unit="tensor", disable=not progress or tqdm is None, leave=False)
    with torch.no_grad():
        for mod_name, pnames in by_module.items():
            module = model.get_submodule(mod_name) if mod_name else model
            for pname in pnames:
                p = params[pname]
                owner, attr = _owner(model, pname)
                if pname in ckpt.names:
                    cname = ckpt.names[pname]
                    t = ckpt.files.read(cname, device, finite=True)  # NaN/Inf weights, E8M0 255 scales
                    if cname.endswith("weight_dual_scale") and t.numel() and not bool((t > 0).all()):
                        raise CheckpointError(f"'{ckpt.files.index[cname].path}': tensor '{cname}': dual-level L0 scales "
                                              f"must be positive (found {float(t[t <= 0].reshape(-1)[0])})")
                    if cname.endswith("weight_scale") and t.dtype == torch.uint8 and bool((t == 255).any()):
                        raise CheckpointError(f"'{ckpt.files.index[cname].path}': tensor '{cname}': E8M0 scale code 255 "
                                              f"(NaN) is not a valid weight scale")
                    t = get_weight_loader(p)(p, t, name=cname)
                    report.tensors += 1
                else:
                    init = p.missing_init
                    t = (torch.ones if init == "ones" else torch.zeros)(p.shape, dtype=p.dtype, device=device)
                new = nn.Parameter(t.to(device), requires_grad=False)
                for k, v in vars(p).items():  # keep loader attributes (weight_loader, missing_init)
                    setattr(new, k, v)
                owner._parameters[attr] = new
                bar.update(1)
            if isinstance(module, QuantLinear):
                if lora_merge is not None:
                    lora_merge.apply(mod_name, module)  # merged into the float weight, then quantized
                module.process_weights_after_loading()
                if module.quant_method.name != "unquantized":
                    if device.type == "cpu":
                        _release_freed_memory()
                    report.layers_quantized[module.quant_method.name] = report.layers_quantized.get(module.quant_method.name, 0) + 1
        for rname, (attn, attr) in sorted(rotations.items()):
            t = ckpt.files.read(ckpt.names[rname], device)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: rotation '{ckpt.names[rname]}' holds NaN or Inf")
            setattr(attn, attr, t.contiguous())
    bar.close()
    ckpt.files.close()
    model.eval()
    report.parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report.seconds = time.perf_counter() - t0
    model.load_report = report
    model.set_attention_quantization(attn_mode)
    if attention_quantization is None and attn_mode is None and qc is not None and getattr(qc, "attention_quant", None):
        # W8A8F8 / W4A4F8: the description labels the attentions msmodelslim quantized (FP8_DYNAMIC)
        for prefix in qc.attention_quant:
            model.get_submodule(prefix).attention_quantization = CHECKPOINT_ATTENTION_MODE
        model.attention_quantization = CHECKPOINT_ATTENTION_MODE
    return model


#: the mode for attentions an msmodelslim description labels FP8_DYNAMIC (SGLang's MXFP8 FA;
#: the checkpoint's q_rot / k_rot are applied where present)
CHECKPOINT_ATTENTION_MODE = "mxfp8"
_ROTATION_ATTRS = ("q_rot", "k_rot")


def _rotation_names(model: WanTransformer3DModel, ckpt: TransformerCheckpoint, path: str) -> dict[str, tuple[nn.Module, str]]:
    """Checkpoint ``blocks.N.attn1.{q_rot,k_rot}`` -> (the WanAttention, attribute), validated from headers."""
    from mxdit.models.wan.transformer import WanAttention

    out: dict[str, tuple[nn.Module, str]] = {}
    for m in ckpt.names:
        owner, _, attr = m.rpartition(".")
        if attr not in _ROTATION_ATTRS:
            continue
        try:
            attn = model.get_submodule(owner)
        except AttributeError:
            attn = None
        if not isinstance(attn, WanAttention) or not owner.endswith(".attn1"):
            raise ValueError(f"{path}: rotation tensor '{ckpt.names[m]}' belongs to no self-attention layer")
        info = ckpt.files.info(ckpt.names[m])
        d = attn.head_dim
        if tuple(info.shape) != (d, d) or not info.dtype.is_floating_point:
            raise ValueError(f"{path}: rotation '{ckpt.names[m]}' must be a float [{d}, {d}] tensor, "
                             f"got {info.dtype} {list(info.shape)}")
        out[m] = (attn, attr)
    for m, (attn, attr) in out.items():
        other = m.rpartition(".")[0] + "." + ("k_rot" if attr == "q_rot" else "q_rot")
        if other not in out:
            raise ValueError(f"{path}: '{ckpt.names[m]}' has no matching '{other.rpartition('.')[2]}'")
    return out
