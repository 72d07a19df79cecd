"""The Wan2.2 video generation pipeline (T2V-A14B, I2V-A14B, TI2V-5B).

:class:`WanVideoPipeline` reproduces the numerics of diffusers'
``WanPipeline`` / ``WanImageToVideoPipeline`` (same latent initialisation from
the generator, same text embeddings, same scheduler calls, same classifier-free
guidance formula, same expert switch, same TI2V per-token timesteps) but runs
in explicit, timed stages, SGLang style:

``input_validation -> text_encoding -> [image_encoding] -> latent_preparation
-> timestep_preparation -> denoising (per-step times) -> decoding``

and returns the decoded frames, the final latents and a performance record
(:mod:`mxdit.pipelines.timing`).

Two-expert (A14B) models: a step with timestep ``t >= boundary_ratio * 1000``
runs the high-noise expert ``transformer`` with ``guidance_scale``; the others
run the low-noise expert ``transformer_2`` with ``guidance_scale_2``.

Multi-device: the pipeline follows the active :mod:`mxdit.distributed` layout (set by
``mxdit.distributed.launch`` or ``init_parallel_state``): with CFG parallel the two
guidance branches run on different ranks and are gathered before the usual formula;
sequence parallel happens inside mxdit's transformer.  Every rank ends with the same
latents; only rank 0 decodes.

The transformers are any ``nn.Module`` with diffusers' ``WanTransformer3DModel``
forward signature and a ``.config`` (a diffusers ``FrozenDict`` or an attribute
object such as mxdit's own config dataclass): quantized or not, the pipeline
does not care.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from mxdit import distributed as mxdist

from .inputs import InputError, WanModelSpec, check_sampling_inputs
from .model_dir import ModelDirInfo, inspect_model_dir, model_kind, sampling_defaults
from .timing import PerfRecorder

logger = logging.getLogger(__name__)

__all__ = [
    "WanVideoPipeline",
    "WanVideoOutput",
    "default_transformer_loader",
    "diffusers_transformer_loader",
    "config_get",
    "psnr",
    "relative_error",
]

OUTPUT_TYPES = ("np", "pt", "latent")


# --------------------------------------------------------------------------- helpers
def config_get(config: Any, name: str, default: Any = None) -> Any:
    """Read ``name`` from a model config that is a dict / diffusers FrozenDict or an attribute object."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _module_config(module: Any, name: str, default: Any = None) -> Any:
    return config_get(getattr(module, "config", None), name, default)


def _module_device(module: Any) -> torch.device:
    dev = getattr(module, "device", None)
    if isinstance(dev, torch.device):
        return dev
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
        for b in module.buffers():
            return b.device
    return torch.device("cpu")


_FLOAT_COMPUTE = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _module_dtype(module: Any) -> torch.dtype:
    """The compute dtype of a (possibly quantized) module: ``.dtype`` or its first float parameter's."""
    dt = getattr(module, "dtype", None)
    if isinstance(dt, torch.dtype) and dt in _FLOAT_COMPUTE:
        return dt
    if isinstance(module, nn.Module):
        for p in module.parameters():
            if p.dtype in _FLOAT_COMPUTE:
                return p.dtype
    return torch.float32


def module_nbytes(module: Any) -> int | None:
    """Bytes held by a module's parameters and buffers (shared storage counted once)."""
    if not isinstance(module, nn.Module):
        return None
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        try:
            key = (t.untyped_storage().data_ptr(), t.device.index or 0)
            if t.device.type != "meta" and key[0] and key in seen:
                continue
            seen.add(key)
        except (RuntimeError, NotImplementedError):
            pass
        total += t.numel() * t.element_size()
    return total


def prompt_clean(text: str) -> str:
    """diffusers' Wan prompt cleaning itself (ftfy if installed, HTML unescape twice, whitespace collapsed)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as _diffusers_prompt_clean

    return _diffusers_prompt_clean(text)


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"transformer returned {type(out).__name__}; expected a tensor, a tuple or an object with .sample")


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, max_value: float = 255.0) -> float:
    """PSNR in dB between two frame arrays of the same shape (uint8 frames: max_value 255)."""
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = torch.mean((a - b) ** 2).item()
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(max_value**2 / mse)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| (Frobenius), in float64."""
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(ref.shape)}")
    den = torch.linalg.vector_norm(ref).item()
    num = torch.linalg.vector_norm(x - ref).item()
    return num / den if den else (0.0 if num == 0 else math.inf)


