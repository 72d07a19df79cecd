"""Online quantization configs: BF16 checkpoints quantized at load."""
from __future__ import annotations

import fnmatch
from typing import Optional, Sequence

from mxdit.quant.base import LinearMethod, QuantConfig
from mxdit.quant.schemes import BY_ONLINE, canonical_name


class OnlineQuantConfig(QuantConfig):
    """One online method for every selected layer.

    Args:
        method: an online scheme name (:func:`mxdit.quant.schemes.online_methods`:
            "mxfp8", "mxfp4", "mxfp4_dual", "fp8").
        include: glob patterns on layer prefixes to quantize (None: every layer).
        ignore: glob patterns on layer prefixes to leave unquantized (wins over include).
        act_round_mode: activation element rounding, "rint" (default) or "round" (vllm-ascend).
        scale_mode: weight scale rule for mxfp8 / mxfp4, "floor" (OCP, as the NPU's
            npu_dynamic_mx_quant) or "rceil".  Activations always use "floor", the
            NPU op's rule.
        backend: kernel backend override ("reference", "npu", "triton").
    """

    def __init__(
        self,
        method: str,
        *,
        include: Optional[Sequence[str]] = None,
        ignore: Sequence[str] = (),
        act_round_mode: str = "rint",
        scale_mode: str = "floor",
        backend: Optional[str] = None,
    ):
        method = canonical_name(method, what="online method", online_only=True)
        if method == "fp8" and act_round_mode != "rint":
            raise ValueError("the fp8 method rounds activations half to even (torch's cast); act_round_mode must be 'rint'")
        self.name = method
        self.include = None if include is None else tuple(include)
        self.ignore = tuple(ignore)
        scheme = BY_ONLINE[method]
        kw = dict(act_round_mode=act_round_mode, backend=backend)
        if "scale_mode" in scheme.online_options:  # the MX methods' weight scale rule (others ignore it)
            kw["scale_mode"] = scale_mode
        self.method: LinearMethod = scheme.make_method(online=True, **kw)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def selects(self, prefix: str) -> bool:
        if any(fnmatch.fnmatchcase(prefix, p) for p in self.ignore):
            return False
        return self.include is None or any(fnmatch.fnmatchcase(prefix, p) for p in self.include)

    def get_quant_method(self, layer, prefix: str) -> Optional[LinearMethod]:
        return self.method if self.selects(prefix) else None
