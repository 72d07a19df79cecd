"""Per-layer quality report of ``mxdit quantize``: ``quality_report.md``, ``.png``, ``.json``.

For each quantized layer:

* **weight SQNR** (dB): the effective dequantized weight ``deq(W * s) / s``
  (s = smoothing factors, 1 without smoothing) against the source weight;
* **output SQNR** (dB): ``x W^T`` (bias excluded, it would only inflate the
  number) computed with the runtime's numerics -- ``x * mul_scale``, activations
  quantized per token as mxdit / the NPU do (MX floor scales, round half to even;
  dual-level MXFP4 for W4A4_MXFP4_DUALSCALE), fp32 accumulation -- against the
  unquantized fp32 product, on the layer's calibration input rows (or on
  N(0, 1) rows when there is no calibration).

SQNR = 10 log10(sum ref^2 / sum (ref - quant)^2).
"""
from __future__ import annotations

import json
import math
import os
import textwrap
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from mxdit.quant.schemes import BY_LABEL, EXPORTABLE

REPORT_MD = "quality_report.md"
REPORT_PNG = "quality_report.png"
REPORT_JSON = "quality_report.json"
#: the schemes ``mxdit quantize`` writes, in record order (mxdit.quant.schemes)
SCHEME_ORDER = tuple(EXPORTABLE)
_MARKERS = "os^Dvp*hx+"


@dataclass
class LayerReport:
    name: str  # original Wan name
    scheme: str
    rule: str
    out_features: int
    in_features: int
    smoothing: str  # "-" or the range of the factors
    weight_sqnr_db: float
    output_sqnr_db: float
    act_rows: int


@dataclass
class ReportMeta:
    title: str
    source: str
    recipe: str
    layout: str
    smoothing: str
    activations: str
    weight_rules: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class ActQuant:
    """The runtime activation quantization of one layer, done once for all weight chunks.

    ``deq``: the quantized activations dequantized (fp32 [S, K]), in the smoothed domain
    (``x * mul_scale``), by the scheme record's activation quantizer (``Scheme.act_quant``: MX floor
    scales and round-half-even, dual-level, int4 per token...): ``deq @ deq(W * s)^T`` is the layer's
    runtime product up to fp32 summation order (every MX product term is exact in fp32; see
    mxdit.formats.matmul).
    """

    def __init__(self, x: torch.Tensor, scheme: str, mul_scale: Optional[torch.Tensor]):
        x = x.to(torch.bfloat16) if x.dtype not in (torch.bfloat16, torch.float16) else x
        self.scheme = scheme
        # smoothing is x * mul_scale in x's dtype (the dual-level op's smooth_scale is the same product)
        xs = x if mul_scale is None else x * mul_scale.to(x.device, x.dtype)
        self.deq = BY_LABEL[scheme].act_quant(xs)


def random_activations(k: int, rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g).to(torch.bfloat16)


def _fmt_db(v: float) -> str:
    return "inf" if v == math.inf else f"{v:.2f}"


def summarize(layers: list[LayerReport]) -> list[dict[str, Any]]:
    out = []
    for scheme in SCHEME_ORDER:
        ls = [l for l in layers if l.scheme == scheme]
        if not ls:
            continue
        w = [l.weight_sqnr_db for l in ls]
        o = [l.output_sqnr_db for l in ls]
        out.append(dict(scheme=scheme, layers=len(ls), weight_mean=sum(w) / len(w), weight_min=min(w),
                        output_mean=sum(o) / len(o), output_min=min(o)))
    return out


