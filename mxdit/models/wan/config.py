"""Wan2.x transformer configuration, Wan2.2 presets, per-model pipeline facts and the one
sampling-defaults table; the one reader of a model's JSON configs.

:class:`WanTransformerConfig` uses diffusers' field names (``WanTransformer3DModel``
``config.json``), so a diffusers checkpoint's config loads with
:meth:`WanTransformerConfig.from_json_file`.  Original Wan ``config.json`` files
(``dim``, ``num_heads``, ``in_dim``, ...) load with
:meth:`WanTransformerConfig.from_original_dict`.

Sources: Wan-Video/Wan2.2 ``wan/configs/*.py``; diffusers 0.42.1
``transformer_wan.py`` and ``scripts/convert_wan_to_diffusers.py``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from mxdit.fsutil import read_json_strict

logger = logging.getLogger(__name__)

#: The only qk-norm Wan2.x uses (RMSNorm over all heads x head_dim).  diffusers
#: stores the string but builds this norm whatever the value.
QK_NORM_RMS_ACROSS_HEADS = "rms_norm_across_heads"

#: Length of the text context the Wan2.1 I2V/FLF2V cross-attention assumes.
TEXT_LEN = 512


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_int(key: str, value: Any, *, optional: bool = False, minimum: int = 1) -> Optional[int]:
    if value is None and optional:
        return None
    # bool is an int subclass; a JSON true where a size belongs is a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
            value = int(value)
        else:
            want = "an int or null" if optional else "an int"
            raise TypeError(f"config key '{key}' must be {want}, got {value!r} ({_type_name(value)})")
    if value < minimum:
        raise ValueError(f"config key '{key}' must be >= {minimum}, got {value}")
    return value


def _check_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"config key '{key}' must be a number, got {value!r} ({_type_name(value)})")
    if not value > 0:
        raise ValueError(f"config key '{key}' must be > 0, got {value}")
    return float(value)


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"config key '{key}' must be a bool, got {value!r} ({_type_name(value)})")
    return value


def _check_patch_size(key: str, value: Any) -> tuple[int, int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise TypeError(f"config key '{key}' must be a list of 3 ints (t, h, w), got {value!r}")
    return tuple(_check_int(f"{key}[{i}]", v) for i, v in enumerate(value))  # type: ignore[return-value]


def read_config_json(path: str | os.PathLike, what: Optional[str] = None, *, error: type = ValueError
                     ) -> dict[str, Any]:
    """The one reader of a model's JSON configs (``config.json``, ``model_index.json``,
    ``scheduler_config.json``): strictly parsed (duplicate keys, NaN / Infinity and bad UTF-8
    are errors, see :func:`mxdit.fsutil.read_json_strict`) and a JSON object.  Any problem
    raises ``error`` (the caller's one error type) with a one-line message naming the file."""
    path = os.fspath(path)
    what = what or os.path.basename(path)
    if not os.path.isfile(path):
        raise error(f"missing file {path}")
    data = read_json_strict(path, what, error=error)
    if not isinstance(data, dict):
        got = "null" if data is None else type(data).__name__
        raise error(f"'{path}': {what} must be a JSON object, got {got}")
    return data


def is_original_config(config: Mapping[str, Any]) -> bool:
    """Whether a transformer ``config.json`` uses the original Wan keys (``dim``, ``num_heads``,
    ``in_dim``: Wan-Video ``WanModel``) rather than diffusers' (``num_attention_heads``, ...).
    The one config-level layout detector; the tensor-name one is
    :func:`mxdit.models.wan.names.is_original_layout`."""
    return "num_attention_heads" not in config and any(k in config for k in ("dim", "num_heads", "in_dim"))


@dataclass(frozen=True)
class WanTransformerConfig:
    """Architecture of one Wan2.x DiT, in diffusers' ``WanTransformer3DModel`` terms.

    The defaults are diffusers' defaults (the Wan2.x 14B shape).  ``qk_norm`` must be
    ``"rms_norm_across_heads"`` (every Wan2.x checkpoint); ``image_dim`` /
    ``added_kv_proj_dim`` / ``pos_embed_seq_len`` are only set for the Wan2.1 CLIP
    image branch (I2V / FLF2V) and are ``None`` for all Wan2.2 models.
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: Optional[int] = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: Optional[str] = QK_NORM_RMS_ACROSS_HEADS
    eps: float = 1e-6
    image_dim: Optional[int] = None
    added_kv_proj_dim: Optional[int] = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: Optional[int] = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass
        set_(self, "patch_size", _check_patch_size("patch_size", self.patch_size))
        for key in ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim",
                    "ffn_dim", "rope_max_seq_len"):
            set_(self, key, _check_int(key, getattr(self, key)))
        set_(self, "num_layers", _check_int("num_layers", self.num_layers, minimum=0))
        for key in ("out_channels", "image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            set_(self, key, _check_int(key, getattr(self, key), optional=True))
        set_(self, "cross_attn_norm", _check_bool("cross_attn_norm", self.cross_attn_norm))
        set_(self, "eps", _check_float("eps", self.eps))
        if self.qk_norm is not None and not isinstance(self.qk_norm, str):
            raise TypeError(f"config key 'qk_norm' must be a str or null, got {self.qk_norm!r}")
        if self.qk_norm != QK_NORM_RMS_ACROSS_HEADS:
            raise ValueError(
                f"config key 'qk_norm' is {self.qk_norm!r}; only {QK_NORM_RMS_ACROSS_HEADS!r} is supported "
                "(the norm every Wan2.x checkpoint uses)"
            )
        d = self.attention_head_dim
        if d % 2 or d < 6:
            raise ValueError(
                f"attention_head_dim={d} cannot be split for 3-D RoPE: it must be even and >= 6 "
                "(t/h/w parts d-4*(d//6), 2*(d//6), 2*(d//6) must all be even and non-empty)"
            )
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even (sin/cos halves)")
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("pos_embed_seq_len is set but image_dim is None: the position embedding "
                             "belongs to the image embedder")

    # ------------------------------------------------------------------ derived
    @property
    def inner_dim(self) -> int:
        """Model width: ``num_attention_heads * attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    hidden_size = inner_dim

    @property
    def out_dim(self) -> int:
        """Output channels (diffusers: ``out_channels or in_channels``)."""
        return self.out_channels or self.in_channels

    @property
    def patch_volume(self) -> int:
        p_t, p_h, p_w = self.patch_size
        return p_t * p_h * p_w

    # ------------------------------------------------------------------ (de)serialise
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "WanTransformerConfig":
        """Build from a diffusers ``config.json`` dict.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``,
        ``_name_or_path``) and keys that are not fields are ignored (logged at
        debug level); missing keys take diffusers' defaults; a value of the wrong
        type raises ``TypeError`` naming the key.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {_type_name(config)}")
        if is_original_config(config):
            raise ValueError(
                "this looks like an original Wan config (keys dim/num_heads/in_dim); "
                "use WanTransformerConfig.from_original_dict"
            )
        names = set(cls.field_names())
        kwargs = {k: v for k, v in config.items() if k in names}
        ignored = sorted(k for k in config if k not in names and not k.startswith("_"))
        if ignored:
            logger.debug("WanTransformerConfig.from_dict: ignoring unknown keys %s", ignored)
        return cls(**kwargs)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "WanTransformerConfig":
        """Build from a ``config.json`` dict in either layout (detected by :func:`is_original_config`)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {_type_name(config)}")
        return cls.from_original_dict(config) if is_original_config(config) else cls.from_dict(config)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "WanTransformerConfig":
        """Read a ``config.json`` (:func:`read_config_json`): diffusers layout, or original Wan layout (detected)."""
        return cls.from_config(read_config_json(path))

    @classmethod
    def from_original_dict(cls, config: Mapping[str, Any], *, clip_image_branch: bool = False
                           ) -> "WanTransformerConfig":
        """Build from an original Wan ``config.json`` (``WanModel``: ``dim``, ``num_heads``, ...).

        ``model_type`` is ``t2v`` / ``i2v`` / ``ti2v`` / ``flf2v`` / ...  Wan2.1
        and Wan2.2 both call their I2V model ``i2v`` but only Wan2.1 has the CLIP
        image branch (``img_emb``, ``k_img``/``v_img``); the config cannot tell
        them apart, so pass ``clip_image_branch=True`` for Wan2.1 I2V/FLF2V.  The
        default (False) is Wan2.2.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {_type_name(config)}")
        missing = [k for k in ("dim", "num_heads", "num_layers", "ffn_dim") if k not in config]
        if missing:
            raise ValueError(f"original Wan config lacks required keys {missing} (have {sorted(config)})")
        dim = _check_int("dim", config["dim"])
        heads = _check_int("num_heads", config["num_heads"])
        if dim % heads:
            raise ValueError(f"original Wan config: dim={dim} is not divisible by num_heads={heads}")
        window = config.get("window_size", (-1, -1))
        if tuple(window) != (-1, -1):
            raise ValueError(f"original Wan config: window_size={window!r} (local attention) is not supported")
        qk_norm = config.get("qk_norm", True)
        if qk_norm is not True:
            raise ValueError(f"original Wan config: qk_norm={qk_norm!r}; only qk_norm=True is supported")
        text_len = config.get("text_len", TEXT_LEN)
        if text_len != TEXT_LEN:
            logger.warning("original Wan config: text_len=%s; the model itself does not fix the text length, "
                           "but the Wan2.1 image branch assumes %d", text_len, TEXT_LEN)
        model_type = config.get("model_type", "t2v")
        image_dim = added_kv = pos_len = None
        if clip_image_branch:
            if model_type not in ("i2v", "flf2v"):
                raise ValueError(f"clip_image_branch=True but model_type={model_type!r} (expected i2v or flf2v)")
            image_dim, added_kv = 1280, dim  # CLIP ViT-H/14 penultimate features
            pos_len = 2 * 257 if model_type == "flf2v" else None
        in_dim = config.get("in_dim", 16)
        return cls(
            patch_size=tuple(config.get("patch_size", (1, 2, 2))),
            num_attention_heads=heads,
            attention_head_dim=dim // heads,
            in_channels=in_dim,
            out_channels=config.get("out_dim", in_dim),
            text_dim=config.get("text_dim", 4096),
            freq_dim=config.get("freq_dim", 256),
            ffn_dim=config["ffn_dim"],
            num_layers=config["num_layers"],
            cross_attn_norm=config.get("cross_attn_norm", True),
            eps=config.get("eps", 1e-6),
            image_dim=image_dim,
            added_kv_proj_dim=added_kv,
            pos_embed_seq_len=pos_len,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in diffusers' ``config.json`` field names (no ``_class_name``)."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    def to_original_dict(self, model_type: str = "t2v") -> dict[str, Any]:
        """The original Wan ``config.json`` fields for this architecture."""
        return {
            "model_type": model_type, "patch_size": list(self.patch_size), "text_len": TEXT_LEN,
            "in_dim": self.in_channels, "dim": self.inner_dim, "ffn_dim": self.ffn_dim,
            "freq_dim": self.freq_dim, "text_dim": self.text_dim, "out_dim": self.out_dim,
            "num_heads": self.num_attention_heads, "num_layers": self.num_layers,
            "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": self.cross_attn_norm, "eps": self.eps,
        }


# ---------------------------------------------------------------------------- presets
_A14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)

#: Transformer architecture per Wan2.2 model (one expert each for the A14B pair).
PRESETS: dict[str, WanTransformerConfig] = {
    "Wan2.2-T2V-A14B": WanTransformerConfig(**_A14B, in_channels=16, out_channels=16),
    "Wan2.2-I2V-A14B": WanTransformerConfig(**_A14B, in_channels=36, out_channels=16),
    "Wan2.2-TI2V-5B": WanTransformerConfig(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336,
                                          num_layers=30, in_channels=48, out_channels=48),
}


@dataclass(frozen=True)
class SamplingDefaults:
    """What a generation uses for an unset setting, per model kind.

    ``guidance_scale`` drives the high-noise expert ``transformer`` (``t >= boundary_ratio *
    num_train_timesteps``) and ``guidance_scale_2`` the low-noise ``transformer_2`` (diffusers'
    order; the original repo stores ``sample_guide_scale = (low, high)``).  For image-to-video
    the size is an area: the output keeps the input image's aspect ratio at ``height * width``
    (Wan2.2 ``generate.py --size``).
    """

    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: Optional[float]
    fps: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The one sampling-defaults table, per model kind (see :func:`model_kind`).  Sources:
#: Wan-Video/Wan2.2 @42bf4cf ``wan/configs/wan_{t2v,i2v}_A14B.py`` / ``wan_ti2v_5B.py`` (steps,
#: guidance, frames; ``shared_config.py`` fps 16) and ``generate.py`` (``--size 1280*720``, an area
#: for I2V: 720x1280); SGLang ``configs/sample/wan.py`` ``Wan2_2_*_SamplingParam`` (the same steps,
#: guidance and fps; TI2V-5B 704x1280, 121 frames, 24 fps).  T2V-A14B keeps 480x832 (diffusers'
#: ``WanPipeline`` default; SGLang and the original list it among the supported sizes).  The dense
#: Wan2.1-style kinds take diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` defaults.
SAMPLING_DEFAULTS: dict[str, SamplingDefaults] = {
    "t2v-a14b": SamplingDefaults(height=480, width=832, num_frames=81, num_inference_steps=40,
                                 guidance_scale=4.0, guidance_scale_2=3.0, fps=16),
    "i2v-a14b": SamplingDefaults(height=720, width=1280, num_frames=81, num_inference_steps=40,
                                 guidance_scale=3.5, guidance_scale_2=3.5, fps=16),
    "ti2v-5b": SamplingDefaults(height=704, width=1280, num_frames=121, num_inference_steps=50,
                                guidance_scale=5.0, guidance_scale_2=None, fps=24),
    "t2v": SamplingDefaults(height=480, width=832, num_frames=81, num_inference_steps=50,
                            guidance_scale=5.0, guidance_scale_2=None, fps=16),
    "i2v": SamplingDefaults(height=480, width=832, num_frames=81, num_inference_steps=50,
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


def sampling_defaults(kind: str) -> dict[str, Any]:
    """:data:`SAMPLING_DEFAULTS` of ``kind`` as a fresh dict."""
    try:
        return SAMPLING_DEFAULTS[kind].as_dict()
    except KeyError:
        raise ValueError(f"unknown Wan model kind {kind!r}; known: {sorted(SAMPLING_DEFAULTS)}") from None


def _sampling(name: str) -> property:
    return property(lambda self: getattr(SAMPLING_DEFAULTS[self.kind], name),
                    doc=f"``SAMPLING_DEFAULTS[kind].{name}`` (the one table)")


@dataclass(frozen=True)
class WanModelFacts:
    """Pipeline facts of one Wan2.2 model (Wan2.2 ``wan/configs``, diffusers, SGLang).

    The sampling defaults (``height``, ``guidance_scale``, ...) are read from
    :data:`SAMPLING_DEFAULTS` for the model's ``kind``; they are not stored twice.
    """

    kind: str
    two_experts: bool
    boundary_ratio: Optional[float]
    #: the original repo's ``sample_shift`` (SGLang uses the same values)
    flow_shift: float
    #: what diffusers' converted pipelines ship in their scheduler config
    flow_shift_diffusers: float
    vae_stride: tuple[int, int, int]
    z_dim: int
    expand_timesteps: bool
    num_train_timesteps: int = 1000
    text_len: int = TEXT_LEN

    height = _sampling("height")
    width = _sampling("width")
    num_frames = _sampling("num_frames")
    num_inference_steps = _sampling("num_inference_steps")
    guidance_scale = _sampling("guidance_scale")
    guidance_scale_2 = _sampling("guidance_scale_2")
    fps = _sampling("fps")

    @property
    def boundary_timestep(self) -> Optional[float]:
        return None if self.boundary_ratio is None else self.boundary_ratio * self.num_train_timesteps


MODEL_FACTS: dict[str, WanModelFacts] = {
    "Wan2.2-T2V-A14B": WanModelFacts(
        kind="t2v-a14b", two_experts=True, boundary_ratio=0.875,
        # Original sample_shift 12.0; diffusers' converted scheduler uses 3.0 for A14B.
        flow_shift=12.0, flow_shift_diffusers=3.0,
        vae_stride=(4, 8, 8), z_dim=16, expand_timesteps=False,
    ),
    "Wan2.2-I2V-A14B": WanModelFacts(
        kind="i2v-a14b", two_experts=True, boundary_ratio=0.9,
        # Original sample_shift 5.0 (its docstring suggests 3.0 at 480p); diffusers uses 3.0.
        flow_shift=5.0, flow_shift_diffusers=3.0,
        vae_stride=(4, 8, 8), z_dim=16, expand_timesteps=False,
    ),
    "Wan2.2-TI2V-5B": WanModelFacts(
        kind="ti2v-5b", two_experts=False, boundary_ratio=None,
        flow_shift=5.0, flow_shift_diffusers=5.0,
        vae_stride=(4, 16, 16), z_dim=48, expand_timesteps=True,
    ),
}


def get_preset(model_type: str) -> WanTransformerConfig:
    """The preset for ``model_type`` (a key of :data:`PRESETS`), with a helpful error."""
    try:
        return PRESETS[model_type]
    except KeyError:
        raise ValueError(f"unknown Wan model type {model_type!r}; known: {sorted(PRESETS)}") from None
