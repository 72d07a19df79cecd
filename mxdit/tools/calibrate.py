"""Calibration for ``mxdit quantize``: activation statistics and SmoothQuant factors.

Activation statistics
    :func:`collect_activation_stats` runs the BF16 model directory through
    :class:`mxdit.pipelines.WanVideoPipeline` on the calibration prompts (small
    sizes and few steps via options; latents only, no VAE decode) with forward
    hooks on the linear layers to be quantized.  Per layer it keeps the
    per-input-channel maximum of |x| over every token of every step (both CFG
    branches; for A14B each expert only sees the steps it runs) and a uniform
    random sample of input rows (bottom-k of random priorities), used by the
    quality report for the layer-output SQNR.

SmoothQuant (msmodelslim ``NonFusionSmoothQuantWrapper`` convention)
    Per input channel j of a quantized layer, ``s_j = max|X_j|^alpha /
    max|W_:,j|^(1 - alpha)`` (alpha = ``--smooth-alpha``, default 0.5).  The
    checkpoint stores ``<layer>.div.mul_scale = 1 / s`` (label FLOAT) and the
    wrapped weight ``W * s`` (per input column) under ``<layer>.linear.*``; the
    runtime computes ``linear(x * mul_scale)``, so
    ``y = (x / s) @ (W * s)^T = x @ W^T`` before quantization.

    ``s`` is rounded to the nearest power of two (in log2) and clamped to
    [2^-20, 2^20]; channels with a zero statistic get s = 1.  Powers of two
    make ``mul_scale`` exact in every dtype (runtimes cast it to bf16 -- MindIE-SD
    casts to the compute dtype), ``W * s`` exact, and the smoothed x exact in
    bf16, so smoothing itself adds no rounding; the MX quantizers see the same
    relative magnitudes inside each 32-block up to a factor < sqrt(2) per channel.

Data-free smoothing (``--smooth data-free``, no prompts needed)
    SmoothQuant with flat activation statistics (every max|X_j| equal): ``s_j =
    (g / c_j)^(1 - alpha)`` with ``c_j = max|W_:,j|`` and ``g`` the geometric
    mean of the non-zero ``c_j`` (so s is 1 for a typical channel), rounded to a
    power of two and clamped to [1/16, 16].  It equalises the per-input-channel
    weight maxima (``c_j s_j = c_j^alpha g^(1-alpha)``), which lowers the
    weight error of blocks mixing large and small columns, but divides the
    activations of large-weight channels by s -- it can hurt the activation
    error, and it never sees activation outliers.  Prefer calibration when
    prompts are available; the quality report shows the effect either way.
"""
from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from mxdit.formats.chunks import row_chunks

logger = logging.getLogger(__name__)

S_MIN_LOG2, S_MAX_LOG2 = -20, 20
DATA_FREE_MAX_LOG2 = 4


@dataclass
class LayerActStats:
    """Per-input-channel max |x| (float32 [K]) and a sample of input rows (bf16 [<=S, K])."""

    amax: torch.Tensor
    samples: torch.Tensor
    priorities: torch.Tensor
    tokens: int = 0


