"""Quantized attention on Wan shapes: quality of each mode and speed against SDPA, same run.

Table 1 (quality): Wan2.2-A14B self-attention shapes (head_dim 128, 40 heads) with
Q/K outlier channels, each mode against float64 attention of the same BF16 inputs:
cosine similarity, relative Frobenius error, and the worst head's relative error.
Rows: BF16 SDPA itself (the floor), mxfp8 / fp8_block without rotation, with SGLang's
online QR rotation (seed 42), and with msmodelslim's random Hadamard (seed 1234, the
checkpoint q_rot / k_rot).

How the inputs are made (video DiTs show a few "massive" Q/K channels and a per-channel
K offset; SageAttention's K smoothing exists for the latter): per head, Q and K are
0.5 * N(0, 1) with 4 random channels (the same for Q and K, chosen per head) scaled by
``--outlier-gain`` (default 10) and K gets a per-channel offset N(0, 1); V is N(0, 1).
All in BF16, seeded.

Table 2 (speed): the quantized attention of the selected kernel backend against
``F.scaled_dot_product_attention`` in BF16 measured in the same run (ratio = SDPA time /
mode time; > 1 means faster than SDPA).  CPU: the reference backend (dequantize, then
fp32 attention; an oracle, not a fast path) at small sequence lengths only.  GPU (FP8
tensor cores, capability >= 8.9): SDPA's flash backend against the Triton MXFP8
flash-attention kernel (``mxfp8``, quantization of Q/K/V included in the time) and the
reference path for ``fp8_block`` (no kernel), run per head chunk.  Reference-path modes
process heads in chunks of ``--head-chunk`` (exact: every mode quantizes per head); the
Triton kernel takes all heads in one launch.

Sequence lengths of Wan2.2 clips (latent frames x patches): 480x832x81 -> 21x30x52 =
32760 tokens, 1280x720x81 -> 21x45x80 = 75600.  Default here: CPU 1024 (quality) and
512,1024 (speed); ``--seq 32760`` on a GPU.

Usage:  python benchmarks/bench_attention.py [--seq 1024] [--heads 40] [--time-seq 512,1024]
        [--device cpu|cuda] [--out DIR]  (writes attention_quality.md / attention_speed.md)
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_name, median_seconds  # noqa: E402

from mxdit.formats.rotation import online_rotation, random_hadamard  # noqa: E402
from mxdit.kernels import select_backend  # noqa: E402

D = 128


def make_qkv(seq: int, heads: int, gain: float, seed: int, device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = 0.5 * torch.randn(1, seq, heads, D, generator=g)
    k = 0.5 * torch.randn(1, seq, heads, D, generator=g)
    for h in range(heads):
        ch = torch.randperm(D, generator=g)[:4]
        q[:, :, h, ch] *= gain
        k[:, :, h, ch] *= gain
    k = k + torch.randn(1, 1, heads, D, generator=g)
    v = torch.randn(1, seq, heads, D, generator=g)
    return tuple(t.to(torch.bfloat16).to(device) for t in (q, k, v))


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def chunked(fn, q, k, v, chunk):
    return torch.cat([fn(q[:, :, i:i + chunk], k[:, :, i:i + chunk], v[:, :, i:i + chunk])
                      for i in range(0, q.shape[2], chunk)], dim=2)


def modes(device):
    be = select_backend(device)
    rot_qr = online_rotation(D, torch.bfloat16, device)
    rot_had = random_hadamard(D).to(device)

    def quant(mode, r=None):
        def fn(q, k, v):
            if r is not None:
                q, k = q @ r, k @ r
            return be.quantized_attention(q, k, v, mode=mode)
        return fn
    return be, [
        ("bf16 sdpa", "-", sdpa),
        ("mxfp8", "none", quant("mxfp8")),
        ("mxfp8", "online QR (seed 42)", quant("mxfp8", rot_qr)),
        ("mxfp8", "random Hadamard (seed 1234)", quant("mxfp8", rot_had)),
        ("fp8_block", "none", quant("fp8_block")),
        ("fp8_block", "online QR (seed 42)", quant("fp8_block", rot_qr)),
        ("fp8_block", "random Hadamard (seed 1234)", quant("fp8_block", rot_had)),
    ]


def truth(q, k, v, chunk):
    def f64(q, k, v):
        qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
        p = torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(D), dim=-1)
        return (p @ vd).transpose(1, 2)
    return chunked(f64, q, k, v, chunk)


def quality(args, device) -> str:
    q, k, v = make_qkv(args.seq, args.heads, args.outlier_gain, args.seed, device)
    ref = truth(q, k, v, args.head_chunk)
    be, rows = modes(device)
    name = be.name
    lines = [f"Quality, {args.seq} tokens x {args.heads} heads x head_dim {D}, outlier gain "
             f"{args.outlier_gain}, against float64 attention of the BF16 inputs (kernel backend: {name})", "",
             "| mode | rotation | cosine | rel. error | worst head rel. error |", "|---|---|---|---|---|"]
    for mode, rot, fn in rows:
        out = chunked(fn, q, k, v, _chunk(be, mode, args)).double()
        cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
        rel = ((out - ref).norm() / ref.norm()).item()
        per_head = ((out - ref).pow(2).sum(dim=(0, 1, 3)).sqrt() / ref.pow(2).sum(dim=(0, 1, 3)).sqrt())
        lines.append(f"| {mode} | {rot} | {cos:.6f} | {rel:.3e} | {per_head.max().item():.3e} "
                     f"(head {int(per_head.argmax())}) |")
    return "\n".join(lines)


def _chunk(be, mode, args) -> int:
    """Heads per call: all for the fused Triton kernel, --head-chunk for the reference math."""
    return args.heads if (be.name == "triton" and mode == "mxfp8") else args.head_chunk


def speed(args, device) -> str:
    be, rows = modes(device)
    name = be.name
    rows = [r for r in rows if r[1] in ("-", "none")]
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else cpu_name()
    how = ("mxfp8 = fused Triton MXFP8 flash attention incl. Q/K/V quantization; fp8_block = reference math"
           if name == "triton" else "reference = dequantize then fp32 attention, not a fused kernel")
    lines = [f"Speed on {where} ({args.heads} heads x head_dim {D}, batch 1; kernel backend {name}: {how})", "",
             "| tokens | SDPA bf16 ms | mode | mode ms | SDPA / mode |", "|---|---|---|---|---|"]
    for seq in args.time_seq:
        q, k, v = make_qkv(seq, args.heads, args.outlier_gain, args.seed, device)

        def timed(fn, chunk=args.head_chunk):
            def run():
                chunked(fn, q, k, v, chunk)
                if cuda:
                    torch.cuda.synchronize()
            return median_seconds(run, reps=args.reps, warmup=1)
        if cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                t_sdpa = timed(sdpa, args.heads)
        else:
            t_sdpa = timed(sdpa)
        for mode, _, fn in rows[1:]:
            t = timed(fn, _chunk(be, mode, args))
            lines.append(f"| {seq} | {t_sdpa * 1e3:.1f} | {mode} | {t * 1e3:.1f} | {t_sdpa / t:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, default=None, help="tokens for the quality table")
    ap.add_argument("--time-seq", default=None, help="comma-separated token counts for the speed table")
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-chunk", type=int, default=None)
    ap.add_argument("--outlier-gain", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--out", default=None, help="directory for attention_quality.md / attention_speed.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.seq is None:
        args.seq = 32760 if gpu else 1024
    args.time_seq = [int(s) for s in (args.time_seq or ("32760,75600" if gpu else "512,1024")).split(",")]
    if args.head_chunk is None:
        args.head_chunk = 1 if gpu else 8
    if args.seq <= 0 or args.heads <= 0 or args.head_chunk <= 0 or any(s <= 0 for s in args.time_seq):
        print("bench_attention: --seq, --time-seq, --heads and --head-chunk must be positive", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    tables = {"attention_quality.md": quality(args, device)}
    if not args.no_speed:
        tables["attention_speed.md"] = speed(args, device)
    if not gpu:
        note = ("Note: CPU run at small sequence lengths (the reference backend materializes the score matrix); "
                "Wan clips have 32760 (480p) / 75600 (720p) tokens: run with --device cuda for those.")
        tables = {k: t + "\n\n" + note for k, t in tables.items()}
    for fname, t in tables.items():
        print(t + "\n")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            tmp = os.path.join(args.out, fname + ".tmp")
            with open(tmp, "w") as f:
                f.write(t + "\n")
            os.replace(tmp, os.path.join(args.out, fname))
    return 0


if __name__ == "__main__":
    sys.exit(main())