def render_markdown(meta: ReportMeta, layers: list[LayerReport]) -> str:
    lines = [f"# Quantization quality report: {meta.title}", ""]
    lines += [
        f"- source: `{meta.source}`",
        f"- recipe: {meta.recipe}; layout: {meta.layout}",
        "- weight rules: " + ", ".join(f"{k} {v}" for k, v in meta.weight_rules.items()),
        f"- smoothing: {meta.smoothing}",
        f"- activations for the output SQNR: {meta.activations}",
        "",
        "SQNR = 10 log10(sum ref^2 / sum (ref - quant)^2), dB, higher is better.  Weight: the effective "
        "dequantized weight deq(W*s)/s against the source weight.  Output: x W^T (no bias) with the runtime "
        "numerics (x * mul_scale, per-token MX activation quantization with floor scales and round-half-even, "
        "dual-level for DUALSCALE, int4 per token for W4A4_DYNAMIC; fp32 accumulation) against the unquantized product on the same rows.",
        "",
        "## Summary",
        "",
        "| scheme | layers | weight SQNR mean (dB) | weight SQNR min (dB) | output SQNR mean (dB) | output SQNR min (dB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summarize(layers):
        lines.append(f"| {s['scheme']} | {s['layers']} | {_fmt_db(s['weight_mean'])} | {_fmt_db(s['weight_min'])} | "
                     f"{_fmt_db(s['output_mean'])} | {_fmt_db(s['output_min'])} |")
    lines += ["", "## Layers", "",
              "| # | layer | scheme | rule | N x K | smoothing s | weight SQNR (dB) | output SQNR (dB) |",
              "|---:|---|---|---|---|---|---:|---:|"]
    for i, l in enumerate(layers):
        lines.append(f"| {i} | `{l.name}` | {l.scheme} | {l.rule} | {l.out_features} x {l.in_features} | "
                     f"{l.smoothing} | {_fmt_db(l.weight_sqnr_db)} | {_fmt_db(l.output_sqnr_db)} |")
    return "\n".join(lines) + "\n"


def render_png(path: str, meta: ReportMeta, layers: list[LayerReport]) -> None:
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(8.0, min(0.06 * len(layers) + 6, 30.0)), 7.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    markers = dict(zip(SCHEME_ORDER, _MARKERS))

    def finite(v):
        return v if math.isfinite(v) else float("nan")

    for ax, attr, title in ((axes[0], "weight_sqnr_db", "weight SQNR"), (axes[1], "output_sqnr_db", "output SQNR")):
        for scheme in SCHEME_ORDER:
            pts = [(i, finite(getattr(l, attr))) for i, l in enumerate(layers) if l.scheme == scheme]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, linestyle="none", marker=markers[scheme], markersize=4, label=scheme)
        ax.set_ylabel(f"{title} (dB)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[1].set_xlabel("layer (checkpoint order)")
    if len(layers) <= 40:
        axes[1].set_xticks(range(len(layers)))
        axes[1].set_xticklabels([l.name for l in layers], rotation=90, fontsize=6)
    title = f"{meta.title}: smoothing {meta.smoothing}; activations {meta.activations}"
    width_chars = int(fig.get_figwidth() * 72 / 9 * 1.6)  # ~characters per line at 9 pt
    fig.suptitle("\n".join(textwrap.wrap(title, width_chars)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(directory: str, meta: ReportMeta, layers: list[LayerReport], *, plot: bool = True) -> dict[str, str]:
    """Write the markdown, JSON and (``plot``) PNG reports into ``directory``; returns their paths."""
    names = (("md", REPORT_MD), ("json", REPORT_JSON)) + ((("png", REPORT_PNG),) if plot else ())
    paths = {k: os.path.join(directory, n) for k, n in names}
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(render_markdown(meta, layers))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"meta": asdict(meta), "summary": summarize(layers), "layers": [asdict(l) for l in layers]},
                  f, indent=2, default=lambda v: str(v))
    if plot:
        try:
            render_png(paths["png"], meta, layers)
        except ImportError:  # matplotlib is an optional dependency (the "pipeline" extra)
            warnings.warn("matplotlib is not installed: quality_report.png was not written", stacklevel=2)
            del paths["png"]
    return paths