class ActivationCollector:
    """Forward hooks on the named linear layers of ``model`` (names as ``model.named_modules``)."""

    def __init__(self, model: nn.Module, layer_names: Iterable[str], *, samples: int = 32, seed: int = 0):
        self.model = model
        self.names = set(layer_names)
        self.samples = int(samples)
        self.gen = torch.Generator().manual_seed(seed)
        self.stats: dict[str, LayerActStats] = {}
        self._handles: list[Any] = []
        modules = dict(model.named_modules())
        missing = sorted(self.names - set(modules))
        if missing:
            raise ValueError(f"calibration: the model has no layers {missing[:5]}")
        self._modules = {n: modules[n] for n in self.names}

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            self.update(name, x.detach())
        return hook

    @torch.no_grad()
    def update(self, name: str, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        amax = x2.abs().amax(dim=0).to(torch.float32).cpu()
        rows = x2.shape[0]
        pr = torch.rand(rows, generator=self.gen)
        keep = min(self.samples, rows)
        sel = torch.topk(pr, keep, largest=False).indices
        sample = x2[sel.to(x2.device)].to(torch.bfloat16).cpu()
        st = self.stats.get(name)
        if st is None:
            self.stats[name] = LayerActStats(amax, sample, pr[sel], rows)
            return
        st.amax = torch.maximum(st.amax, amax)
        st.tokens += rows
        allp = torch.cat([st.priorities, pr[sel]])
        alls = torch.cat([st.samples, sample])
        k = min(self.samples, allp.numel())
        idx = torch.topk(allp, k, largest=False).indices
        st.priorities, st.samples = allp[idx], alls[idx]

    def __enter__(self) -> "ActivationCollector":
        for n, m in self._modules.items():
            self._handles.append(m.register_forward_hook(self._hook(n)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class CalibrationSettings:
    """Pipeline settings of the calibration run (``height``/``width`` None: the model's defaults).

    The defaults are small (256 x 448, 17 frames, 8 steps) so that calibration is affordable
    anywhere; the per-channel activation maxima of the linears depend little on the resolution.
    Both sizes are multiples of 32 (TI2V-5B) and of 16 (A14B).
    """

    steps: int = 8
    height: Optional[int] = 256
    width: Optional[int] = 448
    frames: int = 17
    seed: int = 0
    samples: int = 32
    guidance_scale: Optional[float] = None
    max_sequence_length: int = 512
    #: conditioning image for image-to-video models (I2V-A14B needs one; TI2V-5B takes one optionally)
    image: Optional[str] = None


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"calibration prompts file '{path}' has no prompts (one prompt per line)")
    return prompts


def collect_activation_stats(
    model_dir: str,
    prompts: list[str],
    layers: dict[str, list[str]],
    settings: CalibrationSettings,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, LayerActStats]]:
    """Run the BF16 pipeline of ``model_dir`` over ``prompts``; returns ``{expert: {layer: stats}}``.

    ``layers`` maps ``"transformer"`` / ``"transformer_2"`` to the model (diffusers)
    names of the layers to observe.  Raises ValueError if an expert with layers to
    observe ran on no step (raise the number of steps).
    """
    from mxdit.pipelines.wan import WanVideoPipeline

    pipe = WanVideoPipeline.from_pretrained(model_dir, device=device, dtype=torch.bfloat16)
    try:
        experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
        collectors = {
            e: ActivationCollector(experts[e], names, samples=settings.samples, seed=settings.seed + i)
            for i, (e, names) in enumerate(sorted(layers.items())) if names
        }
        for e in collectors:
            if experts[e] is None:
                raise ValueError(f"calibration: the pipeline has no {e}")
        with contextlib.ExitStack() as stack:
            for c in collectors.values():
                stack.enter_context(c)
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover
                tqdm = None
            it = prompts if tqdm is None else tqdm(prompts, desc="calibration", unit="prompt", disable=not progress)
            for i, prompt in enumerate(it):
                kw: dict[str, Any] = dict(
                    num_inference_steps=settings.steps, num_frames=settings.frames, seed=settings.seed + i,
                    output_type="latent", max_sequence_length=settings.max_sequence_length,
                )
                if settings.height is not None:
                    kw["height"] = settings.height
                if settings.width is not None:
                    kw["width"] = settings.width
                if settings.guidance_scale is not None:
                    kw["guidance_scale"] = settings.guidance_scale
                if settings.image is not None:
                    kw["image"] = settings.image
                pipe(prompt, **kw)
        out: dict[str, dict[str, LayerActStats]] = {}
        for e, c in collectors.items():
            if not c.stats:
                raise ValueError(
                    f"calibration: expert '{e}' ran on none of the {settings.steps} denoising steps; "
                    f"raise --calib-steps so that both experts run"
                )
            out[e] = c.stats
        return out
    finally:
        del pipe
        gc.collect()


# ---------------------------------------------------------------------------- smoothing factors
def _pow2(log2s: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.exp2(torch.round(log2s).clamp(lo, hi))


def smooth_factors(act_amax: torch.Tensor, w_colmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant s_j = a_j^alpha / c_j^(1-alpha), rounded to a power of two (float32 [K])."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth alpha must be in [0, 1], got {alpha}")
    a = act_amax.to(torch.float64)
    c = w_colmax.to(torch.float64)
    ok = (a > 0) & (c > 0) & torch.isfinite(a) & torch.isfinite(c)
    log2s = alpha * torch.log2(torch.where(ok, a, 1.0)) - (1 - alpha) * torch.log2(torch.where(ok, c, 1.0))
    log2s = torch.where(ok, log2s, 0.0)
    return _pow2(log2s, S_MIN_LOG2, S_MAX_LOG2).to(torch.float32)


def data_free_smooth_factors(w_colmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = (g / c_j)^(1-alpha), g = geometric mean of the non-zero c_j; power of two in [1/16, 16]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth alpha must be in [0, 1], got {alpha}")
    c = w_colmax.to(torch.float64)
    ok = (c > 0) & torch.isfinite(c)
    if not bool(ok.any()):
        return torch.ones_like(w_colmax, dtype=torch.float32)
    log2c = torch.log2(torch.where(ok, c, 1.0))
    log2g = log2c[ok].mean()
    log2s = torch.where(ok, (1 - alpha) * (log2g - log2c), 0.0)
    return _pow2(log2s, -DATA_FREE_MAX_LOG2, DATA_FREE_MAX_LOG2).to(torch.float32)


def column_amax(w: torch.Tensor) -> torch.Tensor:
    """max_i |W[i, j]| as float32 [K], in row chunks (no full-size temporary)."""
    out = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
    for r0, r1 in row_chunks(w.shape[0], w.shape[1]):
        out = torch.maximum(out, w[r0:r1].abs().amax(dim=0).to(torch.float32))
    return out


def describe_factors(s: Optional[torch.Tensor]) -> str:
    if s is None:
        return "-"
    l2 = torch.log2(s)
    return f"2^[{int(l2.min())},{int(l2.max())}]"


__all__ = [
    "ActivationCollector", "LayerActStats", "CalibrationSettings", "read_prompts", "collect_activation_stats",
    "smooth_factors", "data_free_smooth_factors", "column_amax", "describe_factors",
]
