"""The NVIDIA GPU backend: Triton kernels for MX quantization and MX matmuls.

``TritonBackend`` (registered as ``"triton"``; ``select_backend`` picks it for CUDA
tensors) implements :class:`mxdit.kernels.base.KernelBackend`.  Importing this
package needs ``triton`` (an ImportError otherwise, which ``select_backend``
handles) but no GPU.  Kernels run on CUDA tensors, and on CPU tensors when
``TRITON_INTERPRET=1`` (the Triton interpreter; this is how the tests run).
Anything else (CPU tensors without the interpreter, E5M2 activations, shapes
the kernels do not take) falls back to the reference numerics.

Modules: :mod:`.kernels` (the kernels and what each computes), :mod:`.configs` (launch and
autotune configurations), :mod:`.weights` (prepared weights, the dual-level E4M3 expansion and its
measured error), :mod:`.backend` (the backend class, its options, what is verified),
:mod:`.attention` (the MXFP8 flash-attention kernel), :mod:`.aot_check` (compiling for sm_90a /
sm_100a without a GPU).
"""
import triton  # noqa: F401  (ImportError when triton is missing: select_backend falls back)

from mxdit.kernels.triton.backend import TritonBackend
from mxdit.kernels.triton.configs import interpreting
from mxdit.kernels.triton.weights import (
    DUAL_EXACT_MIN_L1, TritonDualWeight, TritonFP8Weight, TritonMXWeight, dual_expansion_stats, expand_dual_to_e4m3,
    normalize_dual_scales,
)

__all__ = [
    "TritonBackend", "TritonMXWeight", "TritonDualWeight", "TritonFP8Weight", "DUAL_EXACT_MIN_L1",
    "dual_expansion_stats", "expand_dual_to_e4m3", "interpreting", "normalize_dual_scales",
]
