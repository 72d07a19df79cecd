"""Load time and peak memory of ``mxdit.load_transformer`` on a full-width Wan2.2-A14B slice.

The checkpoint: the Wan2.2-T2V-A14B expert architecture (dim 5120, ffn 13824,
text_dim 4096, freq_dim 256) with 4 blocks instead of 40, random BF16 weights
~ N(0, 0.02) (norm weights 1 + N(0, 0.02)), in diffusers layout; plus its
msmodelslim W4A4_MXFP4_DUALSCALE export (mindie saver: original names, every
tensor labelled, packed uint8 FP4 weights, uint8 E8M0 scales, float32 dual
scales [N, K/512, 1], fp32 biases) quantized from the same BF16 weights.  Both
are written tensor by tensor with ``write_safetensors`` (peak memory: one
tensor) and cached: built once in ``--dir`` (default: a directory under the
system temp dir) and reused while the spec is unchanged.

Each mode is loaded in a FRESH subprocess that imports torch and mxdit, records
its RSS (the baseline), loads, and reports wall seconds, its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the bytes of the loaded
parameters.  Target: (peak - baseline) / parameter bytes <= 1.25 for the
quantized modes, i.e. the loader never holds much more than the final model.

Usage:  .venv/bin/python benchmarks/bench_load.py [--dir DIR] [--rebuild] [--modes bf16,mxfp8,...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from anywhere, without relying on the editable install
    sys.path.insert(0, REPO)

NUM_LAYERS = 4
STD = 0.02
SPEC_VERSION = 1
MODES = {  # name -> (checkpoint subdir, quantization)
    "bf16": ("bf16", None),
    "mxfp8 (online)": ("bf16", "mxfp8"),
    "mxfp4_dual (online)": ("bf16", "mxfp4_dual"),
    "mxfp4_dual (msmodelslim export)": ("modelslim_dual", None),
}
SHORT = {"bf16": "bf16", "mxfp8": "mxfp8 (online)", "mxfp4_dual": "mxfp4_dual (online)",
         "prequant": "mxfp4_dual (msmodelslim export)"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------- child
def child(path: str, quantization: str | None) -> None:
    import torch

    import mxdit.formats  # noqa: F401  (everything the loader imports, before the baseline)
    import mxdit.quant  # noqa: F401
    from mxdit.loader import load_transformer

    baseline = _rss_bytes()
    t0 = time.perf_counter()
    model = load_transformer(path, quantization=quantization, dtype=torch.bfloat16, progress=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "seconds": seconds, "baseline": baseline, "peak": _peak_bytes(), "final_rss": _rss_bytes(),
        "param_bytes": model.load_report.parameter_bytes, "layers": model.load_report.layers_quantized,
        "layout": model.load_report.layout,
    }))


# ---------------------------------------------------------------------------- build
def _config():
    from mxdit.models.wan.config import PRESETS

    return dataclasses.replace(PRESETS["Wan2.2-T2V-A14B"], num_layers=NUM_LAYERS)


def _spec() -> dict:
    return {"version": SPEC_VERSION, "config": _config().to_dict(), "std": STD}


def _random(name: str, shape) -> "torch.Tensor":
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=g) * STD
    parts = name.split(".")
    if len(parts) > 1 and "norm" in parts[-2] and parts[-1] == "weight":
        t += 1.0
    return t.to(torch.bfloat16)


def _params():
    import torch

    from mxdit.models.wan.transformer import WanTransformer3DModel

    model = WanTransformer3DModel(_config(), params_dtype=torch.bfloat16, device="meta")
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _write_bf16(out: str) -> None:
    import torch

    from mxdit.loader.safetensors_io import write_safetensors

    entries = [(n, torch.bfloat16, shape, (lambda n=n, s=shape: _random(n, s))) for n, shape in _params()]
    write_safetensors(os.path.join(out, "diffusion_pytorch_model.safetensors"), entries, metadata={"format": "pt"})
    cfg = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1", **_config().to_dict()}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def _write_modelslim_dual(out: str) -> None:
    """The msmodelslim export of the same weights (block linears W4A4_MXFP4_DUALSCALE, rest FLOAT)."""
    import torch

    import mxdit.formats as F
    from mxdit.loader.safetensors_io import write_safetensors
    from mxdit.models.wan.names import LINEAR_SUFFIXES_DIFFUSERS, diffusers_to_original

    cache: dict = {}

    def quantized(layer: str, shape):
        if cache.get("layer") != layer:  # the three tensors of a layer are consecutive: quantize once
            cache.clear()
            cache.update(layer=layer, q=F.quantize_mx_dual(_random(layer + ".weight", shape)))
        return cache["q"]

    entries, desc = [], {}
    for n, shape in _params():
        layer, _, leaf = n.rpartition(".")
        parts = layer.split(".", 2)
        is_q = parts[0] == "blocks" and len(parts) == 3 and parts[2] in LINEAR_SUFFIXES_DIFFUSERS
        o = diffusers_to_original(n)
        if not is_q:
            entries.append((o, torch.bfloat16, shape, (lambda n=n, s=shape: _random(n, s))))
            desc[o] = "FLOAT"
        elif leaf == "bias":
            entries.append((o, torch.float32, shape, (lambda n=n, s=shape: _random(n, s).float())))
            desc[o] = "FLOAT"
        else:
            nn, k = shape
            po = o[: -len(".weight")]
            entries += [
                (f"{po}.weight", torch.uint8, (nn, k // 2), lambda l=layer, s=shape: quantized(l, s).qdata),
                (f"{po}.weight_scale", torch.uint8, (nn, k // 32), lambda l=layer, s=shape: quantized(l, s).scale_l1),
                (f"{po}.weight_dual_scale", torch.float32, (nn, k // 512, 1),
                 lambda l=layer, s=shape: quantized(l, s).scale_l0.unsqueeze(-1).contiguous()),
            ]
            for leaf_name in ("weight", "weight_scale", "weight_dual_scale"):
                desc[f"{po}.{leaf_name}"] = "W4A4_MXFP4_DUALSCALE"
    desc["model_quant_type"] = "W4A4_MXFP4_DUALSCALE"
    write_safetensors(os.path.join(out, "quant_model_weight_w4a4_mxfp4_dualscale.safetensors"), entries)
    with open(os.path.join(out, "quant_model_description_w4a4_mxfp4_dualscale.json"), "w") as f:
        json.dump(desc, f, indent=1)


def build(root: str, rebuild: bool) -> None:
    """Build (or reuse) root/bf16 and root/modelslim_dual; a spec file marks a finished build."""
    spec = _spec()
    for sub, writer in (("bf16", _write_bf16), ("modelslim_dual", _write_modelslim_dual)):
        final = os.path.join(root, sub)
        marker = os.path.join(final, ".bench_load_spec.json")
        if not rebuild and os.path.isfile(marker):
            with open(marker) as f:
                if json.load(f) == spec:
                    print(f"reusing {final}", file=sys.stderr)
                    continue
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{sub}.tmp-", dir=root)
        t0 = time.perf_counter()
        try:
            writer(tmp)
            with open(os.path.join(tmp, ".bench_load_spec.json"), "w") as f:
                json.dump(spec, f)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size = sum(os.path.getsize(os.path.join(final, f)) for f in os.listdir(final))
        print(f"built {final}: {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s "
              f"(peak RSS of the builder so far {_peak_bytes() / 2**30:.2f} GiB)", file=sys.stderr)


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "mxdit_bench_load"),
                    help="where the synthetic checkpoints are built / cached")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoints")
    ap.add_argument("--modes", default=",".join(SHORT), help=f"comma-separated subset of {','.join(SHORT)}")
    ap.add_argument("--layers", type=int, default=NUM_LAYERS, help="number of blocks (default %(default)s)")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "QUANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], None if args.child[1] == "none" else args.child[1])
        return 0

    globals()["NUM_LAYERS"] = args.layers
    modes = [SHORT[m.strip()] for m in args.modes.split(",") if m.strip()]
    build(args.dir, args.rebuild)
    env = dict(os.environ, TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1", PYTHONPATH=REPO)
    rows = []
    for mode in modes:
        sub, q = MODES[mode]
        cmd = [sys.executable, os.path.abspath(__file__), "--child", os.path.join(args.dir, sub), q or "none"]
        print(f"loading {mode} ...", file=sys.stderr)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            sys.stderr.write(p.stderr)
            raise SystemExit(f"{mode}: child failed with exit code {p.returncode}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append((mode, r))

    gib = 2**30
    cfg = _config()
    print(f"\n### mxdit.load_transformer: Wan2.2-T2V-A14B width, {cfg.num_layers} blocks "
          f"(dim {cfg.inner_dim}, ffn {cfg.ffn_dim}), bf16 params; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads default\n")
    print("| mode | seconds | peak RSS (GiB) | baseline RSS (GiB) | final param bytes (GiB) "
          "| (peak - baseline) / params | peak / params |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, r in rows:
        pb = r["param_bytes"]
        print(f"| {mode} | {r['seconds']:.1f} | {r['peak'] / gib:.2f} | {r['baseline'] / gib:.2f} | {pb / gib:.2f} "
              f"| {(r['peak'] - r['baseline']) / pb:.2f} | {r['peak'] / pb:.2f} |")
    print("\nTarget: (peak - baseline) / params <= 1.25 for the quantized modes.")
    bad = [m for m, r in rows if m != "bf16" and (r["peak"] - r["baseline"]) / r["param_bytes"] > 1.25]
    if bad:
        print(f"Over target: {', '.join(bad)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
