"""Offline weight quantization of MX / int4 checkpoints (``mxdit quantize``): which rule per scheme,
the stored result, and what each rule costs.

The rules themselves (OCP floor / rceil, msmodelslim minmax / ceil_x / mse) are :mod:`mxdit.formats.rules`.

Dual-scale (W4A4_MXFP4_DUALSCALE, msmodelslim ``dualscale.py``): per 512
elements L0 = amax / 6.0 (a true fp32 division), W' = fp32(W) / L0 kept in
fp32, then per-32 MXFP4 on W' with the chosen rule; stored as
``weight_dual_scale`` float32 [N, K/512, 1].  An all-zero 512-block gets L0 = 0
and zero elements (msmodelslim would divide 0 by 0).

Measured weight error (``benchmarks/bench_weight_rules.py``: SQNR in dB of
the dequantized weight, higher is better; 1024 x 5120 fp32 matrices, seed 0):

====================  ============  =====  =====  ======  ======  =====
scheme                distribution  floor  rceil  minmax  ceil_x  mse
====================  ============  =====  =====  ======  ======  =====
W8A8_MXFP8            gaussian      30.67  31.54  30.67   n/a     31.54
W8A8_MXFP8            heavy-tailed  29.46  31.55  29.46   n/a     31.55
W4A4_MXFP4            gaussian      18.86  18.52  19.01   19.05   19.06
W4A4_MXFP4            heavy-tailed  16.96  16.38  17.10   17.20   17.23
W4A4_MXFP4_DUALSCALE  gaussian      18.77  18.96  19.06   19.08   19.08
W4A4_MXFP4_DUALSCALE  heavy-tailed  17.58  17.21  17.70   17.77   17.78
====================  ============  =====  =====  ======  ======  =====

(gaussian: N(0, 0.02), Wan-like; heavy-tailed: Student-t with 4 degrees of
freedom times a log-normal per-input-channel scale (sigma 0.5) times 0.02.)
``mse`` is the best rule for every scheme and distribution -- by construction,
see above -- at twice the quantization cost, so it is the default
(:data:`DEFAULT_RULES`).  What the measurement adds: for MXFP8 the floor rule
(OCP, and msmodelslim's minmax, identical up to ties) loses 0.9-2.1 dB
because E4M3 saturates scaled block maxima in [448, 512) to 448; the
per-block choice recovers it (rceil gets the same result for MXFP8 but is the
worst rule for MXFP4).  For MXFP4, msmodelslim's ceil_x (c = 7.25) is the best
fixed rule, 0.2-0.3 dB above OCP floor and within 0.03 dB of ``mse``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mxdit import formats as F
from mxdit.formats.chunks import row_chunks
from mxdit.formats.metrics import sqnr_db
from mxdit.formats.rules import BLOCK, DUAL_BLOCK, RULES, dual_level0, pack_codes, quantize_rule_2d
from mxdit.formats.rules import FORMAT_RULES as MX_FORMAT_RULES
from mxdit.quant.schemes import EXPORTABLE


#: exportable scheme label -> element format / K multiple (from the records, mxdit.quant.schemes)
SCHEME_FORMAT = {label: sch.fmt for label, sch in EXPORTABLE.items()}
SCHEME_K_MULTIPLE = {label: sch.k_multiple for label, sch in EXPORTABLE.items()}

#: rules each element format supports (int4: symmetric min-max per channel, quantize_int4_weight)
FORMAT_RULES = {**MX_FORMAT_RULES, "int4": ("minmax",)}
#: the measured winner per scheme (module docstring), as each record says
DEFAULT_RULES = {label: sch.default_rule for label, sch in EXPORTABLE.items()}

def check_rule(scheme: str, rule: str) -> None:
    if scheme not in SCHEME_FORMAT:
        raise ValueError(f"unknown scheme {scheme!r}; valid: {sorted(SCHEME_FORMAT)}")
    if rule not in FORMAT_RULES[SCHEME_FORMAT[scheme]]:
        raise ValueError(
            f"weight rule {rule!r} does not apply to {scheme}; valid: {list(FORMAT_RULES[SCHEME_FORMAT[scheme]])}"
        )


# ---------------------------------------------------------------------------- the stored result
@dataclass
class QuantizedWeight:
    """One quantized weight in msmodelslim storage.

    qdata: FP8 -> float8_e4m3fn [N, K]; FP4 -> packed uint8 [N, K/2] (even k in the low nibble).
    scale: uint8 E8M0 bytes [N, K/32].  dual_scale: float32 [N, K/512] (dual-scale only).
    """

    scheme: str
    qdata: torch.Tensor
    scale: torch.Tensor
    dual_scale: Optional[torch.Tensor] = None
    #: the dequantized weight, fp32 [N, K], when the quantizer was asked to keep it
    deq: Optional[torch.Tensor] = None

    @property
    def fmt(self) -> str:
        return SCHEME_FORMAT[self.scheme]

    def mx(self) -> F.MXTensor:
        return F.MXTensor(self.qdata, self.scale, self.fmt, BLOCK)

    def dual(self) -> F.DualMXTensor:
        return F.DualMXTensor(self.qdata, self.dual_scale, self.scale)

    def tensors(self) -> dict[str, torch.Tensor]:
        """{suffix: tensor} in parameter shape: exactly the scheme record's tensors (mxdit.quant.schemes)."""
        out = {"weight": self.qdata, "weight_scale": self.scale}
        if self.dual_scale is not None:
            out["weight_dual_scale"] = self.dual_scale
        if self.fmt == "int4":  # symmetric: msmodelslim writes the zero offset too
            out["weight_offset"] = torch.zeros_like(self.scale)
        return out

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]."""
        if self.deq is not None:
            return self.deq
        if self.fmt == "int4":
            return self.qdata.to(torch.float32) * self.scale
        if self.dual_scale is not None:
            return self.dual().dequantize(torch.float32)
        return self.mx().dequantize(torch.float32)


def quantize_weight(w: torch.Tensor, scheme: str, rule: Optional[str] = None, *,
                    keep_dequantized: bool = False) -> QuantizedWeight:
    """Quantize a 2-D weight [N, K] (bf16/fp16/fp32) for ``scheme`` with ``rule`` (default: DEFAULT_RULES).

    ``keep_dequantized``: also return the dequantized weight (``.deq``, fp32), computed from the
    quantizer's own values (cheaper than decoding the stored bytes; the same numbers).
    """
    rule = rule or DEFAULT_RULES[scheme]
    check_rule(scheme, rule)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    mult = SCHEME_K_MULTIPLE[scheme]
    if w.shape[1] % mult:
        raise ValueError(f"{scheme} needs K (in_features) to be a multiple of {mult}, got {w.shape[1]}")
    fmt = SCHEME_FORMAT[scheme]
    n, k = w.shape
    if fmt == "int4":
        q, scale = quantize_int4_weight(w)
        return QuantizedWeight(scheme, q, scale, None, q.to(torch.float32) * scale if keep_dequantized else None)
    if scheme == "W4A4_MXFP4_DUALSCALE":
        l0 = torch.empty(n, k // DUAL_BLOCK, dtype=torch.float32, device=w.device)
        codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
        scale = torch.empty(n, k // BLOCK, dtype=torch.uint8, device=w.device)
        deq = torch.empty(n, k, dtype=torch.float32, device=w.device) if keep_dequantized else None
        for r0, r1 in row_chunks(n, k):
            l0c, wp = dual_level0(w[r0:r1])
            c, s, d = quantize_rule_2d(wp, fmt, rule, keep_dequantized)
            l0[r0:r1], codes[r0:r1], scale[r0:r1] = l0c, c, s
            if keep_dequantized:
                deq[r0:r1] = (d.reshape(r1 - r0, k // DUAL_BLOCK, DUAL_BLOCK) * l0c.unsqueeze(-1)).reshape(r1 - r0, k)
        return QuantizedWeight(scheme, pack_codes(codes, fmt), scale, l0, deq)
    codes, scale, deq = quantize_rule_2d(w, fmt, rule, keep_dequantized)
    return QuantizedWeight(scheme, pack_codes(codes, fmt), scale, None, deq)


INT4_MAX = 7.0


def quantize_int4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W4A4_DYNAMIC weights, symmetric min-max per output channel (the "minmax" rule):
    scale = max_k |w| / 7 (fp32; all-zero rows get fp32 tiny), q = round(w / scale) (half to even),
    clamped to [-8, 7].  Returns (q int8 [N, K], scale float32 [N, 1]); weight_offset is zero.

    msmodelslim's W4A4_DYNAMIC processor (ir/w4a4_dynamic.py, mx-attention.md §5) also offers
    asymmetric weights; SGLang's NPU kernel ignores weight_offset, so mxdit writes symmetric ones only.
    That msmodelslim's symmetric observer is exactly this min-max rule is our reading, not verified
    against its code here.
    """
    wf = w.to(torch.float32)
    amax = wf.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    scale = amax / torch.full_like(amax, INT4_MAX)
    q = torch.round(wf / scale).clamp(-8, 7).to(torch.int8)
    return q, scale


