"""mxdit: Wan2.2 video diffusion with microscaling (MX) quantization, portable across Ascend NPU, NVIDIA GPU and CPU."""
__version__ = "0.1.0"


def load_transformer(path, **kwargs):
    """Load a Wan2.x transformer; see :func:`mxdit.loader.load_transformer`."""
    from mxdit.loader import load_transformer as _load

    return _load(path, **kwargs)


def quantize_module(module, method, **options):
    """Online-quantize the Wan block linears (default) of any module; see :func:`mxdit.layers.quantize.quantize_module`."""
    from mxdit.layers.quantize import quantize_module as _qm

    return _qm(module, method, **options)


def save_quantized(model, directory, **kwargs):
    """Write a quantized Wan transformer as a diffusers-layout directory; see :func:`mxdit.loader.save.save_quantized`."""
    from mxdit.loader.save import save_quantized as _save

    return _save(model, directory, **kwargs)
