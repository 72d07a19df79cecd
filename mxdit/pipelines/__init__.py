"""Generation pipelines.  Imports are lazy so ``import mxdit.pipelines`` stays cheap.

* :class:`WanVideoPipeline` / :class:`WanVideoOutput` (:mod:`mxdit.pipelines.wan`)
* :class:`PerfRecorder` (:mod:`mxdit.pipelines.timing`)
* :func:`write_mp4` (:mod:`mxdit.pipelines.video`)
* :func:`inspect_model_dir` (:mod:`mxdit.pipelines.model_dir`)
* :func:`build_tiny_wan_model_dir`, :func:`ensure_tiny_wan_model_dir` (:mod:`mxdit.pipelines.tiny`)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "WanVideoPipeline": "wan",
    "WanVideoOutput": "wan",
    "default_transformer_loader": "wan",
    "diffusers_transformer_loader": "wan",
    "psnr": "wan",
    "relative_error": "wan",
    "PerfRecorder": "timing",
    "write_json_atomic": "timing",
    "write_mp4": "video",
    "read_video": "video",
    "inspect_model_dir": "model_dir",
    "ModelDirInfo": "model_dir",
    "ModelDirError": "model_dir",
    "build_tiny_wan_model_dir": "tiny",
    "ensure_tiny_wan_model_dir": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
