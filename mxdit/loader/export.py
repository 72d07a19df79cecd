"""The checkpoint writer: msmodelslim exports (mindie / ascendv1 savers) and mxdit's diffusers layout.

The reader's twin (:mod:`mxdit.loader.checkpoint`, :mod:`mxdit.loader.safetensors_io`): tensors are
streamed into :func:`~mxdit.loader.safetensors_io.write_safetensors` one at a time, the written files
are read back with the reader's own header checks, and a quantized layer's tensors are exactly its
scheme record's (:mod:`mxdit.quant.schemes`: names, dtypes, shapes, on-disk shapes through
:meth:`TensorSpec.to_disk` -- the inverse of the loader's :meth:`TensorSpec.load`).

Layouts (``mxdit quantize --layout``):

``mindie`` (msmodelslim ``mindie_format_saver``)
    ``quant_model_description_{t}.json`` + ``quant_model_weight_{t}.safetensors`` with
    ``t = model_quant_type.lower()``; the description holds the tensor labels and ``model_quant_type``.
``ascendv1`` (msmodelslim ``ascendv1_saver``)
    ``quant_model_description.json`` with ``version`` "1.0.0", ``model_quant_type``, ``metadata`` {},
    ``group_size`` 32, ``optional`` {}; weights ``quant_model_weights-0000x-of-0000y.safetensors`` +
    index when the shard size is > 0 (msmodelslim's ``part_file_size``: a new shard when the next
    tensor would reach the size), else ``quant_model_weights.safetensors``.
``diffusers``
    what ``mxdit repack`` produces: ``diffusion_pytorch_model.safetensors`` (shards + index when
    larger than the shard size) with diffusers names, the diffusers ``config.json`` and a
    ``quant_model_description.json`` with diffusers names.

Per quantized layer L (``P = L``, or ``L.linear`` when smoothed, msmodelslim's
NonFusionSmoothQuantWrapper; the diffusers layout has no wrappers): ``P.<suffix>`` for each tensor of
the scheme record, labelled with the scheme; ``P.bias`` float32, FLOAT (ascendv1: the scheme for
DUALSCALE layers, as msmodelslim); smoothed: ``L.div.mul_scale`` (diffusers: ``L.mul_scale``)
float32 [K], FLOAT.  FP4 weights in the float8_e4m3fn container (msmodelslim <= 26.0.0) on request.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from mxdit.loader.safetensors_io import SafetensorsFile, write_safetensors
from mxdit.quant.schemes import BY_LABEL, COMMON_TENSORS, FLOAT

LAYOUTS = ("mindie", "ascendv1", "diffusers")
FP4_CONTAINERS = ("uint8", "fp8")
#: msmodelslim AscendV1Saver.QUANT_TYPE_PRIORITY (a later entry wins)
QUANT_TYPE_PRIORITY = (
    "FLOAT", "W16A16S", "W8A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8", "WFP8AFP8_DYNAMIC",
    "W8A8_MXFP8", "W4A8_MXFP", "W4A4_DYNAMIC", "W4A4_MXFP4", "W4A4_MXFP4_DUALSCALE",
)
ASCENDV1_DESC = "quant_model_description.json"
ASCENDV1_WEIGHTS = "quant_model_weights"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
GB = 1 << 30


@dataclass
class Entry:
    """One tensor to write: its name, description label, dtype, shape and a function producing it."""

    name: str
    label: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * self.dtype.itemsize


def model_quant_type(schemes: Iterable[str]) -> str:
    """msmodelslim's ``model_quant_type``: the highest-priority scheme present."""
    return max(schemes, key=QUANT_TYPE_PRIORITY.index)


def quantized_layer_entries(
    base: str, scheme: str, n: int, k: int, take: Callable[[str], torch.Tensor], *,
    layout: str, smoothed: bool, fp4_container: str = "uint8",
    read_bias: Optional[Callable[[], torch.Tensor]] = None,
) -> tuple[list[Entry], Optional[Entry]]:
    """The entries of one quantized [N, K] layer named ``base`` (in the layout's names), from its
    scheme record: ``(weight entries, bias entry or None)``.  ``take(suffix)`` returns the tensor of
    one record suffix (or ``"mul_scale"``) in parameter shape; it is written in the on-disk shape."""
    rec = BY_LABEL[scheme]
    wrap = smoothed and layout != "diffusers"
    pre = base + ".linear" if wrap else base
    out: list[Entry] = []
    if smoothed:
        ms = COMMON_TENSORS["mul_scale"]
        out.append(Entry(base + (".div.mul_scale" if wrap else ".mul_scale"), FLOAT, ms.dtype, ms.shape_for(n, k),
                         lambda: take("mul_scale")))
    for suffix, spec in rec.tensors.items():
        dtype, shape = spec.dtype, spec.disk_shape_for(n, k)
        convert = spec.to_disk
        if suffix == "weight" and rec.fmt == "fp4_e2m1" and fp4_container == "fp8":
            from mxdit.formats import fp4_to_fp8_container

            dtype, shape, convert = torch.float8_e4m3fn, (n, k), fp4_to_fp8_container
        out.append(Entry(f"{pre}.{suffix}", scheme, dtype, shape,
                         lambda suffix=suffix, convert=convert: convert(take(suffix))))
    bias = None
    if read_bias is not None:
        label = scheme if (layout == "ascendv1" and scheme == "W4A4_MXFP4_DUALSCALE") else FLOAT
        bias = Entry(pre + ".bias", label, COMMON_TENSORS["bias"].dtype, (n,), read_bias)
    return out, bias


