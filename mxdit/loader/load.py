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
    unexpected = sorted(ckpt.names[m] for m in ckpt.names if m not in params)
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
        quant_options: method options — include / ignore (glob patterns on layer
            names; online default: the block linears), quantize_proj_out,
            act_round_mode, scale_mode, smooth_in_quant, backend.
    Returns the model in eval mode, with ``.load_report`` and ``.quant_config``.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    if device.type == "npu":
        from mxdit.kernels.npu import check_npu_available

        check_npu_available()
    ckpt: TransformerCheckpoint = open_checkpoint(path, config=config)
    try:
        model, qc, qsource = check_checkpoint(ckpt, quantization, dtype=dtype, **quant_options)
    except BaseException:
        ckpt.files.close()
        raise
    params = dict(model.named_parameters())

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
                module.process_weights_after_loading()
                if module.quant_method.name != "unquantized":
                    if device.type == "cpu":
                        _release_freed_memory()
                    report.layers_quantized[module.quant_method.name] = report.layers_quantized.get(module.quant_method.name, 0) + 1
    bar.close()
    ckpt.files.close()
    model.eval()
    report.parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report.seconds = time.perf_counter() - t0
    model.load_report = report
    return model
