"""SGLang-Diffusion's command line, one for one: the flags ``mxdit generate`` and ``mxdit serve`` share.

Source: SGLang v0.5.23, ``python/sglang/multimodal_gen/runtime/server_args/server_args.py``
(``ServerArgs.add_cli_args``, ``load_config_file``), ``configs/sample/sampling_params.py``
(``SamplingParams.add_cli_args``), ``configs/pipeline_configs/wan.py`` (the Wan2.2 precisions) and
``runtime/entrypoints/cli/{generate,serve}.py``.

* :data:`DEFAULTS` — the one table of the defaults shared with SGLang (generate and serve read it).
* :func:`add_model_arguments` / :func:`add_parallel_arguments` — argument groups used by both commands.
* :func:`install` — ``--config FILE`` (JSON / YAML, keys = flag names with underscores; flags on the
  command line win) and the refusal of SGLang flags mxdit does not have: one line,
  ``argument --flag: not supported: <why>``, exit 2 — never argparse's "unrecognized arguments".
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from mxdit.cli import finite_float
from mxdit.quant.schemes import available_quant_methods

#: SGLang v0.5.23's defaults for the flags mxdit shares with it (ServerArgs, SamplingParams,
#: Wan2.2 pipeline configs: DiT bf16, VAE fp32 (Wan2.2's vae_decode_precision is fp32 too), T5 fp32)
DEFAULTS: dict[str, Any] = {
    "output_path": "outputs/",
    "save_output": True,
    "seed": 42,
    "num_outputs_per_prompt": 1,
    "dit_precision": "bf16",
    "vae_precision": "fp32",
    "text_encoder_precisions": ["fp32"],
    "image_encoder_precision": "fp32",
    "warmup_steps": 1,
    "host": "127.0.0.1",
    "port": 30000,
}

#: SGLang's precision names (``--dit-precision`` ... choices) -> torch dtype attribute
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: mxdit's ``--dtype`` also takes the long names
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}

#: SGLang flags mxdit does not have, by pattern (full flag name), with the reason given to the user.
#: First match wins.  Flags mxdit defines are never looked up here.
REFUSED: list[tuple[str, str]] = [
    (r"--disagg-.*|--(prompt-|image-)?encoder-urls|--denoiser-.*|--decoder-.*|--encoder-tp|--encoder-parallel",
     "disaggregated serving (separate encoder / denoiser / decoder instances) is not built"),
    (r"--lora-.*", "this LoRA option is not built (mxdit has --lora-path, --lora-nickname, --lora-scale, --lora-merge-mode)"),
    (r"--(dit-cpu-offload|dit-layerwise.*|layerwise-.*|dit-offload-.*|text-encoder-cpu-offload|"
     r"image-encoder-cpu-offload|vae-cpu-offload|cpu-offload-components|component-residency|pin-cpu-memory|"
     r"direct-gpu-weight-loading|use-fsdp-inference|offload-during-compile)",
     "this offload option is not built (mxdit has --dit-cpu-offload and --dit-layerwise-offload; other components stay on --device)"),
    (r"--(enable-torch-compile|regional-compile|enable-breakable-cuda-graph|bcg-.*|dit-config\.torch-compile-mode)",
     "this compile option is not built (mxdit has --enable-torch-compile, --torch-compile-backend, --torch-compile-mode; no CUDA graphs)"),
    (r"--(vae-tiling|vae-slicing|vae-sp|diffusion-decoder-.*|vae-config\..*|load-diffusion-decoder|use-diffusion-decoder)",
     "this VAE option is not built (mxdit has --vae-tiling and --vae-slicing; no parallel decode)"),
    (r"--(cache-dit-.*|enable-cache-dit|enable-teacache|enable-spectrum|spectrum-.*|w|taylor[-_]order|"
     r"history[-_]size|(spectrum[-_])?(window[-_]size|flex[-_]window)|spectrum_.*|cfg-gate-step)",
     "this caching option is not built (mxdit has --enable-cache-dit and --cache-dit-config; no TeaCache / Spectrum)"),
    (r"--kv-cache-quant.*|--realtime-.*|--num-frame-per-block|--streaming|--refiner-chunked|--dmd-denoising-steps",
     "an option of autoregressive / distilled video models, not of Wan2.2"),
    (r"--(enable-svdquant|quantization-precision|quantization-rank|quantization-act-unsigned|dit-config\.quant-config)",
     "SVDQuant (Nunchaku) is not built; mxdit's methods are --quantization " + "|".join(available_quant_methods())),
    (r"--(revision|model-id|model-subfolder|model-variant|pipeline(-class-name)?|backend|trust-remote-code|"
     r"pipeline-config-path|scheduler-class-override|mask-strategy-file-path|moba-config-path|"
     r"component-attention-backends|attention-backend-config|attention-backend-override|dit-config\..*|"
     r"text-encoder-configs|prompt-enhancer-config|pe-server-url|srt-encoder-.*|enable-prompt-rewrite|system-prompt)",
     "mxdit reads one local diffusers-layout Wan2.2 directory with its own components (no hub, no pipeline "
     "or component overrides)"),
    (r"--(nnodes|node-rank|dist-init-addr|base-gpu-id|gpu-ids|numa-node|enable-nccl-nvls|data-parallel-size|dp-size|"
     r"dp|hsdp-.*|kv-gather-degree|scheduler-rpc-timeout|performance-mode|mode)",
     "one node, SP / CFG parallel only (use --device, --num-gpus or torchrun; data parallel is not built)"),
    (r"--(webui.*|http-graceful-shutdown-timeout|enable-metrics|strict-ports|scheduler-port|batching-.*|"
     r"enable-batching-metrics|sleep-on-idle|async-output-save|input-save-path|uvicorn-access-log-exclude-prefixes|"
     r"enable-cache-report|disable-conditioning-cache|conditioning-cache-max-size-mb)",
     "a server feature mxdit does not have (mxdit serve: one job at a time from a bounded queue)"),
    (r"--(log-.*|enable-trace|otlp-.*|enable-layerwise-nvtx-marker|profile.*|num-profiled-timesteps)",
     "logging / tracing / profiling flags are not built (stage timings: --perf-dump-path)"),
    (r"--(output-quality|output-compression|x264-preset|quality|return-frames|return-file-paths-only|"
     r"return-trajectory-.*|data-type|task-type)",
     "the output is fixed: an H.264 MP4 (imageio-ffmpeg, default quality)"),
    (r"--(host|port|served-model-name)", "a server option: mxdit serve takes it (mxdit generate runs in-process)"),
    (r"--(warmup|warmup-mode|warmup-steps)", "mxdit serve does not warm up (mxdit generate has --warmup)"),
    (r"--prompt-file-path", "a generate option: mxdit serve takes one prompt per request"),
    (r"--(warmup-resolutions|warmup-num-frames|warmup-sampling-params)",
     "the warmup run uses the request's own size (see --warmup / --warmup-mode, --warmup-steps)"),
    (r"--(true-cfg-scale|guidance-rescale|cfg-normalization|enable-cfg-renorm|cfg-renorm-min|embedded-cfg-scale|"
     r"generator-device|resolution|4k|2k|1080p|720p|auto-duration.*|num-frames-round-down|adjust-frames|"
     r"sound-duration|enable-sequence-shard|progressive-.*|no-override-protected-fields|diffusers-kwargs)",
     "not an option of mxdit's Wan2.2 sampler (size: --height/--width; noise: a CPU generator from --seed)"),
    (r"--(video-path|action.*|translation[-_]speed|rotation[-_]speed[-_]deg|pitch[-_]limit[-_]deg|sr-.*|domain-.*|"
     r"raw-action-dim|rollout.*|enable-frame-interpolation|frame-interpolation-.*|enable-upscaling|upscaling-.*|"
     r"bot-task|minimax-.*|ltx2-.*|disable-autocast|allow-cudnn-tf32|allow-bf16-reduced-precision-reduction)",
     "an option of another model family or post-processing SGLang has; mxdit runs Wan2.2 text/image-to-video"),
    (r"--[a-z0-9]+(-[a-z0-9]+)*-(path|weights-path|quantization|precision|quantization-ignored-layers|"
     r"direct-gpu-weight-loading|attention-backend)",
     "SGLang's per-component overrides are not built; mxdit has --quantization (both experts), "
     "--transformer-weights-path and the --*-precision flags"),
]
_REFUSED = [(re.compile(p), why) for p, why in REFUSED]


def refusal(flag: str) -> str | None:
    """Why mxdit refuses SGLang flag ``flag`` (``--name``), or None when no rule names it."""
    return next((why for rx, why in _REFUSED if rx.fullmatch(flag)), None)


# ---------------------------------------------------------------------- argument groups
def precision(text: str) -> str:
    """argparse ``type=``: SGLang's precision names (fp32, fp16, bf16) and mxdit's long ones."""
    t = DTYPE_ALIASES.get(text.lower(), text.lower())
    if t not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"unknown precision {text!r} (choose from: fp32, fp16, bf16)")
    return t


def add_model_arguments(p: argparse.ArgumentParser, *, serve: bool = False) -> None:
    """The model, precision and quantization flags of ``generate`` and ``serve`` (SGLang's names)."""
    g = p.add_argument_group("model")
    g.add_argument("--model-path", default=None, help="diffusers-layout Wan2.2 model directory (or model_path in --config)")
    g.add_argument("--config", default=None,
                   help="read options from a JSON or YAML file (keys: the flag names with underscores, "
                        "e.g. num_frames, quantization); flags on the command line override the file")
    g.add_argument("--quantization", default=None,
                   help=f"quantize both experts online{', fixed for the server' if serve else ''} "
                        f"(one of: {', '.join(available_quant_methods())}); default: auto-detect from the checkpoint")
    g.add_argument("--quantization-ignored-layers", nargs="+", default=None, metavar="PATTERN",
                   help="glob patterns on layer names to keep unquantized (e.g. 'blocks.*.ffn.net.2' for a K that "
                        "mxfp4_dual cannot take); the same matching as the Python ignore=")
    g.add_argument("--transformer-weights-path", default=None,
                   help="weights replacing transformer/ (the high-noise expert only, as SGLang)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N, npu (default: the first accelerator, else cpu)")
    g.add_argument("--dit-precision", "--dtype", dest="dit_precision", type=precision, default=DEFAULTS["dit_precision"],
                   help=f"transformer dtype: fp32, fp16, bf16 (default {DEFAULTS['dit_precision']}; --dtype is mxdit's alias)")
    g.add_argument("--vae-precision", type=precision, default=DEFAULTS["vae_precision"],
                   help=f"VAE dtype (default {DEFAULTS['vae_precision']}, as SGLang's Wan2.2 configs)")
    g.add_argument("--vae-decode-precision", type=precision, default=None,
                   help="VAE dtype for decoding (default: --vae-precision; mxdit keeps one VAE, so the two must agree "
                        "when both are given)")
    g.add_argument("--text-encoder-precisions", nargs="+", type=precision, default=list(DEFAULTS["text_encoder_precisions"]),
                   help=f"UMT5 dtype, one per text encoder (Wan2.2 has one; default {DEFAULTS['text_encoder_precisions'][0]})")
    g.add_argument("--image-encoder-precision", type=precision, default=DEFAULTS["image_encoder_precision"],
                   help="accepted for SGLang compatibility: Wan2.2 has no image encoder (its image goes through the VAE)")
    g.add_argument("--flow-shift", type=finite_float, default=None, help="override the scheduler config's flow_shift")
    g.add_argument("--attention-backend", default=None,
                   help="self-attention: mxfp8, mxfp8_rotated, fp8_block, fp8_block_rotated, or sdpa / none (unquantized); "
                        "default: unquantized unless SGLANG_DIFFUSION_ENABLE_MXFP8_ATTENTION=1 or the checkpoint says FP8_DYNAMIC")


def add_parallel_arguments(p: argparse.ArgumentParser, *, serve: bool = False) -> None:
    g = p.add_argument_group("parallelism", "split one video over devices (SGLang's flags; see README "
                             "'Running on N devices'); also works under torchrun --nproc-per-node N")
    g.add_argument("--num-gpus", type=int, default=None,
                   help="ranks to run (spawned here; under torchrun: its world size). Default: 1, or the "
                        "product of the degrees given" + ("; rank 0 serves HTTP" if serve else ""))
    g.add_argument("--ulysses-degree", type=int, default=None,
                   help="Ulysses sequence-parallel degree (default: the GPUs left after CFG parallel)")
    g.add_argument("--sp-degree", type=int, default=None,
                   help="sequence-parallel degree = ulysses x ring (ring is 1 here, so: the Ulysses degree)")
    g.add_argument("--ring-degree", type=int, default=None, help="ring-attention degree (only 1 is supported)")
    g.add_argument("--enable-cfg-parallel", action="store_true",
                   help="conditional and unconditional branches on different ranks (degree 2; on by default "
                        "when --num-gpus >= 2 and no SP degree is given)")
    g.add_argument("--cfg-parallel-size", type=int, default=None, help="CFG-parallel degree: 1 (off) or 2")
    g.add_argument("--tp-size", type=int, default=1, help="tensor parallel (only 1 is supported)")
    g.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port on 127.0.0.1 for spawned ranks (default: a free port)")
    g.add_argument("--dist-timeout", type=float, default=None,
                   help="seconds a collective may wait before the run fails (default: 1800)")


def install(p: argparse.ArgumentParser) -> None:
    """Read ``--config`` and refuse SGLang's other flags before argparse parses (see :mod:`mxdit.cli`)."""
    p.before_parse = _before_parse  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- before parsing
def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return dict(p._option_string_actions)


def _before_parse(p: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    config = None
    for i, tok in enumerate(argv):
        if tok == "--":
            break
        if not tok.startswith("--") or len(tok) < 3:
            continue
        flag = tok.split("=", 1)[0]
        if flag == "--config":
            config = tok.split("=", 1)[1] if "=" in tok else (argv[i + 1] if i + 1 < len(argv) else None)
        if flag not in p._option_string_actions:  # (an abbreviation of an mxdit flag matches no rule)
            why = refusal(flag)
            if why is not None:
                p.error(f"argument {flag}: not supported: {why}")
    if config is not None:
        p.set_defaults(**load_config(p, config))


def load_config(p: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """``--config`` file -> {dest: value}, checked against ``p``'s actions (``p.error`` on a bad one)."""
    f = Path(path)
    if f.suffix.lower() not in (".json", ".yaml", ".yml"):
        p.error(f"--config {path}: unsupported config file format (expected .json, .yaml or .yml, as SGLang)")
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        p.error(f"--config {path}: cannot read ({e.strerror if isinstance(e, OSError) else e})")
    try:
        if f.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        p.error(f"--config {path}: not valid {f.suffix[1:].upper()}: {' '.join(str(e).split())}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        p.error(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    by_dest: dict[str, argparse.Action] = {}
    for a in p._actions:
        if a.option_strings and a.dest not in by_dest and not isinstance(a, argparse._StoreFalseAction):
            by_dest[a.dest] = a
    opts = _options(p)
    out: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        flag = "--" + key.replace("_", "-")
        action = by_dest.get(key) or opts.get(flag)
        if key == "config":
            p.error(f"--config {path}: a config file cannot name another config file")
        if action is None:
            why = refusal(flag)
            p.error(f"--config {path}: key {key!r}: " + (f"not supported: {why}" if why else
                    "unknown option (keys are the flag names with underscores, e.g. num_frames)"))
        if value is None:
            continue
        out[action.dest] = _config_value(p, path, key, action, value)
    return out


def _config_value(p, path: str, key: str, action: argparse.Action, value: Any) -> Any:
    def bad(why: str):
        p.error(f"--config {path}: key {key!r}: {why}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            bad(f"expected true or false, got {value!r}")
        return value

    def one(v: Any) -> Any:
        if isinstance(v, (dict, list)) or (isinstance(v, bool) and action.type is not None):
            bad(f"expected a single {getattr(action.type, '__name__', 'string')}, got {v!r}")
        if action.type is not None:
            if action.type is int and isinstance(v, float):
                bad(f"expected an integer, got {v!r}")
            try:
                v = action.type(v if isinstance(v, str) else str(v))
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                bad(str(e) or f"invalid value {v!r}")
        elif not isinstance(v, str):
            bad(f"expected a string, got {v!r}")
        if action.choices is not None and v not in action.choices:
            bad(f"{v!r} is not one of {list(action.choices)}")
        return v

    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if not items and action.nargs == "+":
            bad("expected at least one value")
        return [one(v) for v in items]
    return one(value)


def torch_dtype(name: str):
    import torch

    return getattr(torch, PRECISIONS[name])


def resolve_precisions(args: argparse.Namespace, usage_error: Callable[[str], Exception]) -> dict[str, Any]:
    """{dtype, text_encoder_dtype, vae_dtype} for ``WanVideoPipeline.from_pretrained``."""
    te = list(args.text_encoder_precisions or DEFAULTS["text_encoder_precisions"])
    if len(te) != 1:
        raise usage_error(f"--text-encoder-precisions: Wan2.2 has one text encoder, got {len(te)} precisions ({' '.join(te)})")
    vae = args.vae_precision
    if args.vae_decode_precision is not None:
        if vae != DEFAULTS["vae_precision"] and args.vae_decode_precision != vae:
            raise usage_error(f"--vae-decode-precision {args.vae_decode_precision} differs from --vae-precision {vae}: "
                              "mxdit keeps one VAE in one precision")
        vae = args.vae_decode_precision
    return {"dtype": torch_dtype(args.dit_precision), "text_encoder_dtype": torch_dtype(te[0]),
            "vae_dtype": torch_dtype(vae)}


def quant_options(args: argparse.Namespace) -> dict[str, Any]:
    """Loader options from the flags (``ignore=`` of ``get_quant_config`` / ``OnlineQuantConfig``)."""
    return {"ignore": list(args.quantization_ignored_layers)} if args.quantization_ignored_layers else {}


# ---------------------------------------------------------------------- LoRA and the switches (SGLang's names)
def add_lora_arguments(p) -> None:
    """The LoRA flags of ``mxdit generate`` / ``mxdit serve`` (SGLang's names), as one argument group."""
    from mxdit.loader.lora import MERGE_MODES

    g = p.add_argument_group("LoRA", "low-rank adapters on both experts (any quantization); see README 'LoRA'")
    g.add_argument("--lora-path", nargs="+", default=None, metavar="[TARGET=]FILE",
                   help="LoRA .safetensors file(s) (diffusers/peft, original Wan / ComfyUI / lightx2v, kohya keys); "
                        "TARGET transformer= or transformer_2= puts a file on one A14B expert (high / low noise)")
    g.add_argument("--lora-nickname", nargs="+", default=["default"],
                   help="adapter name(s): one, or one per --lora-path (default: default)")
    g.add_argument("--lora-scale", nargs="+", type=finite_float, default=[1.0],
                   help="scale(s) of the low-rank update: one, or one per --lora-path (default 1.0)")
    g.add_argument("--lora-merge-mode", choices=MERGE_MODES, default="auto",
                   help="merge: into the BF16 weights before online quantization (fixed for the run); dynamic: "
                        "unmerged branch, switchable (serve: /v1/set_lora); auto (default): merge unless the base "
                        "is pre-quantized")




def add_switch_arguments(p) -> None:
    """The switches as one argument group (``--flag`` or ``--flag true|false``, as SGLang's StoreBoolean)."""
    from mxdit.pipelines.switches import parse_bool

    g = p.add_argument_group("switches", "memory / speed switches beside quantization (README 'Switches')")
    for flag, help_ in (
        ("--enable-torch-compile", "compile every transformer block (regional torch.compile) and warm it up"),
        ("--dit-cpu-offload", "A14B: keep the idle expert in CPU memory, swap at the boundary step"),
        ("--dit-layerwise-offload", "stream transformer blocks to the device one at a time"),
        ("--vae-tiling", "tiled VAE decoding (diffusers' enable_tiling)"),
        ("--vae-slicing", "sliced VAE decoding, one video at a time (diffusers' enable_slicing)"),
        ("--enable-cache-dit", "cache-dit DBCache block caching (SGLANG_CACHE_DIT_* env vars apply)"),
    ):
        g.add_argument(flag, nargs="?", const=True, default=None, type=parse_bool, metavar="BOOL", help=help_)
    g.add_argument("--torch-compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    g.add_argument("--torch-compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    g.add_argument("--cache-dit-config", default=None,
                   help="JSON/YAML file of cache-dit DBCacheConfig fields (Fn_compute_blocks, Bn_compute_blocks, "
                        "residual_diff_threshold, max_warmup_steps, ...); implies --enable-cache-dit")