def plan_shards(entries: list[Entry], layout: str, shard_size_gb: float, mqt: str) -> list[tuple[str, list[Entry]]]:
    """[(file name, entries)] as the layout's saver splits them."""
    if layout == "mindie":
        return [(f"quant_model_weight_{mqt.lower()}.safetensors", entries)]
    max_size = int(shard_size_gb * GB)
    groups: list[list[Entry]] = []
    if max_size > 0:
        cur: list[Entry] = []
        size = 0
        for e in entries:
            if cur and size + e.nbytes >= max_size:
                groups.append(cur)
                cur, size = [], 0
            cur.append(e)
            size += e.nbytes
        if cur:
            groups.append(cur)
    stem = ASCENDV1_WEIGHTS if layout == "ascendv1" else DIFFUSERS_WEIGHTS
    if not groups or (layout == "diffusers" and len(groups) == 1):
        return [(f"{stem}.safetensors", entries)]
    n = len(groups)
    return [(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def write_export(
    out_dir: str, entries: list[Entry], *, layout: str, schemes: Iterable[str], shard_size_gb: float,
    descriptions: Optional[dict[str, str]] = None, on_tensor: Optional[Callable[[], None]] = None,
    write_description: bool = True,
) -> tuple[Optional[str], list[str], str]:
    """Write ``entries`` (safetensors shards, index) and the description into ``out_dir``; read the
    files back with the reader's header checks (every planned tensor exactly once, as planned).
    ``descriptions``: extra description-only keys (``<attn>.quant_type``); ``write_description=False``:
    weights only (an unquantized model, :func:`mxdit.save_quantized`).
    Returns (description path, weight files, model_quant_type)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: valid layouts are {', '.join(LAYOUTS)}")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):  # pragma: no cover - internal invariant
        raise RuntimeError("internal: duplicate output tensor names")
    mqt = model_quant_type(set(schemes))
    shards = plan_shards(entries, layout, shard_size_gb, mqt)
    os.makedirs(out_dir, exist_ok=True)

    def counted(e: Entry):
        def produce():
            t = e.produce()
            if on_tensor is not None:
                on_tensor()
            return t
        return (e.name, e.dtype, e.shape, produce)

    files = []
    for fname, group in shards:
        path = os.path.join(out_dir, fname)
        write_safetensors(path, [counted(e) for e in group], metadata={"format": "pt"})
        files.append(path)
    if len(shards) > 1:
        stem = ASCENDV1_WEIGHTS if layout == "ascendv1" else DIFFUSERS_WEIGHTS
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.name: fname for fname, g in shards for e in g}}
        with open(os.path.join(out_dir, f"{stem}.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    seen: dict[str, Any] = {}
    for p in files:
        for k, info in SafetensorsFile(p).tensors.items():
            if k in seen:
                raise RuntimeError(f"internal: tensor '{k}' written twice")
            seen[k] = info
    if sorted(seen) != sorted(names):
        raise RuntimeError("internal: the written files do not hold exactly the planned tensors")

    if not write_description:
        return None, files, mqt
    labels = {e.name: e.label for e in entries}
    labels.update(descriptions or {})
    if layout == "mindie":
        desc_name = f"quant_model_description_{mqt.lower()}.json"
        description = {**labels, "model_quant_type": mqt}
    else:
        desc_name = ASCENDV1_DESC
        description = {**labels, "version": "1.0.0", "model_quant_type": mqt, "metadata": {},
                       "group_size": 32, "optional": {}}
    desc_path = os.path.join(out_dir, desc_name)
    with open(desc_path, "w", encoding="utf-8") as f:
        json.dump(description, f, indent=2)
    return desc_path, files, mqt


def write_config(out_dir: str, src_dir: str, config, layout: str) -> None:
    """``config.json`` of the export: the source's when it already has the layout's flavour
    (diffusers names for ``diffusers``, original Wan keys for the msmodelslim layouts), else
    written from ``config`` (a :class:`~mxdit.models.wan.config.WanTransformerConfig`)."""
    from mxdit.models.wan.config import is_original_config, read_config_json

    src_cfg = os.path.join(src_dir, "config.json")
    src = read_config_json(src_cfg) if os.path.isfile(src_cfg) else None
    dst = os.path.join(out_dir, "config.json")
    if layout == "diffusers":
        if src is not None and "num_attention_heads" in src:
            shutil.copy2(src_cfg, dst)
            return
        data = {"_class_name": "WanTransformer3DModel", **config.to_dict()}
    else:
        if src is not None and is_original_config(src):
            shutil.copy2(src_cfg, dst)
            return
        mt = "i2v" if config.in_channels == 36 else ("ti2v" if config.in_channels == 48 else "t2v")
        data = config.to_original_dict(mt)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
