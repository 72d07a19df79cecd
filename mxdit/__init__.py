"""mxdit: Wan2.2 video diffusion with microscaling (MX) quantization, portable across Ascend NPU, NVIDIA GPU and CPU."""
__version__ = "0.1.0"
