"""``mxdit quantize``: an msmodelslim-compatible MX checkpoint from a BF16 Wan2.2 model, on any
machine (CPU, CUDA, NPU), with optional calibration (SmoothQuant) and a per-layer quality report.

Usage::

    mxdit quantize --model-path BF16_DIR --output OUT --recipe RECIPE
        [--layout mindie|ascendv1|diffusers] [--fp4-container uint8|fp8]
        [--weight-rule auto|floor|rceil|minmax|ceil_x|mse|SCHEME=RULE,...]
        [--calib-prompts FILE [--calib-steps N --calib-height H --calib-width W --calib-frames F
                               --calib-image IMG (I2V)]]
        [--smooth none|calib|data-free] [--smooth-alpha A] [--shard-size GB]
        [--allow-non-block] [--device DEV] [--overwrite]

Input (``--model-path``; never modified)
    * a transformer directory, diffusers or original Wan names (``config.json`` +
      ``*.safetensors``, sharded or not): one export, written at OUT;
    * a diffusers model directory (``model_index.json``): every transformer it
      lists.  For A14B (``transformer`` + ``transformer_2``) the msmodelslim
      layouts write one export per expert, ``OUT/high_noise_model`` and
      ``OUT/low_noise_model`` as msmodelslim does (the mapping of
      :mod:`mxdit.tools.repack`); TI2V-5B's export is OUT itself;
    * an original Wan2.2 A14B directory (``high_noise_model/`` + ``low_noise_model/``):
      one export per expert under the same names.

Output layouts (``--layout``: ``mindie`` default, ``ascendv1``, ``diffusers``) and the tensors of
each quantized layer are written by :mod:`mxdit.loader.export` (the checkpoint writer, beside the
reader); a layer's tensors are its scheme record's (:mod:`mxdit.quant.schemes`, the README's method
table).  msmodelslim layouts use original Wan names and an original-format ``config.json``; the
diffusers layout is what ``mxdit repack`` produces (``mxdit.load_transformer`` reads it as is; from a
model directory the whole directory is written, the other components copied, so
``mxdit generate --model-path OUT`` runs it).  Every tensor has a label: the quantized layer's
tensors its scheme, biases FLOAT (ascendv1: the scheme for DUALSCALE layers, as msmodelslim),
``div.mul_scale`` FLOAT, every other tensor FLOAT in its source dtype.  ``model_quant_type`` is the
highest-priority scheme present (msmodelslim's ``QUANT_TYPE_PRIORITY``; also the mindie file names).
``--fp4-container fp8`` writes FP4 weights as float8_e4m3fn values [N, K] (msmodelslim <= 26.0.0).

    Scale bytes are E8M0, ``shared_exp + 127``.  The weight scale rule is
    ``--weight-rule`` (:mod:`mxdit.quant.offline_rules`; default ``mse``, the
    measured winner for every scheme).

Planning (inputs, ``--weight-rule``, checking the BF16 checkpoints, each layer's scheme):
:mod:`mxdit.tools.quantize_plan`.  Recipes: :mod:`mxdit.tools.recipes` (file format, built-ins ``all-mxfp8``,
``all-mxfp4``, ``all-mxfp4-dual``, ``all-int4``, ``msmodelslim-wan2.2``, and the F8
``msmodelslim-wan2.2-w8a8f8`` / ``-w4a4f8`` with q_rot / k_rot and FP8_DYNAMIC
attention entries; only block linears by
default).  Calibration and smoothing: :mod:`mxdit.tools.calibrate`
(``--smooth`` defaults to ``calib`` with ``--calib-prompts``, else ``none``;
``--smooth-alpha`` needs prompts or ``--smooth data-free``).  Quality report:
:mod:`mxdit.tools.quant_report` -- ``quality_report.{md,png,json}`` in each
export directory.

Streaming: tensors are read one at a time (mmap, pages released), each
quantized layer is processed in row chunks and written by a streaming writer,
so peak memory stays near the largest tensor (plus the calibration samples),
never the model.  Measured (``benchmarks/bench_quantize.py``, synthetic
full-width A14B expert cut to 4 blocks, 3.05 GiB BF16, largest tensor 300 MiB,
CPU, one thread of a shared 2-core VM): peak RSS 0.81 GiB (0.22 GiB of it
imports), 17 s per block for ``all-mxfp8`` and 16 s for ``all-mxfp4-dual``
with the default ``mse`` rule and the report -- about 22 minutes for both
A14B experts (2 x 40 blocks) on one core; more threads or ``--device cuda``
go faster.  The output is built in a temporary sibling directory and
renamed into place at the end; an existing output is refused without
``--overwrite``; on any error nothing is left behind.  Every bad input is
found before anything is written (CLI: one line, exit status 2).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from mxdit.formats.chunks import row_chunks
from mxdit.formats.metrics import SqnrAccumulator
from mxdit.formats.rotation import HADAMARD_SEED, random_hadamard
from mxdit.kernels import default_device
from mxdit.loader.export import FP4_CONTAINERS, GB, LAYOUTS, Entry, quantized_layer_entries, write_config, write_export
from mxdit.quant.offline_rules import DEFAULT_RULES, RULES, QuantizedWeight, quantize_weight
from mxdit.quant.schemes import BY_LABEL
from mxdit.tools.calibrate import (
    CalibrationSettings,
    LayerActStats,
    collect_activation_stats,
    column_amax,
    data_free_smooth_factors,
    describe_factors,
    read_prompts,
    smooth_factors,
)
from mxdit.tools.quant_report import ActQuant, LayerReport, ReportMeta, random_activations, write_report
from mxdit.tools.quantize_plan import ExpertPlan, LayerPlan, QuantizeError, parse_weight_rules, plan_expert, resolve_inputs
from mxdit.tools.recipes import BUILTIN_RECIPES, Recipe, RecipeError

SMOOTH_MODES = ("none", "calib", "data-free")
DEFAULT_SHARD_GB = 4.0


# ============================================================================ options / results
@dataclass
class QuantizeOptions:
    recipe: str = "all-mxfp8"
    layout: str = "mindie"
    fp4_container: str = "uint8"
    weight_rule: Optional[str] = None  # "auto" / RULE / "SCHEME=RULE,..."
    calib_prompts: Optional[str] = None
    calib: CalibrationSettings = field(default_factory=CalibrationSettings)
    smooth: Optional[str] = None  # None: "calib" with prompts, else "none"
    smooth_alpha: Optional[float] = None
    shard_size_gb: float = DEFAULT_SHARD_GB
    allow_non_block: bool = False
    device: str = "cpu"
    report_rows: int = 32
    report_plot: bool = True
    overwrite: bool = False
    progress: bool = True
    #: activation statistics from an earlier run (``QuantizeResult.calib_stats``): calibrate once,
    #: then try several recipes / smoothing settings without running the pipeline again
    calib_stats: Optional[dict[str, dict[str, LayerActStats]]] = None


@dataclass
class ExpertResult:
    name: str
    out_dir: str
    description: str
    weight_files: list[str]
    tensors: int
    model_quant_type: str
    layers: list[LayerReport]
    report_files: dict[str, str]


@dataclass
class QuantizeResult:
    output: str
    experts: list[ExpertResult]
    warnings: list[str]
    seconds: float
    calib_stats: Optional[dict[str, dict[str, LayerActStats]]] = None


# ============================================================================ per-layer work
@dataclass
class LayerOutput:
    quantized: QuantizedWeight
    mul_scale: Optional[torch.Tensor]
    report: LayerReport


def quantize_layer(
    w: torch.Tensor,
    plan: LayerPlan,
    *,
    smooth: Optional[torch.Tensor],
    x: Optional[torch.Tensor],
    smoothing_desc: str = "-",
) -> LayerOutput:
    """Quantize one weight [N, K] (row chunks), measuring weight and output SQNR on the way.

    ``smooth``: the factors s [K] (weight stored as W * s, mul_scale = 1 / s) or None.
    ``x``: activation rows [S, K] for the output SQNR (None: no output SQNR).
    """
    n, k = w.shape
    dev = w.device
    s = None if smooth is None else smooth.to(dev, torch.float32)
    mul_scale = None if s is None else (1.0 / s)
    act = None if x is None else ActQuant(x.to(dev), plan.scheme, mul_scale)
    xf = None if x is None else x.to(dev, torch.float32)
    wacc, oacc = SqnrAccumulator(), SqnrAccumulator()
    # the stored tensors, as the scheme record lists them, filled chunk by chunk
    store = {sfx: torch.empty(spec.shape_for(n, k), dtype=spec.dtype, device=dev)
             for sfx, spec in BY_LABEL[plan.scheme].tensors.items()}
    for r0, r1 in row_chunks(n, k):
        wc = w[r0:r1].to(torch.float32)
        qc = quantize_weight(wc * s if s is not None else wc, plan.scheme, plan.rule, keep_dequantized=True)
        deq = qc.deq  # of W * s
        if act is not None:
            oacc.add(xf @ wc.t(), act.deq @ deq.t())
        wacc.add(wc, deq * mul_scale if mul_scale is not None else deq)
        for sfx, t in qc.tensors().items():
            store[sfx][r0:r1] = t
        del wc, qc, deq
    store = {sfx: t.cpu() for sfx, t in store.items()}
    q = QuantizedWeight(plan.scheme, store["weight"], store["weight_scale"], store.get("weight_dual_scale"))
    rep = LayerReport(
        name=plan.orig_name, scheme=plan.scheme, rule=plan.rule, out_features=n, in_features=k,
        smoothing=smoothing_desc, weight_sqnr_db=wacc.db,
        output_sqnr_db=oacc.db if act is not None else float("nan"), act_rows=0 if x is None else int(x.shape[0]),
    )
    return LayerOutput(q, None if mul_scale is None else mul_scale.cpu(), rep)


# ============================================================================ one expert: quantize and write
class _ExpertWriter:
    """Quantizes an expert's layers as the writer (:mod:`mxdit.loader.export`) asks for their tensors."""

    def __init__(self, plan: ExpertPlan, out_dir: str, opts: QuantizeOptions, smooth_mode: str,
                 stats: Optional[dict[str, LayerActStats]], recipe: Recipe, source: str):
        self.plan = plan
        self.out_dir = out_dir
        self.opts = opts
        self.smooth_mode = smooth_mode
        self.stats = stats
        self.recipe = recipe
        self.source = source
        self.device = torch.device(opts.device)
        self.reports: list[LayerReport] = []
        self._cache: dict[str, LayerOutput] = {}
        self._remaining: dict[str, int] = {}

    # ---- names
    def out_name(self, model_name: str) -> str:
        from mxdit.models.wan.names import diffusers_to_original

        return model_name if self.opts.layout == "diffusers" else diffusers_to_original(model_name)

    # ---- the per-layer job (run when its first tensor is written)
    def _layer(self, lp: LayerPlan) -> LayerOutput:
        out = self._cache.get(lp.model_name)
        if out is not None:
            return out
        files = self.plan.ckpt.files
        w = files.read(self.plan.ckpt.names[lp.model_name + ".weight"], finite=True).to(self.device)
        st = self.stats.get(lp.model_name) if self.stats is not None else None
        s = None
        if self.smooth_mode == "calib":
            s = smooth_factors(st.amax.to(self.device), column_amax(w), self.alpha)
        elif self.smooth_mode == "data-free":
            s = data_free_smooth_factors(column_amax(w), self.alpha)
        if st is not None:
            x = st.samples
        else:
            x = random_activations(lp.in_features, self.opts.report_rows, seed=zlib.crc32(lp.orig_name.encode()))
        out = quantize_layer(w, lp, smooth=s, x=x, smoothing_desc=describe_factors(s))
        del w
        self.reports.append(out.report)
        self._cache[lp.model_name] = out
        return out

    def _take(self, lp: LayerPlan, what: str) -> torch.Tensor:
        """One tensor of a quantized layer (a record suffix, or "mul_scale"), in parameter shape;
        the layer's result is dropped once all its tensors are taken."""
        out = self._layer(lp)
        t = out.mul_scale if what == "mul_scale" else out.quantized.tensors()[what]
        self._remaining[lp.model_name] -= 1
        if self._remaining[lp.model_name] == 0:
            del self._cache[lp.model_name]
        return t

    @property
    def alpha(self) -> float:
        return 0.5 if self.opts.smooth_alpha is None else float(self.opts.smooth_alpha)

    # ---- entries
    def entries(self) -> list[Entry]:
        plan, ckpt, layout = self.plan, self.plan.ckpt, self.opts.layout
        ents: list[Entry] = []
        smoothed = self.smooth_mode != "none"

        def read(cname, cast=None):
            def produce():
                t = ckpt.files.read(cname, finite=True)  # NaN/Inf inputs (norms, biases too) are errors
                return t if cast is None else t.to(cast)
            return produce

        for pname, shape in plan.params:
            cname = ckpt.names[pname]
            info = ckpt.files.info(cname)
            mod, _, attr = pname.rpartition(".")
            lp = plan.layers.get(mod)
            if lp is None:
                ents.append(Entry(self.out_name(pname), "FLOAT", info.dtype, tuple(info.shape), read(cname)))
                continue
            if attr not in ("weight", "bias"):  # pragma: no cover - linears have weight and bias only
                ents.append(Entry(self.out_name(pname), "FLOAT", info.dtype, tuple(info.shape), read(cname)))
                continue
            mine, bias = quantized_layer_entries(
                self.out_name(mod), lp.scheme, lp.out_features, lp.in_features,
                lambda what, lp=lp: self._take(lp, what), layout=layout, smoothed=smoothed,
                fp4_container=self.opts.fp4_container,
                read_bias=read(cname, torch.float32) if attr == "bias" else None,
            )
            if attr == "weight":
                self._remaining[lp.model_name] = len(mine)
                ents.extend(mine)
            else:
                ents.append(bias)
        ents.extend(self._rotation_entries())
        return ents

    def _attn_name(self, orig_attn: str) -> str:
        """``blocks.N.self_attn`` in this layout (diffusers: ``blocks.N.attn1``, the module the model
        holds its q_rot / k_rot buffers on; not ``attn1.to_q_rot``, SGLang's repack mismatch)."""
        if self.opts.layout != "diffusers":
            return orig_attn
        return orig_attn.replace(".self_attn", ".attn1")

    def _rotation_entries(self) -> list[Entry]:
        """msmodelslim's online_quarot tensors: ``<attn>.q_rot`` / ``<attn>.k_rot`` [D, D] bf16, label FLOAT
        (mindie_format.py on_online_rotation_wrapper saves the matrix as is).  One random Hadamard per
        head_dim with seed 1234, shared by q and k (model/wan2_2/base_model_adapter.py), so every
        attention module gets the same matrix; nothing is folded into the q / k weights."""
        att = self.plan.attention
        if att is None:
            return []
        d = self.plan.head_dim
        out = []
        for mod, on in att.rotation.items():
            if on:
                for r in ("q_rot", "k_rot"):
                    out.append(Entry(f"{self._attn_name(mod)}.{r}", "FLOAT", torch.bfloat16, (d, d),
                                     lambda d=d: random_hadamard(d, HADAMARD_SEED, torch.bfloat16)))
        return out

    def _attention_descriptions(self) -> dict[str, str]:
        """``<attn>.quant_type = "FP8_DYNAMIC"`` (mindie_format.py on_activation_per_token: the FA3
        per-token FP8 activation quantizer's parent module, e.g. ``blocks.3.self_attn``); no tensors."""
        att = self.plan.attention
        if att is None:
            return {}
        return {f"{self._attn_name(m)}.quant_type": v for m, v in att.quant_type.items() if v is not None}

    # ---- files
    def write(self) -> ExpertResult:
        ents = self.entries()
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        bar = None if tqdm is None else tqdm(total=len(ents), desc=f"quantizing {self.plan.title}", unit="tensor",
                                             disable=not self.opts.progress, leave=False)
        try:
            desc_path, files, mqt = write_export(
                self.out_dir, ents, layout=self.opts.layout, schemes={lp.scheme for lp in self.plan.layers.values()},
                shard_size_gb=self.opts.shard_size_gb, descriptions=self._attention_descriptions(),
                on_tensor=None if bar is None else (lambda: bar.update(1)),
            )
        finally:
            if bar is not None:
                bar.close()
            self.plan.ckpt.files.close()
        write_config(self.out_dir, self.plan.src_dir, self.plan.ckpt.config, self.opts.layout)
        order = {lp.orig_name: i for i, lp in enumerate(self.plan.layers.values())}
        self.reports.sort(key=lambda r: order[r.name])
        report_files = write_report(self.out_dir, self._report_meta(), self.reports, plot=self.opts.report_plot)
        return ExpertResult(self.plan.title, self.out_dir, desc_path, files, len(ents), mqt, self.reports, report_files)

    def _report_meta(self) -> ReportMeta:
        if self.smooth_mode == "none":
            sm = "none"
        else:
            sm = f"{self.smooth_mode} (alpha {self.alpha}, power-of-two factors)"
        if self.stats is not None:
            c = self.opts.calib
            rows = max((st.samples.shape[0] for st in self.stats.values()), default=0)
            if self.opts.calib_prompts:
                act = (f"calibration ({self.opts.calib_prompts}; {c.steps} steps, {c.frames} frames, "
                       f"{c.height or 'default'}x{c.width or 'default'}; {rows} sampled input rows per layer)")
            else:
                act = f"calibration statistics given by the caller ({rows} sampled input rows per layer)"
        else:
            act = f"random N(0, 1) rows ({self.opts.report_rows} per layer; no calibration)"
        rules = {}
        for lp in self.plan.layers.values():
            rules.setdefault(lp.scheme, lp.rule)
        return ReportMeta(title=self.plan.title, source=self.source, recipe=self.recipe.name,
                          layout=self.opts.layout, smoothing=sm, activations=act, weight_rules=rules,
                          extra={"fp4_container": self.opts.fp4_container})


