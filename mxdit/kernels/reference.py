"""The reference backend: ``mxdit.formats`` numerics on any torch device."""
from mxdit.kernels.base import KernelBackend


class ReferenceBackend(KernelBackend):
    name = "reference"
