"""Cheap inspection of a diffusers-layout Wan model directory (JSON files only).

The CLI validates its arguments against the model *before* any weights are
loaded; everything it needs (the kind of model, patch size, VAE strides,
defaults) is read here from ``model_index.json`` and the components'
``config.json`` files.  No torch or diffusers import.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or malformed (the message names the file)."""


#: Sampling defaults per model kind (Wan2.2 configs / SGLang / diffusers model cards).
#: guidance_scale is for the high-noise expert ``transformer``, guidance_scale_2 for the
#: low-noise expert ``transformer_2`` (diffusers order; the original Wan repo stores
#: ``(low, high)``).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "t2v-a14b": dict(height=480, width=832, num_frames=81, num_inference_steps=40,
                     guidance_scale=4.0, guidance_scale_2=3.0, fps=16),
    "i2v-a14b": dict(height=720, width=1280, num_frames=81, num_inference_steps=40,
                     guidance_scale=3.5, guidance_scale_2=3.5, fps=16),
    "ti2v-5b": dict(height=704, width=1280, num_frames=121, num_inference_steps=50,
                    guidance_scale=5.0, guidance_scale_2=None, fps=24),
    # dense Wan2.1-style models (diffusers WanPipeline defaults)
    "t2v": dict(height=480, width=832, num_frames=81, num_inference_steps=50,
                guidance_scale=5.0, guidance_scale_2=None, fps=16),
    "i2v": dict(height=480, width=832, num_frames=81, num_inference_steps=50,
                guidance_scale=5.0, guidance_scale_2=None, fps=16),
}


def model_kind(*, in_channels: int, z_dim: int, two_experts: bool, expand_timesteps: bool) -> str:
    """Classify a Wan model: ``t2v-a14b``, ``i2v-a14b``, ``ti2v-5b``, ``t2v`` or ``i2v``."""
    if expand_timesteps:
        return "ti2v-5b"
    concat_i2v = in_channels != z_dim
    if two_experts:
        return "i2v-a14b" if concat_i2v else "t2v-a14b"
    return "i2v" if concat_i2v else "t2v"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelDirError(f"missing file {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelDirError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelDirError(f"{path} does not hold a JSON object")
    return data


def _component_present(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None and entry[1] is not None


@dataclass
class ModelDirInfo:
    path: Path
    model_index: dict[str, Any]
    transformer_config: dict[str, Any]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    boundary_ratio: float | None
    expand_timesteps: bool
    has_transformer_2: bool
    in_channels: int
    out_channels: int
    patch_size: tuple[int, int, int]
    z_dim: int
    vae_scale_spatial: int
    vae_scale_temporal: int
    kind: str
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size_multiple(self) -> tuple[int, int]:
        """(height, width) must be multiples of these: VAE spatial stride x patch size."""
        return self.vae_scale_spatial * self.patch_size[1], self.vae_scale_spatial * self.patch_size[2]

    @property
    def needs_image(self) -> bool:
        return self.kind in ("i2v-a14b", "i2v")

    @property
    def accepts_image(self) -> bool:
        return self.kind in ("i2v-a14b", "i2v", "ti2v-5b")

    @property
    def flow_shift(self) -> float | None:
        return self.scheduler_config.get("flow_shift")


def inspect_model_dir(path: str | Path) -> ModelDirInfo:
    """Read the configs of a diffusers-layout Wan model directory; raise :class:`ModelDirError`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelDirError(f"model path {path} does not exist")
    if not path.is_dir():
        raise ModelDirError(f"model path {path} is not a directory")
    index = _read_json(path / "model_index.json")
    for comp in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer"):
        if not _component_present(index, comp):
            raise ModelDirError(f"{path / 'model_index.json'} has no {comp!r} component")
        if not (path / comp).is_dir():
            raise ModelDirError(f"missing component directory {path / comp}")
    tcfg = _read_json(path / "transformer" / "config.json")
    vcfg = _read_json(path / "vae" / "config.json")
    scfg_path = path / "scheduler" / "scheduler_config.json"
    scfg = _read_json(scfg_path)

    has_t2 = _component_present(index, "transformer_2")
    if has_t2 and not (path / "transformer_2").is_dir():
        raise ModelDirError(f"missing component directory {path / 'transformer_2'}")
    boundary = index.get("boundary_ratio")
    if boundary is not None and not has_t2:
        raise ModelDirError(
            f"{path / 'model_index.json'} sets boundary_ratio={boundary} but has no 'transformer_2' component"
        )
    expand = bool(index.get("expand_timesteps", False))

    try:
        in_ch = int(tcfg["in_channels"])
        out_ch = int(tcfg.get("out_channels") or in_ch)
        patch = tuple(int(p) for p in tcfg.get("patch_size", (1, 2, 2)))
        if len(patch) != 3:
            raise ValueError(f"patch_size {patch} is not 3-D")
    except (KeyError, TypeError, ValueError) as e:
        raise ModelDirError(f"bad transformer config {path / 'transformer' / 'config.json'}: {e}") from e
    try:
        z_dim = int(vcfg.get("z_dim", 16))
        spatial = int(vcfg.get("scale_factor_spatial") or (16 if z_dim == 48 else 8))
        temporal = int(vcfg.get("scale_factor_temporal") or 4)
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"bad vae config {path / 'vae' / 'config.json'}: {e}") from e
    try:
        boundary = None if boundary is None else float(boundary)
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"bad boundary_ratio in {path / 'model_index.json'}: {e}") from e

    kind = model_kind(in_channels=in_ch, z_dim=z_dim, two_experts=boundary is not None, expand_timesteps=expand)
    return ModelDirInfo(
        path=path, model_index=index, transformer_config=tcfg, vae_config=vcfg, scheduler_config=scfg,
        boundary_ratio=boundary, expand_timesteps=expand,
        has_transformer_2=has_t2, in_channels=in_ch, out_channels=out_ch, patch_size=patch, z_dim=z_dim,
        vae_scale_spatial=int(spatial), vae_scale_temporal=int(temporal), kind=kind,
        defaults=dict(MODEL_DEFAULTS[kind]),
    )
