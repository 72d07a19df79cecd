"""What a transformer directory holds: its layout, weight files, config and quantization.

Layouts ``load_transformer`` reads:

* **diffusers**: ``config.json`` + ``diffusion_pytorch_model*.safetensors``
  (single, sharded with ``.index.json``, or sharded without an index);
* **original Wan**: the same files (or any ``*.safetensors``) holding original
  names (``blocks.N.self_attn.q.weight``...), renamed on the fly; its
  ``config.json`` may be the original one (``dim``, ``num_heads``...);
* **msmodelslim export**: ``quant_model_description*.json`` +
  ``quant_model_weight*.safetensors`` (either saver), original names with the
  smooth-quant ``.linear.``/``.div.`` wrappers;
* **repacked** (``mxdit repack``): diffusers names, a renamed description and
  the original ``config.json``.

Config: ``config.json`` (diffusers or original keys) if present, else inferred
from the tensor shapes (every Wan2.x model has head_dim 128).

Quantization config resolution, in order (documented in the README):
1. an explicit ``quantization=`` (``"modelslim"`` reads the description found
   here and applies the name map — unlike SGLang's explicit flag);
2. a msmodelslim description file in the directory;
3. ``config.json``'s ``"quantization_config"`` (``{"quant_method": name, ...options}``);
4. the safetensors metadata key ``"quantization_config"`` (same JSON);
5. otherwise unquantized.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from mxdit.layers.quantize import DEFAULT_ONLINE_INCLUDE, online_scope  # the one default-scope table
from mxdit.loader.safetensors_io import CheckpointError, CheckpointFiles, index_weight_map, resolve_weight_files
from mxdit.models.wan.config import WanTransformerConfig, read_config_json as _read_config_json
from mxdit.models.wan.names import is_original_layout, original_to_diffusers, strip_prefix
from mxdit.quant import QuantConfig, get_quant_config
from mxdit.quant.modelslim import DESCRIPTION_FILE, DESCRIPTION_GLOB, WEIGHT_GLOB, find_description_file, load_description, strip_modelslim_wrappers
from mxdit.quant.schemes import canonical_name



def model_name(checkpoint_name: str, original: bool) -> str:
    """The model's parameter name for a checkpoint tensor name (the one mapping the loader,
    the description normalisation and the repack tool share)."""
    name = strip_modelslim_wrappers(strip_prefix(checkpoint_name))
    return original_to_diffusers(name) if original else name


def model_name_map(keys, original: bool, where: str) -> dict[str, str]:
    """``{model name: checkpoint name}`` for all ``keys``; two keys mapping to one name is an error."""
    names: dict[str, str] = {}
    for k in keys:
        m = model_name(k, original)
        if m in names:
            raise ValueError(f"'{where}': checkpoint tensors '{names[m]}' and '{k}' both map to '{m}'")
        names[m] = k
    return names


@dataclass
class TransformerCheckpoint:
    directory: str
    files: CheckpointFiles
    layout: str  # "diffusers" | "original" | "modelslim" | "repacked"
    original_names: bool
    config: WanTransformerConfig
    description_path: Optional[str] = None
    names: dict[str, str] = field(default_factory=dict)  # model name -> checkpoint name

    def quant_config(self, quantization: Optional[str], options: dict[str, Any]) -> tuple[Optional[QuantConfig], str]:
        """Resolve the quant config (see the module docstring); returns (config, where it came from)."""
        opts = dict(options)
        name_map: Callable[[str], str] = lambda n: original_to_diffusers(n) if self.original_names else n
        if quantization is not None:
            q = canonical_name(quantization)
            if q == "modelslim":
                if self.description_path is None:
                    raise FileNotFoundError(
                        f"quantization='modelslim' but '{self.directory}' has no {DESCRIPTION_FILE} or {DESCRIPTION_GLOB}"
                    )
                return self._modelslim(opts), f"explicit modelslim ({self.description_path})"
            return _online(q, opts), f"explicit {q} (online)"
        if self.description_path is not None:
            return self._modelslim(opts), f"description {self.description_path}"
        cfg_qc = self._config_json_quant()
        if cfg_qc:
            return _from_json(cfg_qc, opts, "config.json"), "config.json quantization_config"
        md = self.files.metadata.get("quantization_config")
        if md:
            try:
                md_qc = json.loads(md)
            except json.JSONDecodeError:
                raise ValueError(f"{self.directory}: safetensors metadata 'quantization_config' is not JSON") from None
            return _from_json(md_qc, opts, "safetensors metadata"), "safetensors metadata"
        if opts:
            raise ValueError(f"quantization options {sorted(opts)} given but no quantization was requested or found")
        return None, "none (unquantized)"

    def _modelslim(self, opts):
        cfg_qc = self._config_json_quant()
        if isinstance(cfg_qc, dict) and cfg_qc.get("quant_method") == "modelslim":
            # mxdit.save_quantized records the load-time numerics beside the description; explicit options win
            opts = {**{k: v for k, v in cfg_qc.items() if k in ("act_round_mode", "smooth_in_quant")}, **opts}
        desc = load_description(self.description_path)
        desc_original = is_original_layout(strip_modelslim_wrappers(k) for k in desc if "." in k)
        return get_quant_config(
            "modelslim", description=desc, source=self.description_path,
            name_map=(original_to_diffusers if desc_original else None), **opts,
        )

    def _config_json_quant(self) -> Optional[dict]:
        p = os.path.join(self.directory, "config.json")
        if os.path.isfile(p):
            return read_config_json(p).get("quantization_config")
        return None


def _online(q: str, opts: dict) -> QuantConfig:
    return get_quant_config(q, **online_scope(opts))


def _from_json(qc: dict, opts: dict, where: str) -> QuantConfig:
    if not isinstance(qc, dict) or "quant_method" not in qc:
        raise ValueError(f"{where}: quantization_config must be an object with 'quant_method'")
    qc = dict(qc)
    q = canonical_name(qc.pop("quant_method"))
    if q == "modelslim":
        raise ValueError(f"{where}: quant_method 'modelslim' needs a description file next to the weights")
    return _online(q, {**qc, **opts})


def _weight_paths(directory: str) -> tuple[list[str], bool]:
    """(files, is_modelslim_export)."""
    files = resolve_weight_files(directory, "diffusion_pytorch_model")
    if files:
        return files, False
    ms = sorted(glob.glob(os.path.join(directory, WEIGHT_GLOB)))
    if ms:
        return ms, True
    anyf = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if anyf:
        return anyf, False
    raise FileNotFoundError(
        f"no weights in '{directory}': expected diffusion_pytorch_model*.safetensors, "
        f"{WEIGHT_GLOB} (msmodelslim) or another *.safetensors file"
    )


def open_checkpoint(path: str, *, config: Optional[WanTransformerConfig | dict] = None) -> TransformerCheckpoint:
    """Inspect a transformer directory (headers only; no tensor data is read)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"transformer path '{path}' does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"transformer path '{path}' must be a directory (config.json + *.safetensors)")
    if os.path.isfile(os.path.join(path, "model_index.json")) and not glob.glob(os.path.join(path, "*.safetensors")):
        raise ValueError(
            f"'{path}' is a pipeline directory; pass its transformer subdirectory ('{path}/transformer' or 'transformer_2')"
        )
    paths, is_ms = _weight_paths(path)
    stem = "diffusion_pytorch_model"
    files = CheckpointFiles(paths, index_weight_map(path, stem), os.path.join(path, f"{stem}.safetensors.index.json"))
    keys = files.keys()
    original = is_original_layout(strip_modelslim_wrappers(k) for k in keys)
    desc_path = None
    if glob.glob(os.path.join(path, DESCRIPTION_FILE)) or glob.glob(os.path.join(path, DESCRIPTION_GLOB)):
        desc_path = find_description_file(path)
    layout = "modelslim" if is_ms else ("repacked" if desc_path else ("original" if original else "diffusers"))
    names = model_name_map(keys, original, path)
    if config is None:
        cfg_path = os.path.join(path, "config.json")
        if os.path.isfile(cfg_path):
            config = config_from_json(cfg_path)
        else:
            config = infer_config({m: files.info(k).shape for m, k in names.items()}, path)
    elif isinstance(config, dict):
        config = WanTransformerConfig.from_dict(config)
    return TransformerCheckpoint(path, files, layout, original, config, desc_path, names)


