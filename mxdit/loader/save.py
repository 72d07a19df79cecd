"""``save_quantized``: a quantized transformer -> a diffusers-layout directory that ``load_transformer``
(and ``mxdit generate``) read back bit-identically.

What is written (the repacked layout the loader already reads, diffusers names throughout):

* ``config.json`` — the model's diffusers config (``_class_name: WanTransformer3DModel``), plus
  ``"quantization_config": {"quant_method": "modelslim", "description": ..., ...}`` naming the
  description and the load-time options that change numerics (``act_round_mode``,
  ``smooth_in_quant``).  diffusers' own ``from_pretrained`` refuses it with "Unknown quantization
  type" instead of loading float8 bytes into BF16 linears (README: "Coming from diffusers").
* ``diffusion_pytorch_model.safetensors`` (or shards + index): every parameter and buffer as stored —
  quantized weights, E8M0 / fp32 scales (``weight_dual_scale`` as msmodelslim's [N, K/512, 1]), fp32
  biases, ``mul_scale`` — through the export writer (:func:`mxdit.loader.export.write_export`, the layout ``diffusers``).
* ``quant_model_description.json`` — msmodelslim labels per tensor (``W8A8_MXFP8``, ``W4A4_MXFP4``,
  ``W4A4_MXFP4_DUALSCALE``, ``W8A8(_DYNAMIC)``, ``W4A4_DYNAMIC``; ``FLOAT`` for everything else).

The directory is built in a temporary sibling and renamed into place (:func:`mxdit.fsutil.atomic_output_dir`);
the model is only read.  Online ``fp8`` (per-channel FP8) has no msmodelslim label and is refused.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from mxdit.layers.linear import QuantLinear
from mxdit.loader.export import Entry, write_export
from mxdit.quant.modelslim import DESCRIPTION_FILE
from mxdit.quant.schemes import FLOAT, Scheme


def _scheme(layer: QuantLinear) -> Scheme:
    """The scheme record of a quantized layer; online fp8 has no msmodelslim label and is refused."""
    rec = layer.quant_method.scheme
    if rec.label is None:
        raise ValueError(f"save_quantized: layer '{layer.prefix}' is quantized with {rec.name!r}, which has no msmodelslim "
                         "label the loader reads (online fp8 is per-channel FP8); save the BF16 model and quantize at load")
    return rec


def _config_dict(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"save_quantized: {type(model).__name__} has no .config; pass a Wan transformer "
                         "(mxdit's or diffusers' WanTransformer3DModel)")
    if hasattr(cfg, "to_dict") and not isinstance(cfg, dict):  # mxdit's WanTransformerConfig
        return {"_class_name": "WanTransformer3DModel", **cfg.to_dict()}
    data = {k: v for k, v in dict(cfg).items() if k != "quantization_config"}  # diffusers' FrozenDict
    data.setdefault("_class_name", "WanTransformer3DModel")
    return json.loads(json.dumps(data, default=list))  # tuples -> lists, as diffusers writes them


def save_quantized(model: nn.Module, directory: str, *, overwrite: bool = False,
                   max_shard_size_gb: Optional[float] = None) -> str:
    """Write the (quantized) Wan transformer ``model`` to ``directory`` in the diffusers layout with its
    quantization description; ``load_transformer(directory)`` gives the same tensors, bit for bit.

    ``model``: mxdit's model (``load_transformer``) or diffusers' ``WanTransformer3DModel`` after
    :func:`mxdit.quantize_module`.  ``overwrite`` replaces only a directory mxdit wrote.
    ``max_shard_size_gb``: shard the weights (with ``diffusion_pytorch_model.safetensors.index.json``);
    default one file.  Returns the directory.
    """
    from mxdit.fsutil import atomic_output_dir

    config = _config_dict(model)
    quantized: dict[str, tuple[Scheme, QuantLinear]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and mod.is_quantized:
            if not mod._processed:
                raise ValueError(f"save_quantized: layer '{name}' holds unprocessed weights (process_weights_after_loading was not run)")
            quantized[name] = (_scheme(mod), mod)
    round_modes = {getattr(m.quant_method, "act_round_mode", "rint") for _, m in quantized.values()}
    smooth_in = {bool(getattr(m.quant_method, "smooth_in_quant", False)) for _, m in quantized.values()}
    if len(round_modes) > 1 or len(smooth_in) > 1:
        raise ValueError(f"save_quantized: the layers mix act_round_mode {sorted(round_modes)} / smooth_in_quant {sorted(smooth_in)}; "
                         "one model-wide value is stored")
    entries: list[Entry] = []
    for pname, t in model.state_dict().items():  # parameters and persistent buffers (q_rot / k_rot), as torch saves them
        if t.device.type == "meta":
            raise ValueError(f"save_quantized: tensor '{pname}' is on the meta device (not loaded)")
        owner, _, attr = pname.rpartition(".")
        label = FLOAT
        if owner in quantized and attr in quantized[owner][0].tensors:
            rec = quantized[owner][0]
            label, t = rec.label, rec.tensors[attr].to_disk(t)  # the record's on-disk shape ([N, K/512, 1] ...)
        if t.is_floating_point() and t.dtype.itemsize > 1 and not bool(torch.isfinite(t).all()):
            raise ValueError(f"save_quantized: tensor '{pname}' holds NaN or Inf")
        entries.append(Entry(pname, label, t.dtype, tuple(t.shape), lambda t=t: t.detach()))
    if quantized:
        config["quantization_config"] = {
            "quant_method": "modelslim", "description": DESCRIPTION_FILE,
            "act_round_mode": round_modes.pop(), "smooth_in_quant": smooth_in.pop(),
        }
    with atomic_output_dir(directory, overwrite=overwrite, tool="save_quantized") as tmp:
        write_export(tmp, entries, layout="diffusers", schemes={rec.label for rec, _ in quantized.values()} or {FLOAT},
                     shard_size_gb=max_shard_size_gb or 0, write_description=bool(quantized))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    return directory