# ============================================================================ top level
def _check_output(model_path: str, output: str, overwrite: bool) -> None:
    """Early, before anything is loaded (atomic_output_dir checks again under its lock)."""
    from mxdit.fsutil import OutputError, check_output_vs_inputs, written_by_mxdit

    try:
        check_output_vs_inputs(output, {"--model-path": model_path}, "--output")
    except OutputError as e:
        raise QuantizeError(str(e)) from None
    if os.path.lexists(output) and not overwrite:
        raise QuantizeError(f"output '{output}' already exists; pass --overwrite to replace it")
    if os.path.lexists(output) and not written_by_mxdit(output):
        raise QuantizeError(f"output '{output}' was not written by mxdit; refusing to replace it with --overwrite")


def _check_calibration_settings(model_path: str, c: CalibrationSettings, prompt: str) -> None:
    """The pipeline's own checks (the one validator), done up front from the model's JSON files."""
    from mxdit.pipelines.inputs import InputError, check_sampling_inputs
    from mxdit.pipelines.model_dir import ModelDirError, inspect_model_dir

    flags = {"num_frames": "--calib-frames", "num_inference_steps": "--calib-steps", "height": "--calib-height",
             "width": "--calib-width", "image": "--calib-image", "prompt": "--calib-prompts"}
    try:
        check_sampling_inputs(inspect_model_dir(model_path), prompt=prompt, num_frames=c.frames, height=c.height,
                              width=c.width, num_inference_steps=c.steps, guidance_scale=c.guidance_scale,
                              image=c.image, name=lambda f: flags.get(f, f))
    except (ModelDirError, InputError) as e:
        raise QuantizeError(f"--calib-prompts: {e}" if isinstance(e, ModelDirError) else str(e)) from None