def read_config_json(path: str) -> dict:
    """A ``config.json``, strictly parsed; it must be a JSON object (the one reader, raising CheckpointError)."""
    return _read_config_json(path, "config.json", error=CheckpointError)


def config_from_json(path: str) -> WanTransformerConfig:
    """The transformer config of a ``config.json`` (diffusers or original keys); a wrong-typed
    or out-of-range field is one :class:`CheckpointError` naming the file."""
    cfg = read_config_json(path)
    try:
        return WanTransformerConfig.from_config(cfg)  # diffusers or original keys (is_original_config)
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"'{path}': {msg}") from None


_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def infer_config(shapes: dict[str, tuple[int, ...]], where: str) -> WanTransformerConfig:
    """A Wan config from diffusers-named tensor shapes (for exports without config.json)."""
    def need(name):
        if name not in shapes:
            raise ValueError(f"'{where}' has no config.json and no '{name}' tensor to infer the architecture from")
        return shapes[name]

    pe = need("patch_embedding.weight")  # [dim, in, pt, ph, pw]
    dim, in_ch, patch = pe[0], pe[1], tuple(pe[2:])
    head_dim = 128
    if dim % head_dim:
        raise ValueError(f"'{where}': model width {dim} is not a multiple of 128; add a config.json")
    layers = 1 + max((int(m.group(1)) for n in shapes if (m := _BLOCK_RE.match(n))), default=-1)
    out = need("proj_out.weight")[0] // (patch[0] * patch[1] * patch[2])
    return WanTransformerConfig(
        patch_size=patch, num_attention_heads=dim // head_dim, attention_head_dim=head_dim,
        in_channels=in_ch, out_channels=out, text_dim=need("condition_embedder.text_embedder.linear_1.weight")[1],
        freq_dim=need("condition_embedder.time_embedder.linear_1.weight")[1],
        ffn_dim=need("blocks.0.ffn.net.0.proj.weight")[0] if layers else 13824, num_layers=layers,
    )