def _load_image(image: Any):
    """A PIL image from a path, PIL image, uint8 HWC array or tensor (returned as is); the
    value has passed :meth:`WanVideoPipeline.check_inputs`."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(Path(image)) as im:
            return im.convert("RGB")
    if isinstance(image, np.ndarray):  # checked by check_inputs: uint8 [H, W, 3]
        from PIL import Image

        return Image.fromarray(image, mode="RGB")
    return image  # PIL.Image or torch.Tensor, handled by diffusers' VideoProcessor


def _image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or a [C,H,W] / [B,C,H,W] tensor."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    return int(image.height), int(image.width)


# --------------------------------------------------------------------------- loaders
def diffusers_transformer_loader(
    path: str | Path, *, quantization: str | None = None, device: Any = "cpu",
    dtype: torch.dtype = torch.bfloat16, **quant_options: Any,
) -> nn.Module:
    """Load an unquantized transformer with diffusers' ``WanTransformer3DModel.from_pretrained``."""
    if quantization is not None or quant_options:
        raise ValueError(
            "diffusers_transformer_loader loads unquantized weights only "
            f"(got quantization={quantization!r}, options={sorted(quant_options)})"
        )
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def default_transformer_loader(
    path: str | Path, *, quantization: str | None = None, device: Any = "cpu",
    dtype: torch.dtype = torch.bfloat16, **quant_options: Any,
) -> nn.Module:
    """``mxdit.load_transformer(path, quantization=..., device=..., dtype=..., **quant_options)``."""
    from mxdit import load_transformer

    return load_transformer(str(path), quantization=quantization, device=device, dtype=dtype, **quant_options)


# --------------------------------------------------------------------------- output
class ComponentLoadError(ValueError):
    """transformers/diffusers could not load a component of the model directory (one line:
    the component, the directory and the library's reason)."""


def _component(name: str, root, load):
    try:
        return load()
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, ImportError) as e:
        reason = "; ".join(l.strip() for l in str(e).splitlines() if l.strip()) or type(e).__name__
        raise ComponentLoadError(f"cannot load the {name} of '{root}' ({type(e).__name__}: {reason})") from e


@dataclass
class WanVideoOutput:
    """Result of :meth:`WanVideoPipeline.__call__`.

    ``frames``: uint8 RGB video, ``[F, H, W, 3]`` for one prompt or ``[B, F, H, W, 3]``
    for a list of prompts (numpy for ``output_type="np"``, torch for ``"pt"``, None for
    ``"latent"``).  ``latents``: the final latents ``[B, C, F', H', W']`` (float32, on the
    execution device), as diffusers returns them with ``output_type="latent"``.
    ``perf``: the performance record (see :mod:`mxdit.pipelines.timing`).
    """

    frames: np.ndarray | torch.Tensor | None
    latents: torch.Tensor
    perf: dict[str, Any] = field(default_factory=dict)


class NonFiniteOutputError(RuntimeError):
    """The final latents hold NaN / Inf: the run failed, and no video may be written."""


def check_finite_output(out: WanVideoOutput) -> None:
    """Raise :class:`NonFiniteOutputError` when ``out.latents`` holds NaN or Inf (``generate`` and ``serve``
    call it before writing a video: a NaN run would otherwise be an all-black MP4)."""
    bad = ~torch.isfinite(out.latents)
    if bool(bad.any()):
        raise NonFiniteOutputError(
            f"the final latents hold {int(bad.sum())} non-finite value(s) of {out.latents.numel()}; no video written "
            "(check the weights, --guidance-scale and the scheduler's flow_shift)")


# --------------------------------------------------------------------------- pipeline
def _detected_quantization(transformer: Any) -> str | None:
    """What the loader resolved when no quantization was asked for (a description file,
    config.json or safetensors metadata): e.g. ``"modelslim (W4A4_MXFP4_DUALSCALE)"``."""
    qc = getattr(transformer, "quant_config", None)
    if qc is None:
        return None
    kind = getattr(qc, "model_quant_type", None)
    return f"{qc.name} ({kind})" if kind else qc.name