# ---------------------------------------------------------------------------- measurement
def synthetic_weight(kind: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Test weights for the rule measurement: ``gaussian`` N(0, 0.02) (Wan-like init) or
    ``heavy-tailed`` (Student-t, 4 dof, times a log-normal per-input-channel scale, x0.02)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, k, generator=g) * 0.02
    if kind == "heavy-tailed":
        nu = 4.0
        z = torch.randn(n, k, generator=g)
        chi2 = torch.distributions.Chi2(torch.tensor(nu))
        torch.manual_seed(seed)
        t = z / torch.sqrt(chi2.sample((n, k)) / nu)
        col = torch.exp(torch.randn(1, k, generator=g) * 0.5)
        return t * col * 0.02
    raise ValueError(f"unknown distribution {kind!r}")


def measure_rules(n: int = 1024, k: int = 5120, seed: int = 0,
                  distributions=("gaussian", "heavy-tailed")) -> list[dict]:
    """Weight SQNR (dB) of every rule for every scheme and distribution (rows of a table)."""
    rows = []
    for dist in distributions:
        w = synthetic_weight(dist, n, k, seed)
        for scheme, fmt in SCHEME_FORMAT.items():
            row = {"scheme": scheme, "distribution": dist}
            for rule in RULES:
                if rule in FORMAT_RULES[fmt]:
                    row[rule] = sqnr_db(w, quantize_weight(w, scheme, rule).dequantize())
                else:
                    row[rule] = None
            rows.append(row)
    return rows
