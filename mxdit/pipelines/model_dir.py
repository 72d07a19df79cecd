"""Cheap inspection of a diffusers-layout Wan model directory (JSON files only).

The CLI validates its arguments against the model *before* any weights are
loaded; everything it needs (the kind of model, patch size, VAE strides,
defaults) is read here from ``model_index.json`` and the components'
``config.json`` files (with the one reader, :func:`mxdit.models.wan.config.read_config_json`);
the defaults come from the one table, :data:`mxdit.models.wan.config.SAMPLING_DEFAULTS`.
No torch or diffusers import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxdit.models.wan.config import model_kind, read_config_json, sampling_defaults

from .inputs import WanModelSpec


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or malformed (the message names the file)."""


def _read_json(path: Path) -> dict[str, Any]:
    return read_config_json(path, error=ModelDirError)


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
    def spec(self) -> WanModelSpec:
        """What the one input validator (:func:`mxdit.pipelines.inputs.check_sampling_inputs`) needs."""
        return WanModelSpec(
            name=self.name, kind=self.kind, patch_size=self.patch_size, vae_scale_spatial=self.vae_scale_spatial,
            vae_scale_temporal=self.vae_scale_temporal, two_experts=self.boundary_ratio is not None,
            defaults=self.defaults, scheduler_config=self.scheduler_config,
            scheduler_config_name=f"{self.path}/scheduler/scheduler_config.json",
        )

    @property
    def size_multiple(self) -> tuple[int, int]:
        """(height, width) must be multiples of these: VAE spatial stride x patch size."""
        return self.spec.size_multiple

    @property
    def needs_image(self) -> bool:
        return self.spec.needs_image

    @property
    def accepts_image(self) -> bool:
        return self.spec.accepts_image

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
        defaults=sampling_defaults(kind),
    )