def _resolve_smoothing(opts: QuantizeOptions) -> str:
    mode = opts.smooth
    calibrated = bool(opts.calib_prompts) or opts.calib_stats is not None
    if mode is None:
        mode = "calib" if calibrated else "none"
    if mode not in SMOOTH_MODES:
        raise QuantizeError(f"--smooth {mode!r}: valid modes are {', '.join(SMOOTH_MODES)}")
    if mode == "calib" and not calibrated:
        raise QuantizeError("--smooth calib needs --calib-prompts FILE (or use --smooth data-free)")
    if opts.smooth_alpha is not None:
        if mode == "none":
            raise QuantizeError("--smooth-alpha needs --calib-prompts FILE or --smooth data-free")
        a = float(opts.smooth_alpha)
        if not (0.0 <= a <= 1.0) or math.isnan(a):
            raise QuantizeError(f"--smooth-alpha must be in [0, 1], got {opts.smooth_alpha}")
    return mode


def quantize_model(model_path: str, output: str, options: Optional[QuantizeOptions] = None,
                   log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> QuantizeResult:
    """Quantize ``model_path`` into ``output`` (see the module docstring).  Raises
    :class:`QuantizeError` for bad inputs, before anything is written."""
    from mxdit.fsutil import atomic_output_dir

    t0 = time.perf_counter()
    opts = options or QuantizeOptions()
    if opts.layout not in LAYOUTS:
        raise QuantizeError(f"--layout {opts.layout!r}: valid layouts are {', '.join(LAYOUTS)}")
    if opts.fp4_container not in FP4_CONTAINERS:
        raise QuantizeError(f"--fp4-container {opts.fp4_container!r}: valid containers are {', '.join(FP4_CONTAINERS)}")
    if not (opts.shard_size_gb >= 0) or math.isinf(opts.shard_size_gb):
        raise QuantizeError(f"--shard-size must be a finite number >= 0 (GB), got {opts.shard_size_gb}")
    if opts.report_rows < 1:
        raise QuantizeError(f"report rows must be >= 1, got {opts.report_rows}")
    warnings: list[str] = []
    kind, inputs = resolve_inputs(model_path, opts.layout)
    try:
        recipe = Recipe.load(opts.recipe) if isinstance(opts.recipe, str) else opts.recipe
    except RecipeError as e:
        raise QuantizeError(str(e)) from None
    rules, notes = parse_weight_rules(opts.weight_rule)
    warnings.extend(notes)
    smooth_mode = _resolve_smoothing(opts)
    _check_output(model_path, output, opts.overwrite)
    prompts = None
    if opts.calib_prompts:
        if kind != "model_dir":
            raise QuantizeError(
                "--calib-prompts needs a diffusers model directory (model_index.json, tokenizer, text encoder) "
                f"as --model-path; '{model_path}' is a {kind.replace('_', ' ')}"
            )
        try:
            prompts = read_prompts(opts.calib_prompts)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise QuantizeError(f"--calib-prompts: {e}") from None
        c = opts.calib
        if c.steps < 1 or c.frames < 1 or c.samples < 1:
            raise QuantizeError("--calib-steps, --calib-frames and --calib-samples must be >= 1")
        if c.image is not None and not os.path.isfile(c.image):
            raise QuantizeError(f"--calib-image '{c.image}' is not a file")
        _check_calibration_settings(model_path, c, prompts[0])
    try:
        torch.device(opts.device)
    except (RuntimeError, ValueError) as e:
        raise QuantizeError(f"--device {opts.device!r} is not a device ({e})") from None

    plans = [plan_expert(k, src, rel, recipe, rules, opts.allow_non_block, warnings) for k, src, rel in inputs]
    for w in warnings:
        log(f"warning: {w}")

    stats: Optional[dict[str, dict[str, LayerActStats]]] = None
    if opts.calib_stats is not None:
        stats = opts.calib_stats
        for p in plans:
            have = stats.get(p.key, {})
            lacking = [lp.orig_name for name, lp in p.layers.items() if name not in have]
            if lacking:
                raise QuantizeError(f"calib_stats has no statistics for {len(lacking)} layer(s) of "
                                    f"'{p.title}' (e.g. {lacking[0]}); calibrate with this recipe")
    elif prompts is not None:
        log(f"calibrating on {len(prompts)} prompt(s): {opts.calib.steps} steps, {opts.calib.frames} frames")
        try:
            stats = collect_activation_stats(
                model_path, prompts, {p.key: list(p.layers) for p in plans}, opts.calib,
                device=opts.device, progress=opts.progress,
            )
        except (ValueError, FileNotFoundError) as e:
            for p in plans:
                p.ckpt.files.close()
            msg = str(e).replace("\n", " ")
            if "image is required" in msg:
                msg += " (pass --calib-image FILE)"
            elif "height and width" in msg or "num_frames" in msg:
                msg += " (see --calib-height, --calib-width, --calib-frames)"
            raise QuantizeError(msg if msg.startswith("calibration") else f"calibration: {msg}") from None

    results: list[ExpertResult] = []
    try:
        with atomic_output_dir(output, overwrite=opts.overwrite, tool="mxdit quantize", inputs={"--model-path": model_path}) as tmp:
            if kind == "model_dir" and opts.layout == "diffusers":
                quantized_dirs = {p.key for p in plans}
                for entry in sorted(os.listdir(model_path)):
                    if entry in quantized_dirs:
                        continue
                    src, dst = os.path.join(model_path, entry), os.path.join(tmp, entry)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
            for p in plans:
                out_dir = os.path.join(tmp, p.out_rel) if p.out_rel else tmp
                writer = _ExpertWriter(p, out_dir, opts, smooth_mode, None if stats is None else stats[p.key],
                                       recipe, model_path)
                res = writer.write()
                final = os.path.join(os.path.abspath(output), p.out_rel) if p.out_rel else os.path.abspath(output)
                res.out_dir = final
                res.description = os.path.join(final, os.path.basename(res.description))
                res.weight_files = [os.path.join(final, os.path.basename(f)) for f in res.weight_files]
                res.report_files = {k: os.path.join(final, os.path.basename(v)) for k, v in res.report_files.items()}
                results.append(res)
    finally:
        for p in plans:
            p.ckpt.files.close()
    return QuantizeResult(os.path.abspath(output), results, warnings, time.perf_counter() - t0, stats)


# ============================================================================ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and output")
    g.add_argument("--model-path", required=True,
                   help="BF16 transformer dir (diffusers or original names), diffusers model dir (model_index.json), "
                        "or original A14B dir (high_noise_model/ + low_noise_model/)")
    g.add_argument("--output", required=True, help="output directory (built in a temporary sibling, then renamed)")
    g.add_argument("--recipe", required=True,
                   help=f"built-in ({', '.join(BUILTIN_RECIPES)}) or a recipe file "
                        "('PATTERN SCHEME' lines on original Wan layer names, first match wins)")
    g.add_argument("--layout", default="mindie", choices=LAYOUTS,
                   help="mindie (msmodelslim mindie_format_saver, default), ascendv1 (msmodelslim ascendv1_saver), "
                        "diffusers (diffusers names, loadable by mxdit / mxdit generate)")
    g.add_argument("--fp4-container", default="uint8", choices=FP4_CONTAINERS,
                   help="FP4 weights as packed uint8 [N,K/2] (current msmodelslim, default) or float8_e4m3fn "
                        "values [N,K] (msmodelslim <= 26.0.0)")
    g.add_argument("--shard-size", type=float, default=DEFAULT_SHARD_GB, metavar="GB",
                   help="ascendv1/diffusers shard size in GB (msmodelslim part_file_size; 0 = one file; default 4)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    g = parser.add_argument_group("quantization")
    g.add_argument("--weight-rule", default="auto",
                   help=f"weight scale rule: auto (per scheme: {', '.join(f'{k}={v}' for k, v in DEFAULT_RULES.items())}), "
                        f"one of {', '.join(RULES)}, or SCHEME=RULE,... (see mxdit.quant.offline_rules)")
    g.add_argument("--allow-non-block", action="store_true",
                   help="allow recipe rules that quantize non-block linears (embedders, head); a warning is printed")
    g.add_argument("--device", default=None,
                   help="device for calibration and weight quantization (default: cuda/npu if available, else cpu)")
    g = parser.add_argument_group("calibration and smoothing")
    g.add_argument("--calib-prompts", default=None, metavar="FILE", help="calibration prompts, one per line")
    g.add_argument("--calib-steps", type=int, default=8, help="denoising steps per prompt (default 8)")
    g.add_argument("--calib-height", type=int, default=256, help="calibration video height (default 256)")
    g.add_argument("--calib-width", type=int, default=448, help="calibration video width (default 448)")
    g.add_argument("--calib-frames", type=int, default=17, help="calibration frames, 4n+1 (default 17)")
    g.add_argument("--calib-seed", type=int, default=0)
    g.add_argument("--calib-image", default=None, metavar="FILE",
                   help="conditioning image for image-to-video models (required for I2V-A14B)")
    g.add_argument("--calib-samples", type=int, default=32,
                   help="input rows sampled per layer for the report's output SQNR (default 32)")
    g.add_argument("--smooth", default=None, choices=SMOOTH_MODES,
                   help="SmoothQuant: calib (default with --calib-prompts), data-free (weights only), none")
    g.add_argument("--smooth-alpha", type=float, default=None, help="SmoothQuant migration strength in [0, 1] (default 0.5)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plot", action="store_true", help="skip quality_report.png (the .md and .json are written)")


def _scheme_means(layers: list[LayerReport]):
    out = []
    for sch in dict.fromkeys(l.scheme for l in layers):
        ls = [l for l in layers if l.scheme == sch]
        out.append((sch, sum(l.weight_sqnr_db for l in ls) / len(ls), sum(l.output_sqnr_db for l in ls) / len(ls)))
    return out


def _cli_device(name):
    """--device checked before anything is read or written (generate's one device check)."""
    if name is None:
        return default_device()
    from mxdit.tools.generate import _resolve_device

    return _resolve_device(name)


def run(args: argparse.Namespace) -> int:
    from mxdit.errors import UsageError
    from mxdit.loader import CheckpointError

    opts = QuantizeOptions(
        recipe=args.recipe, layout=args.layout, fp4_container=args.fp4_container, weight_rule=args.weight_rule,
        calib_prompts=args.calib_prompts,
        calib=CalibrationSettings(steps=args.calib_steps, height=args.calib_height, width=args.calib_width,
                                  frames=args.calib_frames, seed=args.calib_seed, samples=args.calib_samples,
                                  image=args.calib_image),
        smooth=args.smooth, smooth_alpha=args.smooth_alpha, shard_size_gb=args.shard_size,
        allow_non_block=args.allow_non_block, device=_cli_device(args.device),
        overwrite=args.overwrite, progress=not args.no_progress, report_plot=not args.no_plot,
    )
    try:
        res = quantize_model(args.model_path, args.output, opts)
    except (QuantizeError, FileExistsError, CheckpointError) as e:
        raise UsageError(str(e).replace("\n", " ")) from None
    for ex in res.experts:
        counts: dict[str, int] = {}
        for l in ex.layers:
            counts[l.scheme] = counts.get(l.scheme, 0) + 1
        layers = ", ".join(f"{s} x{n}" for s, n in counts.items())
        size = sum(os.path.getsize(f) for f in ex.weight_files) / GB
        print(f"{ex.name}: {layers}; {ex.tensors} tensors, {size:.3f} GB in {len(ex.weight_files)} file(s) -> {ex.out_dir}")
        print(f"  quality report: {ex.report_files['md']}")
        for sch, mean_w, mean_o in _scheme_means(ex.layers):
            print(f"  {sch}: mean weight SQNR {mean_w:.2f} dB, mean output SQNR {mean_o:.2f} dB")
    print(f"wrote {res.output} in {res.seconds:.1f} s")
    return 0
