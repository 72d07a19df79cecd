"""Offline msmodelslim checkpoints: the description file, the weight files,
and per-layer dispatch on the label of ``<prefix>.weight``.

Facts: ../shared/reference/ascend-npu-mx.md §3 (both savers, tensors per
type, smooth-quant wrapper), sglang-diffusion-mx.md §5-6 (and §12 for the
upstream defects avoided here: plain W4A4_MXFP4 is its own single-level scheme
and never asks for weight_dual_scale; an explicit "modelslim" still applies
the name map; unknown labels name the layer).

Names.  msmodelslim writes the model's *original* names, and wraps smoothed
linears: ``<p>.div.mul_scale`` and ``<p>.linear.{weight,...}``.  The
description is normalised once, at construction, into the model's tensor
names: :func:`strip_modelslim_wrappers` removes the wrapper components and the
caller's ``name_map`` (e.g. original Wan -> diffusers) renames the rest.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import re
from typing import Any, Callable, Optional

from mxdit.quant.base import LinearMethod, QuantConfig
from mxdit.quant.schemes import ATTENTION_LABELS, BY_LABEL, FLOAT

DESCRIPTION_FILE = "quant_model_description.json"  # ascendv1 saver
DESCRIPTION_GLOB = "quant_model_description_*.json"  # mindie-format saver
WEIGHT_GLOB = "quant_model_weight*.safetensors"  # quant_model_weights*.safetensors / quant_model_weight_<type>*.safetensors

#: description keys that are not tensors
HEADER_KEYS = {
    "model_quant_type", "version", "metadata", "group_size", "optional", "kv_cache_type", "fa_quant_type",
    "ignore", "packed_modules_mapping", "quant_method", "reverse_param_names_mapping",
}
#: the labels of a linear layer's weight: FLOAT and every scheme record's (mxdit.quant.schemes)
LABELS = {FLOAT, *BY_LABEL}

#: description keys that label a module, not a tensor: ``<attn>.quant_type`` ("FP8_DYNAMIC":
#: msmodelslim's FA3 dynamic quantization of that attention, W8A8F8 / W4A4F8)
DESCRIPTION_ONLY_SUFFIXES = (".quant_type",)
ATTENTION_QUANT_LABELS = set(ATTENTION_LABELS)


def is_description_only(key: str) -> bool:
    """True for description keys that name no tensor (``<attn>.quant_type``)."""
    return key.endswith(DESCRIPTION_ONLY_SUFFIXES)


_WRAPPER_RE = re.compile(r"\.(linear|div)(?=\.)")


def strip_modelslim_wrappers(name: str) -> str:
    """``a.b.linear.weight`` -> ``a.b.weight``; ``a.b.div.mul_scale`` -> ``a.b.mul_scale``.

    Only whole dotted components named ``linear`` or ``div`` are removed (the
    one place this rename lives; the repack tool uses it too).
    """
    return _WRAPPER_RE.sub("", name)


def find_description_file(directory: str) -> str:
    """The description JSON of an msmodelslim export directory (either saver)."""
    p = os.path.join(directory, DESCRIPTION_FILE)
    if os.path.isfile(p):
        return p
    found = sorted(glob.glob(os.path.join(directory, DESCRIPTION_GLOB)))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(
            f"no msmodelslim description in '{directory}': expected {DESCRIPTION_FILE} or {DESCRIPTION_GLOB}"
        )
    raise ValueError(f"several msmodelslim descriptions in '{directory}': {[os.path.basename(f) for f in found]}; keep one")


def find_weight_files(directory: str) -> list[str]:
    """msmodelslim weight files (sharded or not) in ``directory``."""
    files = sorted(glob.glob(os.path.join(directory, WEIGHT_GLOB)))
    if not files:
        raise FileNotFoundError(f"no msmodelslim weight files ({WEIGHT_GLOB}) in '{directory}'")
    return files


def load_description(path: str) -> dict[str, Any]:
    from mxdit.fsutil import read_json_strict

    desc = read_json_strict(path, "the description")  # duplicate keys / NaN are errors
    if not isinstance(desc, dict):
        raise ValueError(f"'{path}': an msmodelslim description must be a JSON object")
    return desc


class ModelSlimConfig(QuantConfig):
    """Per-layer schemes read from an msmodelslim description.

    Args:
        description: the description dict (tensor name -> label, plus headers).
        name_map: maps a description tensor name (after wrapper stripping) to
            the model's name; None keeps names as they are.
        ignore: glob patterns of layer prefixes to keep in float regardless.
        act_round_mode: activation rounding for the MX schemes ("rint" as
            MindIE-SD; vllm-ascend uses "round" for W4A4_MXFP4).
        smooth_in_quant: pass mul_scale to the dual-level quant op's
            smooth_scale (MindIE-SD) instead of multiplying first (SGLang);
            numerically identical, it only changes which NPU op does it.
        backend: kernel backend override.
    """

    name = "modelslim"

    def __init__(
        self,
        description: dict[str, Any],
        *,
        name_map: Optional[Callable[[str], str]] = None,
        ignore: tuple[str, ...] | list[str] = (),
        act_round_mode: str = "rint",
        smooth_in_quant: bool = False,
        backend: Optional[str] = None,
        source: str = "<description>",
    ):
        self.source = source
        self.ignore = tuple(ignore)
        self.method_kw = dict(act_round_mode=act_round_mode, backend=backend, smooth_in_quant=smooth_in_quant)
        self.header = {k: v for k, v in description.items() if k in HEADER_KEYS or not isinstance(v, str)}
        self.labels: dict[str, str] = {}  # model tensor name -> label
        self.original_names: dict[str, str] = {}  # model tensor name -> name in the checkpoint
        self.smoothed: set[str] = set()  # model layer prefixes with a mul_scale
        self.attention_quant: dict[str, str] = {}  # model attention prefix -> FA label (FP8_DYNAMIC)
        for key, label in description.items():
            if key in self.header:
                continue
            name = strip_modelslim_wrappers(key)
            if name_map is not None:
                name = name_map(name)
            if name in self.labels:
                raise ValueError(f"{source}: '{key}' and '{self.original_names[name]}' both map to '{name}'")
            self.labels[name] = label
            self.original_names[name] = key
            if is_description_only(name):
                if label not in ATTENTION_QUANT_LABELS:
                    raise ValueError(f"{source}: '{key}' is '{label}'; mxdit knows {sorted(ATTENTION_QUANT_LABELS)}")
                self.attention_quant[name[: -len(".quant_type")]] = label
            if name.endswith(".mul_scale"):  # <p>.div.mul_scale (export) or <p>.mul_scale (repacked)
                self.smoothed.add(name[: -len(".mul_scale")])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelSlimConfig":
        return cls(config)

    @classmethod
    def from_dir(cls, directory: str, **kw) -> "ModelSlimConfig":
        path = find_description_file(directory)
        return cls(load_description(path), source=path, **kw)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return [DESCRIPTION_FILE, DESCRIPTION_GLOB]

    @property
    def model_quant_type(self) -> Optional[str]:
        return self.header.get("model_quant_type")

    def label_of(self, prefix: str) -> str:
        return self.labels.get(prefix + ".weight", "")

    def get_quant_method(self, layer, prefix: str) -> Optional[LinearMethod]:
        if any(fnmatch.fnmatchcase(prefix, p) for p in self.ignore):
            return None
        label = self.label_of(prefix)
        smoothed = prefix in self.smoothed
        if label == FLOAT:
            if smoothed:
                raise ValueError(f"{self.source}: layer '{prefix}' is FLOAT but has a smooth-quant mul_scale")
            return None
        scheme = BY_LABEL.get(label)
        if scheme is not None:
            return scheme.make_method(online=False, smoothed=smoothed, **self.method_kw)
        if label == "":
            raise ValueError(
                f"{self.source}: no entry for layer '{prefix}' (looked for '{prefix}.weight' after mapping "
                f"names); the description must label every linear layer, FLOAT for unquantized ones"
            )
        raise NotImplementedError(
            f"{self.source}: layer '{prefix}' has quantization label '{label}', which mxdit does not "
            f"implement; supported: {sorted(LABELS)}"
        )