class WanVideoPipeline:
    """Wan2.1/2.2 text/image-to-video pipeline with timed stages.

    Args:
        tokenizer, text_encoder: UMT5 tokenizer and encoder (transformers).
        vae: diffusers ``AutoencoderKLWan`` (Wan2.1 VAE z16 or Wan2.2 VAE z48).
        scheduler: a diffusers flow-matching scheduler (``UniPCMultistepScheduler`` with
            ``prediction_type="flow_prediction", use_flow_sigmas=True``); copied per call.
        transformer: the (high-noise, for A14B) denoiser.
        transformer_2: the low-noise expert of a two-expert model.
        boundary_ratio: switch point of the experts (0.875 T2V-A14B, 0.9 I2V-A14B).
        expand_timesteps: Wan2.2 TI2V-5B per-token timesteps / first-frame conditioning.
        dtype: the transformers' compute dtype (default: read from ``transformer``).
        device: execution device (default: where ``transformer`` lives).
        model_name, quantization: recorded in the performance record.
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        transformer: nn.Module,
        transformer_2: nn.Module | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        model_name: str | None = None,
        quantization: str | None = None,
        model_load_ms: float | None = None,
    ):
        if transformer is None:
            raise ValueError("WanVideoPipeline needs a transformer")
        if boundary_ratio is not None:
            if not 0.0 <= float(boundary_ratio) <= 1.0:
                raise ValueError(f"boundary_ratio must be in [0, 1], got {boundary_ratio}")
            if transformer_2 is None:
                raise ValueError(f"boundary_ratio={boundary_ratio} needs transformer_2 (the low-noise expert)")
        elif transformer_2 is not None:
            logger.warning("transformer_2 given without boundary_ratio: it will not be used")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self.scheduler = scheduler
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_ratio = None if boundary_ratio is None else float(boundary_ratio)
        self.expand_timesteps = bool(expand_timesteps)
        self.dtype = dtype if dtype is not None else _module_dtype(transformer)
        self.device = torch.device(device) if device is not None else _module_device(transformer)
        self.model_name = model_name
        self.quantization = quantization
        self.model_load_ms = model_load_ms
        self.lora = None  # mxdit.loader.lora.PipelineLoRA when LoRAs are loaded (from_pretrained(loras=...))
        self.switches = None  # mxdit.pipelines.switches.apply_switches sets it

        vcfg = getattr(vae, "config", None)
        self.z_dim = int(config_get(vcfg, "z_dim", 16))
        self.vae_scale_factor_temporal = int(config_get(vcfg, "scale_factor_temporal", None) or 4)
        self.vae_scale_factor_spatial = int(config_get(vcfg, "scale_factor_spatial", None) or 8)
        self.patch_size = tuple(int(p) for p in _module_config(transformer, "patch_size", (1, 2, 2)))
        self.in_channels = int(_module_config(transformer, "in_channels", self.z_dim))
        if transformer_2 is not None and self.boundary_ratio is not None:
            for attr in ("in_channels", "out_channels", "patch_size"):
                a = _module_config(transformer, attr)
                b = _module_config(transformer_2, attr)
                if a is not None and b is not None and tuple(np.atleast_1d(a)) != tuple(np.atleast_1d(b)):
                    raise ValueError(f"transformer and transformer_2 disagree on {attr}: {a} vs {b}")
        self.kind = model_kind(
            in_channels=self.in_channels, z_dim=self.z_dim,
            two_experts=self.boundary_ratio is not None, expand_timesteps=self.expand_timesteps,
        )
        if self.kind in ("i2v-a14b", "i2v") and self.in_channels != 2 * self.z_dim + self.vae_scale_factor_temporal:
            raise ValueError(
                f"transformer in_channels={self.in_channels} matches neither text-to-video ({self.z_dim}) nor "
                f"image-to-video ({2 * self.z_dim + self.vae_scale_factor_temporal}) for a z_dim={self.z_dim} VAE"
            )
        if self.kind == "ti2v-5b" and self.in_channels != self.z_dim:
            raise ValueError(f"expand_timesteps needs in_channels == z_dim ({self.z_dim}), got {self.in_channels}")
        self.defaults = sampling_defaults(self.kind)
        sched_cfg = getattr(scheduler, "config", None)
        self.spec = WanModelSpec(
            name=model_name or "model", kind=self.kind, patch_size=self.patch_size,
            vae_scale_spatial=self.vae_scale_factor_spatial, vae_scale_temporal=self.vae_scale_factor_temporal,
            two_experts=self.boundary_ratio is not None, defaults=self.defaults,
            scheduler_config=dict(sched_cfg) if isinstance(sched_cfg, dict) else {},
            scheduler_config_name=f"{type(scheduler).__name__} config",
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        quantization: str | None = None,
        transformer_weights_path: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        transformer_loader: Callable[..., nn.Module] | None = None,
        text_encoder_dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype = torch.float32,
        flow_shift: float | None = None,
        attention_quantization: str | None = None,
        loras: Sequence[Any] | None = None,
        lora_merge_mode: str = "auto",
        **quant_options: Any,
    ) -> "WanVideoPipeline":
        """Load a diffusers-layout Wan model directory.

        Both experts go through ``transformer_loader(path, quantization=..., device=...,
        dtype=..., **quant_options)`` (default :func:`default_transformer_loader`, i.e.
        ``mxdit.load_transformer``), so ``quantization`` applies to both.
        ``transformer_weights_path`` replaces the ``transformer/`` path for ``transformer``
        only (SGLang semantics: ``transformer_2`` keeps its own directory).  The text
        encoder runs in ``text_encoder_dtype`` (default ``dtype``), the VAE in ``vae_dtype``
        (default float32, as diffusers' and Wan's reference scripts).  ``flow_shift``
        overrides the scheduler config's.  ``attention_quantization`` quantizes both
        experts' self-attention ("mxfp8", "mxfp8_rotated", "fp8_block",
        "fp8_block_rotated", "none"; None: SGLANG_DIFFUSION_ENABLE_MXFP8_ATTENTION, see
        :mod:`mxdit.layers.attention`).  ``quant_options`` go to the loader as they are
        (e.g. ``ignore=[...]`` for the quantization, ``progress=False`` for
        ``mxdit.load_transformer``).  ``loras``: :class:`mxdit.loader.lora.LoRASpec` list, applied
        with ``lora_merge_mode`` ("auto", "merge": into the float weights before quantization,
        "dynamic": unmerged); the pipeline's ``.lora`` (a ``PipelineLoRA``) switches them later.
        """
        import diffusers
        import transformers
        from transformers import AutoTokenizer

        from mxdit.layers.attention import resolve_attention_quantization

        attn_mode = resolve_attention_quantization(attention_quantization)
        info: ModelDirInfo = inspect_model_dir(model_dir)
        root = info.path
        device = torch.device(device)
        loader = transformer_loader or default_transformer_loader
        t0 = time.perf_counter()

        # the experts first: a bad quantization or weights path fails before anything else loads
        t_path = Path(transformer_weights_path) if transformer_weights_path is not None else root / "transformer"
        if not t_path.exists():
            raise FileNotFoundError(f"transformer weights path {t_path} does not exist")
        lora_merges, lora_per = {}, {}
        if loras:  # every LoRA file read and converted before any weight loads
            from mxdit.loader.lora import plan_load_time

            lora_merges, lora_per = plan_load_time(
                loras, ("transformer", "transformer_2") if info.boundary_ratio is not None else ("transformer",),
                lora_merge_mode)
        lm = lambda e: {"lora_merge": lora_merges[e]} if lora_merges.get(e) is not None else {}  # noqa: E731
        transformer = loader(str(t_path), quantization=quantization, device=device, dtype=dtype,
                             **lm("transformer"), **quant_options)
        transformer_2 = None
        if info.boundary_ratio is not None:
            if transformer_weights_path is not None:
                logger.info("transformer_weights_path applies to 'transformer' only; transformer_2 loads from %s",
                            root / "transformer_2")
            transformer_2 = loader(
                str(root / "transformer_2"), quantization=quantization, device=device, dtype=dtype,
                **lm("transformer_2"), **quant_options
            )
        tokenizer = _component("tokenizer", root, lambda: AutoTokenizer.from_pretrained(str(root / "tokenizer")))
        te_cls_name = (info.model_index.get("text_encoder") or [None, None])[1]
        te_cls = getattr(transformers, te_cls_name, None) if te_cls_name else None
        if te_cls is None:
            te_cls = transformers.UMT5EncoderModel
        text_encoder = _component("text_encoder", root, lambda: te_cls.from_pretrained(
            str(root / "text_encoder"), dtype=text_encoder_dtype or dtype))
        text_encoder = text_encoder.to(device).eval()

        vae = _component("vae", root, lambda: diffusers.AutoencoderKLWan.from_pretrained(
            str(root / "vae"), dtype=vae_dtype)).to(device).eval()

        sched_cls = getattr(diffusers, str(info.scheduler_config.get("_class_name", "")), None)
        if sched_cls is None or not hasattr(sched_cls, "from_pretrained"):
            sched_cls = diffusers.UniPCMultistepScheduler
        scheduler = _component("scheduler", root, lambda: sched_cls.from_pretrained(str(root / "scheduler")))
        if flow_shift is not None:
            scheduler = sched_cls.from_config(scheduler.config, flow_shift=float(flow_shift))

        for m in (transformer, transformer_2):
            if m is not None and hasattr(m, "eval"):
                m.eval()
            if m is not None and (attention_quantization is not None or attn_mode is not None):
                if not hasattr(m, "set_attention_quantization"):
                    raise TypeError(f"attention_quantization={attn_mode!r}: the loaded transformer "
                                    f"({type(m).__name__}) has no set_attention_quantization()")
                m.set_attention_quantization(attn_mode)
        lora_ctl = None
        if loras:
            from mxdit.loader.lora import attach_after_load

            lora_ctl = attach_after_load({"transformer": transformer, "transformer_2": transformer_2},
                                         lora_merges, lora_per)
        load_ms = (time.perf_counter() - t0) * 1e3

        pipe = cls(
            tokenizer, text_encoder, vae, scheduler, transformer, transformer_2,
            boundary_ratio=info.boundary_ratio, expand_timesteps=info.expand_timesteps,
            dtype=dtype, device=device, model_name=info.name,
            quantization=quantization or _detected_quantization(transformer), model_load_ms=load_ms,
        )
        pipe.lora = lora_ctl
        return pipe

    def memory_footprint(self) -> dict[str, int | None]:
        """Bytes of weights per component (quantized experts report their packed storage)."""
        return {
            "transformer": module_nbytes(self.transformer),
            "transformer_2": module_nbytes(self.transformer_2) if self.boundary_ratio is not None else None,
            "text_encoder": module_nbytes(self.text_encoder),
            "vae": module_nbytes(self.vae),
        }

    # ------------------------------------------------------------------ stages
    @property
    def size_multiple(self) -> tuple[int, int]:
        return self.spec.size_multiple

    def _encode_text(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        """UMT5 embeddings ``[B, max_sequence_length, D]``, zeroed past each prompt's length (diffusers)."""
        prompts = [prompt_clean(p) for p in prompts]
        inputs = self.tokenizer(
            prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = inputs.input_ids, inputs.attention_mask
        seq_lens = mask.gt(0).sum(dim=1).long()
        te_device = _module_device(self.text_encoder)
        te_dtype = _module_dtype(self.text_encoder)
        embeds = self.text_encoder(ids.to(te_device), mask.to(te_device)).last_hidden_state
        embeds = embeds.to(dtype=te_dtype, device=self.device)
        embeds = [u[:v] for u, v in zip(embeds, seq_lens)]
        embeds = torch.stack(
            [torch.cat([u, u.new_zeros(max_sequence_length - u.size(0), u.size(1))]) for u in embeds], dim=0
        )
        return embeds

    def _vae_latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents_mean, 1 / latents_std), shaped [1, z, 1, 1, 1], like diffusers."""
        cfg = self.vae.config
        mean = torch.tensor(config_get(cfg, "latents_mean")).view(1, self.z_dim, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(config_get(cfg, "latents_std")).view(1, self.z_dim, 1, 1, 1).to(
            like.device, like.dtype
        )
        return mean, inv_std

    def _encode_condition(self, image: torch.Tensor, num_frames: int, height: int, width: int,
                          batch_size: int) -> torch.Tensor:
        """Normalized VAE latents of the conditioning video (first frame, then zeros)."""
        image = image.unsqueeze(2)  # [B, C, 1, H, W]
        if self.expand_timesteps:
            video_condition = image
        else:
            video_condition = torch.cat(
                [image, image.new_zeros(image.shape[0], image.shape[1], num_frames - 1, height, width)], dim=2
            )
        video_condition = video_condition.to(device=_module_device(self.vae), dtype=self.vae.dtype)
        lat = self.vae.encode(video_condition).latent_dist.mode()
        lat = lat.repeat(batch_size, 1, 1, 1, 1).to(device=self.device, dtype=torch.float32)
        mean, inv_std = self._vae_latent_stats(lat)
        return (lat - mean) * inv_std

    def _i2v_mask(self, batch_size: int, num_frames: int, lh: int, lw: int) -> torch.Tensor:
        """The 4-channel first-frame mask of Wan I2V (``[B, 4, F', H', W']``), as diffusers builds it."""
        st = self.vae_scale_factor_temporal
        m = torch.ones(batch_size, 1, num_frames, lh, lw)
        m[:, :, list(range(1, num_frames))] = 0
        first = torch.repeat_interleave(m[:, :, 0:1], dim=2, repeats=st)
        m = torch.concat([first, m[:, :, 1:, :]], dim=2)
        m = m.view(batch_size, -1, st, lh, lw).transpose(1, 2)
        return m.to(self.device)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 video ``[B, F, H, W, 3]`` (torch, CPU)."""
        vae_device = _module_device(self.vae)
        lat = latents.to(vae_device, dtype=self.vae.dtype)
        mean, inv_std = self._vae_latent_stats(lat)
        lat = lat / inv_std + mean
        video = self.vae.decode(lat, return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
        video = (video.float() / 2 + 0.5).clamp(0, 1)
        video = (video * 255.0).round().to(torch.uint8)
        return video.permute(0, 2, 3, 4, 1).contiguous().cpu()

    # ------------------------------------------------------------------ call
    def _check_parallel(self, num_frames: int, height: int, width: int) -> None:
        """The active :mod:`mxdit.distributed` layout fits this model and size (one-line error)."""
        state = mxdist.get_parallel_state()
        if state is None or state.config.num_gpus == 1:
            return
        if state.sp_degree > 1:
            for name in ("transformer", "transformer_2"):
                m = getattr(self, name)
                if m is not None and not getattr(m, "supports_sequence_parallel", False):
                    raise ValueError(f"{name} ({type(m).__name__}) does not support sequence parallel; "
                                     "load it with mxdit.load_transformer (the default loader)")
        st, ss = self.vae_scale_factor_temporal, self.vae_scale_factor_spatial
        pt, ph, pw = self.patch_size
        seq_len = ((num_frames - 1) // st + 1) // pt * (height // ss // ph) * (width // ss // pw)
        state.config.validate(num_heads=_module_config(self.transformer, "num_attention_heads"), seq_len=seq_len)

    def resolve_size_for_image(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Height/width keeping the image's aspect ratio at the default area, snapped to the size multiple."""
        area = self.defaults["height"] * self.defaults["width"]
        mh, mw = self.size_multiple
        aspect = image_hw[0] / image_hw[1]
        h = max(mh, round(math.sqrt(area * aspect)) // mh * mh)
        w = max(mw, round(math.sqrt(area / aspect)) // mw * mw)
        return int(h), int(w)

    def check_inputs(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        image: Any = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        boundary_ratio: float | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
    ) -> None:
        """Raise :class:`~mxdit.pipelines.inputs.InputError` (a ``ValueError`` naming the field) on
        the first bad setting, as diffusers' ``check_inputs``; ``None`` means the model's default.

        The checks are :func:`mxdit.pipelines.inputs.check_sampling_inputs`, the same that
        ``mxdit generate`` / ``mxdit serve`` / ``mxdit quantize`` run before any model loads.
        """
        if output_type not in OUTPUT_TYPES:
            raise InputError("output_type", f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        check_sampling_inputs(
            self.spec, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, num_frames=num_frames, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            guidance_scale_2=guidance_scale_2, boundary_ratio=boundary_ratio, image=image,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        image: Any = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        boundary_ratio: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        max_sequence_length: int = 512,
        attention_kwargs: dict[str, Any] | None = None,
        progress: bool = False,
        step_callback: Callable[[int, int], None] | None = None,
    ) -> WanVideoOutput:
        """Generate a video.

        ``step_callback(done, total)`` is called after each denoising step (``mxdit serve``
        reports job progress with it).

        Unset sampling arguments take the model's defaults (``self.defaults``; e.g.
        T2V-A14B: 480x832, 81 frames, 40 steps, guidance 4.0 high-noise / 3.0 low-noise).
        ``num_frames`` must be ``4n+1``; ``height``/``width`` multiples of
        ``self.size_multiple`` (16 for A14B, 32 for TI2V-5B): unlike diffusers, nothing is
        silently rounded.  ``boundary_ratio`` overrides the model's switch point.  ``seed``
        makes a CPU generator when ``generator`` is not given (the same noise on every
        device).  Classifier-free guidance runs on a step when its scale is > 1 (diffusers
        decides once, from ``guidance_scale``; the two agree whenever both scales are > 1
        or both are <= 1).
        """
        rec = PerfRecorder(self.device)
        rec.start()
        d = self.defaults

        # ---------------------------------------------------------------- input validation
        with rec.stage("input_validation"):
            num_frames = d["num_frames"] if num_frames is None else num_frames
            num_inference_steps = d["num_inference_steps"] if num_inference_steps is None else num_inference_steps
            if image is None or height is not None or width is not None:  # else: from the image's aspect
                height = d["height"] if height is None else height
                width = d["width"] if width is None else width
            self.check_inputs(
                prompt, negative_prompt, image=image, height=height, width=width, num_frames=num_frames,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                guidance_scale_2=guidance_scale_2, boundary_ratio=boundary_ratio, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            )
            num_frames, num_inference_steps = int(num_frames), int(num_inference_steps)
            single = isinstance(prompt, str) or (prompt is None and prompt_embeds.shape[0] == 1)
            prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
            batch_size = len(prompts) if prompts is not None else int(prompt_embeds.shape[0])
            st = self.vae_scale_factor_temporal
            if image is not None:
                image = _load_image(image)
                if height is None and width is None:
                    height, width = self.resolve_size_for_image(_image_size(image))
            height, width = int(height), int(width)

            two_experts = self.boundary_ratio is not None
            if guidance_scale is None:
                guidance_scale = d["guidance_scale"]
                if guidance_scale_2 is None and two_experts:
                    guidance_scale_2 = d["guidance_scale_2"]
            if two_experts and guidance_scale_2 is None:
                guidance_scale_2 = guidance_scale  # diffusers
            guidance_scale = float(guidance_scale)
            guidance_scale_2 = None if guidance_scale_2 is None else float(guidance_scale_2)
            boundary = self.boundary_ratio if boundary_ratio is None else float(boundary_ratio)
            needs_uncond = guidance_scale > 1.0 or (two_experts and guidance_scale_2 > 1.0)

            self._check_parallel(num_frames, height, width)

            if generator is None and seed is not None:
                generator = torch.Generator("cpu").manual_seed(int(seed))

            image_tensor = None
            if image is not None:
                from diffusers.video_processor import VideoProcessor

                vp = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
                image_tensor = vp.preprocess(image, height=height, width=width).to(self.device, dtype=torch.float32)

        # ---------------------------------------------------------------- text encoding
        with rec.stage("text_encoding"):
            if prompt_embeds is None:
                prompt_embeds = self._encode_text(prompts, max_sequence_length)
            if needs_uncond and negative_prompt_embeds is None:
                neg = negative_prompt or ""
                neg = [neg] * batch_size if isinstance(neg, str) else list(neg)
                negative_prompt_embeds = self._encode_text(neg, max_sequence_length)
            prompt_embeds = prompt_embeds.to(self.device, self.dtype)
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.to(self.device, self.dtype)

        # ---------------------------------------------------------------- image encoding
        condition = None
        if image_tensor is not None:
            with rec.stage("image_encoding"):
                condition = self._encode_condition(image_tensor, num_frames, height, width, batch_size)

        # ---------------------------------------------------------------- latents
        with rec.stage("latent_preparation"):
            from diffusers.utils.torch_utils import randn_tensor

            lf = (num_frames - 1) // st + 1
            lh, lw = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
            shape = (batch_size, self.z_dim, lf, lh, lw)
            if isinstance(generator, list) and len(generator) != batch_size:
                raise ValueError(f"{len(generator)} generators for a batch of {batch_size}")
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
            else:
                if tuple(latents.shape) != shape:
                    raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
                latents = latents.to(device=self.device, dtype=torch.float32)
            if self.expand_timesteps:
                # per-token timestep mask; 0 on the first latent frame when it is the image
                ts_mask = torch.ones(1, 1, lf, lh, lw, dtype=torch.float32, device=self.device)
                if condition is not None:
                    ts_mask[:, :, 0] = 0
            elif condition is not None:
                condition = torch.concat([self._i2v_mask(batch_size, num_frames, lh, lw), condition], dim=1)

        # ---------------------------------------------------------------- timesteps
        with rec.stage("timestep_preparation"):
            scheduler = copy.deepcopy(self.scheduler)  # never mutate the pipeline's scheduler
            scheduler.set_timesteps(num_inference_steps, device=self.device)
            timesteps = scheduler.timesteps
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
            num_train = int(config_get(scheduler.config, "num_train_timesteps", 1000))
            boundary_timestep = None if boundary is None else boundary * num_train
            experts = [
                "transformer" if boundary_timestep is None or t >= boundary_timestep else "transformer_2"
                for t in timesteps
            ]
            if self.switches is not None:  # offload / cache-dit / compile (mxdit.pipelines.switches)
                self.switches.reset_counters()
                self.switches.begin(experts)

        # ---------------------------------------------------------------- denoising
        from tqdm.auto import tqdm

        p1, p2 = self.patch_size[1], self.patch_size[2]
        with rec.stage("denoising"):
            bar = tqdm(total=len(timesteps), desc="Denoising", unit="step", disable=not progress, file=sys.stderr)
            try:
                for i, t in enumerate(timesteps):
                    expert = experts[i]
                    with rec.step(i, expert=expert, timestep=float(t)):
                        if expert == "transformer":
                            model, scale = self.transformer, guidance_scale
                        else:
                            model, scale = self.transformer_2, guidance_scale_2
                        if self.expand_timesteps:
                            if condition is not None:
                                x = (1 - ts_mask) * condition + ts_mask * latents
                            else:
                                x = latents
                            ts = (ts_mask[0][0][:, ::p1, ::p2] * t).flatten()
                            timestep = ts.unsqueeze(0).expand(latents.shape[0], -1)
                        else:
                            x = latents if condition is None else torch.cat([latents, condition], dim=1)
                            timestep = t.expand(latents.shape[0])
                        x = x.to(self.dtype)
                        if scale > 1.0 and mxdist.cfg_parallel_active():
                            # CFG parallel: cond on CFG rank 0, uncond on rank 1, gathered; then the
                            # single-device formula below on every rank (equal latents everywhere)
                            embeds = prompt_embeds if mxdist.cfg_rank() == 0 else negative_prompt_embeds
                            noise_pred, noise_uncond = mxdist.gather_cfg(_first_output(model(
                                hidden_states=x, timestep=timestep, encoder_hidden_states=embeds,
                                attention_kwargs=attention_kwargs, return_dict=False,
                            )))
                            noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
                        else:
                            noise_pred = _first_output(model(
                                hidden_states=x, timestep=timestep, encoder_hidden_states=prompt_embeds,
                                attention_kwargs=attention_kwargs, return_dict=False,
                            ))
                        if scale > 1.0 and not mxdist.cfg_parallel_active():
                            noise_uncond = _first_output(model(
                                hidden_states=x, timestep=timestep, encoder_hidden_states=negative_prompt_embeds,
                                attention_kwargs=attention_kwargs, return_dict=False,
                            ))
                            noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
                        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                    bar.set_postfix_str(expert, refresh=False)
                    bar.update(1)
                    if step_callback is not None:
                        step_callback(i + 1, len(timesteps))
            finally:
                bar.close()
            if self.expand_timesteps and condition is not None:
                latents = (1 - ts_mask) * condition + ts_mask * latents

        # ---------------------------------------------------------------- decoding
        frames = None
        if output_type != "latent" and mxdist.is_rank0():  # under a process group only rank 0 decodes
            with rec.stage("decoding"):
                video = self._decode(latents)
                if single:
                    video = video[0]
                frames = video.numpy() if output_type == "np" else video
        rec.stop()

        settings = {
            "kind": self.kind,
            "height": height,
            "width": width,
            "num_frames": num_frames,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "guidance_scale_2": guidance_scale_2,
            "boundary_ratio": boundary,
            "num_high_noise_steps": experts.count("transformer") if boundary is not None else None,
            "seed": seed,
            "batch_size": batch_size,
            "image": image is not None,
        }
        perf = rec.to_dict(
            model=self.model_name,
            prompt=prompts[0] if prompts is not None and single else prompts,
            quantization=self.quantization,
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            settings=settings,
            model_load_ms=self.model_load_ms,
            model_memory_bytes=self.memory_footprint(),
        )
        if self.switches is not None:
            perf["switches"] = self.switches.report()
        return WanVideoOutput(frames=frames, latents=latents, perf=perf)
