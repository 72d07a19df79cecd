"""One denoising step of a Wan transformer at SP=1, Ulysses SP=2 and CFG=2 (gloo on CPU, or nccl/hccl).

A step is what the pipeline does per timestep with guidance: the conditional and the unconditional
forward, then ``uncond + s * (cond - uncond)``.  SP=1 runs both on one process; SP=2 splits the tokens
over 2 ranks (Ulysses all-to-all around self-attention); CFG=2 runs one branch per rank and gathers.
Each row is the median over ``--reps`` steps after a warm-up, timed on rank 0 between barriers.

On this project's 2-core CPU it will NOT scale: two ranks share two cores (one thread each vs two
threads for SP=1) and gloo moves tensors through loopback TCP.  The script is written for a
multi-device machine: ``--device cuda`` (or ``npu``) gives each rank its own device.

    python benchmarks/bench_parallel.py                      # small CPU run
    python benchmarks/bench_parallel.py --device cuda --dim 5120 --heads 40 --ffn 13824 --layers 4 \\
        --frames 21 --height 60 --width 104 --quantization mxfp8
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch

from _common import cpu_name

NOTE = ("note: on a 2-core CPU this does not scale (the ranks share the cores; gloo goes through "
        "loopback TCP); the script is written for a multi-device machine (--device cuda / npu)")


def _model(a, device):
    from mxdit.models.wan.config import WanTransformerConfig
    from mxdit.models.wan.transformer import WanTransformer3DModel
    from mxdit.quant.registry import get_quant_config

    cfg = WanTransformerConfig(num_attention_heads=a.heads, attention_head_dim=a.dim // a.heads, in_channels=16,
                               out_channels=16, text_dim=a.dim, ffn_dim=a.ffn, num_layers=a.layers)
    qc = get_quant_config(a.quantization) if a.quantization else None
    m = WanTransformer3DModel(cfg, quant_config=qc, params_dtype=torch.bfloat16).init_random_weights_()
    for _, layer in m.quant_linears():  # quantize the random weights as the loader does
        layer.process_weights_after_loading()
    return m.to(device).eval()


def step_time(a):
    """Median seconds of one guided step under the active layout (run on every rank)."""
    from mxdit import distributed as mxdist

    device = mxdist.rank_device(a.device, mxdist.get_local_rank()) if mxdist.get_world_size() > 1 else a.device
    model = _model(a, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, a.frames, a.height, a.width, generator=g).to(device, torch.bfloat16)
    t = torch.tensor([500.0], device=device)
    cond = torch.randn(1, 64, a.dim, generator=g).to(device, torch.bfloat16)
    uncond = torch.randn(1, 64, a.dim, generator=g).to(device, torch.bfloat16)

    def one():
        with torch.no_grad():
            if mxdist.cfg_parallel_active():
                e = cond if mxdist.cfg_rank() == 0 else uncond
                c, u = mxdist.gather_cfg(model(x, t, e, return_dict=False)[0])
            else:
                c = model(x, t, cond, return_dict=False)[0]
                u = model(x, t, uncond, return_dict=False)[0]
            out = u + 5.0 * (c - u)
        if device != "cpu":
            getattr(torch, torch.device(device).type).synchronize()
        return out

    one()
    times = []
    for _ in range(a.reps):
        mxdist.barrier()
        t0 = time.perf_counter()
        one()
        mxdist.barrier()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--frames", type=int, default=4, help="latent frames")
    p.add_argument("--height", type=int, default=16, help="latent height")
    p.add_argument("--width", type=int, default=16, help="latent width")
    p.add_argument("--quantization", default=None, help="e.g. mxfp8 (default: BF16)")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)

    from mxdit.distributed import ParallelConfig, launch

    tokens = a.frames * (a.height // 2) * (a.width // 2)
    print(f"bench_parallel: one guided step, dim {a.dim}, {a.heads} heads, {a.layers} layers, {tokens} tokens, "
          f"{a.quantization or 'bf16'}, device {a.device} ({cpu_name() if a.device == 'cpu' else a.device})")
    print(NOTE)
    layouts = [("SP=1 (1 rank)", ParallelConfig()),
               ("Ulysses SP=2", ParallelConfig(num_gpus=2, ulysses_degree=2)),
               ("CFG=2", ParallelConfig(num_gpus=2, cfg_degree=2))]
    rows = []
    for name, pc in layouts:
        pc.validate(num_heads=a.heads, seq_len=tokens)
        rows.append((name, launch(step_time, pc, a, device=a.device, timeout_s=600, join_timeout_s=3600)))
    base = rows[0][1]
    print(f"\n| layout | step (s) | speed-up vs SP=1 |\n|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.3f} | {base / s:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
