"""Checkpoint loading: safetensors streaming, layout detection, quant-config resolution."""
from mxdit.loader.checkpoint import DEFAULT_ONLINE_INCLUDE, TransformerCheckpoint, infer_config, model_name, open_checkpoint
from mxdit.loader.load import CheckpointMismatchError, LoadReport, check_checkpoint, load_transformer
from mxdit.loader.save import save_quantized
from mxdit.loader.safetensors_io import CheckpointError, CheckpointFiles, SafetensorsError, SafetensorsFile

__all__ = [
    "load_transformer", "check_checkpoint", "open_checkpoint", "TransformerCheckpoint", "CheckpointMismatchError", "LoadReport",
    "CheckpointFiles", "SafetensorsFile", "SafetensorsError", "CheckpointError", "infer_config", "model_name", "DEFAULT_ONLINE_INCLUDE", "save_quantized",
]
