"""Tiny Wan2.2 model directories for the pipeline / CLI tests, built once per test process."""
from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

from pathlib import Path

import torch
from torch import nn

_BUILT: dict[str, Path] = {}


def tiny_model_dir(tmp_path_factory, kind: str = "t2v-a14b") -> Path:
    """A tiny model directory of ``kind`` (built on first use, then shared by the process)."""
    from mxdit.pipelines.tiny import build_tiny_wan_model_dir

    if kind not in _BUILT:
        _BUILT[kind] = build_tiny_wan_model_dir(tmp_path_factory.mktemp(f"tiny-{kind}") / "model", kind)
    return _BUILT[kind]


def diffusers_loader(path, *, quantization=None, device="cpu", dtype=torch.float32, **opts):
    from mxdit.pipelines.wan import diffusers_transformer_loader

    return diffusers_transformer_loader(path, quantization=quantization, device=device, dtype=dtype, **opts)


def load_fp32(model_dir, **kw):
    """Our pipeline on ``model_dir`` in float32 with diffusers' transformer (no mxdit loader needed)."""
    from mxdit.pipelines.wan import WanVideoPipeline

    return WanVideoPipeline.from_pretrained(
        model_dir, dtype=torch.float32, text_encoder_dtype=torch.float32,
        transformer_loader=diffusers_loader, **kw,
    )


class RecordingTransformer(nn.Module):
    """Wraps a transformer; logs (name, timestep, encoder_hidden_states, output) per call."""

    def __init__(self, inner: nn.Module, name: str, log: list):
        super().__init__()
        self.inner = inner
        self.name = name
        self.log = log
        self.config = inner.config

    @property
    def dtype(self):
        return self.inner.dtype

    def forward(self, hidden_states, timestep, encoder_hidden_states, **kwargs):
        out = self.inner(hidden_states=hidden_states, timestep=timestep,
                         encoder_hidden_states=encoder_hidden_states, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        self.log.append((self.name, timestep.clone(), encoder_hidden_states, sample.clone()))
        return out


def loader_available() -> bool:
    import mxdit

    return callable(getattr(mxdit, "load_transformer", None))
