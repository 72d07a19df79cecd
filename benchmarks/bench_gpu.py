"""GPU benchmark of the Triton backend (NVIDIA; written for H100/H200) against cuBLAS BF16.

Table 1, per Wan2.2-A14B linear shape (M = 32760 tokens: 21 x 30 x 52 latent patches,
480x832, 81 frames; K x N = 5120x5120 (attention projections), 5120x13824 (FFN up),
13824x5120 (FFN down)): time and TFLOP/s of each method -- the whole quantized linear
(activation quantization + GEMM), the GEMM alone and the activation quantization alone --
against ``torch.nn.functional.linear`` in BF16 (cuBLAS) measured in the same run, with
ratios, the fraction of the dense FP8 and BF16 peaks and the weight bits per value.
Methods: mxfp8, mxfp4 (weights packed FP4 expanded per tile, or expanded once to E4M3),
mxfp4_dual (the same two weight modes), fp8 per-channel (torch._scaled_mm and the Triton
GEMM).  On capability >= 10 the MX rows use tl.dot_scaled (native MX), else the explicit
FP8 path.

Table 2: accuracy on the first rows against fp64 references of what each kernel is meant
to compute -- in particular the FP8 tensor-core accumulation error with and without fp32
promotion (Hopper's FP8 MMA accumulates with reduced precision: only measurable on the
GPU; the Triton interpreter computes exact fp32 either way) -- plus bit-exactness of the
quantization kernels against mxdit.formats on the GPU, the dual-level expansion
statistics of the weights, and hw-vs-integer conversion agreement.

Table 3: a whole Wan transformer block forward (self-attention with RoPE over the 32760
tokens, cross-attention to 512 text tokens, FFN; dim 5120, 40 heads, ffn 13824), every
linear quantized with quantize_module(..., backend="triton"), against the BF16 block.

Timing: triton.testing.do_bench (CUDA events; warm-up, median of the repetitions).
Peaks (dense, SXM datasheet, override with --fp8-peak / --bf16-peak): H100/H200 FP8
1979 TFLOP/s, BF16 989 TFLOP/s (the H200 device notes give BF16 ~990; FP8 dense is twice
that).  The cuBLAS BF16 rate measured in the same run is the practical baseline.

Usage:  python benchmarks/bench_gpu.py [--m 32760] [--shapes 5120x5120,...] [--no-block]
        [--quick] [--json out.json]
        python benchmarks/bench_gpu.py --smoke   # CPU + TRITON_INTERPRET, tiny shapes: checks
                                                 # the script's code paths only (no timings)
Without a CUDA GPU (and without --smoke) it prints a message and exits (status 0).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

PEAKS = {  # dense TFLOP/s (FP8, BF16), SXM datasheet numbers
    "H100": (1979.0, 989.0),
    "H200": (1979.0, 989.0),
    "H800": (1979.0, 989.0),
    "B200": (4500.0, 2250.0),
}


def log(*a):
    print(*a, flush=True)


class Timer:
    def __init__(self, cuda: bool, quick: bool):
        self.cuda = cuda
        self.quick = quick

    def __call__(self, fn) -> float:
        """Median milliseconds."""
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10 if self.quick else 25, rep=40 if self.quick else 100,
                                                 return_mode="median"))
        t0 = time.perf_counter()  # smoke run (interpreter): one call, the time means nothing
        fn()
        return (time.perf_counter() - t0) * 1e3


def tflops(m, n, k, ms):
    return 2.0 * m * n * k / (ms * 1e-3) / 1e12


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300)), float((out - ref).abs().max() / ref.abs().max())


def fmt_table(rows, header):
    w = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(r))
    return "\n".join([line(header), line(["-" * x for x in w])] + [line(r) for r in rows])


# ----------------------------------------------------------------------------- table 1 + 2
def bench_shape(m, k, n, timer, peaks, dev, results, quick):
    from mxdit import formats as F
    from mxdit.kernels import get_backend
    from mxdit.kernels.triton import TritonBackend, dual_expansion_stats, expand_dual_to_e4m3, normalize_dual_scales
    from mxdit.kernels.base import quantize_fp8_per_token

    ref_be = get_backend("reference")
    g = torch.Generator(device="cpu").manual_seed(k * 7 + n)
    x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dev, torch.bfloat16)
    bias = (torch.randn(n, generator=g) * 0.1).to(dev)
    fp8_peak, bf16_peak = peaks
    rows = []
    be = TritonBackend()
    ds = be.use_dot_scaled(x)
    sub = min(m, 512)  # rows checked against references

    t_bf16 = timer(lambda: torch.nn.functional.linear(x, w))
    ref_bf16_tf = tflops(m, n, k, t_bf16)

    def add(name, bits, t_total, t_gemm, t_quant):
        tf = tflops(m, n, k, t_total)
        tg = tflops(m, n, k, t_gemm) if t_gemm else float("nan")
        rows.append([name, f"{bits:.2f}", f"{t_total:.3f}", f"{tf:.0f}", f"{t_bf16 / t_total:.2f}",
                     f"{t_gemm:.3f}" if t_gemm else "-", f"{tg:.0f}" if t_gemm else "-",
                     f"{tg / fp8_peak:.2f}" if t_gemm and fp8_peak else "-",
                     f"{tg / bf16_peak:.2f}" if t_gemm and bf16_peak else "-",
                     f"{t_quant:.3f}" if t_quant else "-"])
        results.append(dict(shape=[m, k, n], method=name, weight_bits=bits, ms=t_total, tflops=tf, gemm_ms=t_gemm,
                            gemm_tflops=tg, quant_ms=t_quant, vs_bf16=t_bf16 / t_total))

    rows.append(["bf16 cuBLAS (F.linear)", "16.00", f"{t_bf16:.3f}", f"{ref_bf16_tf:.0f}", "1.00", f"{t_bf16:.3f}",
                 f"{ref_bf16_tf:.0f}", f"{ref_bf16_tf / fp8_peak:.2f}" if fp8_peak else "-",
                 f"{ref_bf16_tf / bf16_peak:.2f}" if bf16_peak else "-", "-"])
    acc_rows = []
    checks = []

    # ---- MX (mxfp8, mxfp4 with both weight layouts)
    for fmt, label, wmodes in (("fp8_e4m3", "mxfp8", ("fp8",)), ("fp4_e2m1", "mxfp4", ("fp4", "fp8"))):
        wq = be.quantize_mx(w, fmt)
        qr = F.quantize_mx(w[: min(n, 256)], fmt)
        checks.append((f"quantize_mx {fmt} weight bit-exact",
                       torch.equal(wq.scale[: qr.scale.shape[0]], qr.scale)
                       and torch.equal(wq.qdata[: qr.scale.shape[0]].view(torch.uint8), qr.qdata.view(torch.uint8))))
        for wm in wmodes:
            b2 = TritonBackend(mxfp4_weight=wm)
            wp = b2.prepare_mx_weight(wq)
            a_fp4 = fmt == "fp4_e2m1" and ds
            out_e4m3 = fmt == "fp4_e2m1" and not ds
            a, sa = b2.quantize_mx_2d(x, fmt, out_e4m3=out_e4m3)
            t_q = timer(lambda: b2.quantize_mx_2d(x, fmt, out_e4m3=out_e4m3))
            t_g = timer(lambda: b2.mx_gemm(a, sa, a_fp4, wp, bias, torch.bfloat16))
            t_all = timer(lambda: b2.mx_linear(x, wp, bias, act_fmt=fmt, out_dtype=torch.bfloat16))
            bits = 8 + 8 / 32 if (fmt == "fp8_e4m3" or wm == "fp8") else 4 + 8 / 32
            name = f"{label} {'dot_scaled' if ds else 'explicit'}" + (f" w={wm}" if fmt == "fp4_e2m1" else "")
            add(name, bits, t_all, t_g, t_q)
            o = b2.mx_linear(x[:sub], wp, bias, act_fmt=fmt, out_dtype=torch.float32)
            r = ref_be.mx_linear(x[:sub], wq, bias, act_fmt=fmt, out_dtype=torch.float32)
            acc_rows.append([name, "vs reference backend (fp32)", *(f"{e:.2e}" for e in rel_err(o, r))])
        xq = be.quantize_mx(x[:sub], fmt)
        xr = F.quantize_mx(x[:sub], fmt)
        checks.append((f"quantize_mx {fmt} activations bit-exact",
                       torch.equal(xq.scale, xr.scale) and torch.equal(xq.qdata.view(torch.uint8), xr.qdata.view(torch.uint8))))

    # ---- dual-level MXFP4 (both weight modes), promotion on/off
    wq = be.quantize_mx_dual(w)
    wr = F.quantize_mx_dual(w[: min(n, 256)])
    checks.append(("quantize_mx_dual weight bit-exact",
                   torch.equal(wq.qdata[: wr.qdata.shape[0]], wr.qdata) and torch.equal(wq.scale_l1[: wr.qdata.shape[0]], wr.scale_l1)
                   and torch.equal(wq.scale_l0[: wr.qdata.shape[0]].view(torch.int32), wr.scale_l0.view(torch.int32))))
    xd, xdr = be.quantize_mx_dual(x[:sub]), F.quantize_mx_dual(x[:sub])
    checks.append(("quantize_mx_dual activations bit-exact", torch.equal(xd.qdata, xdr.qdata)
                   and torch.equal(xd.scale_l1, xdr.scale_l1) and torch.equal(xd.scale_l0.view(torch.int32), xdr.scale_l0.view(torch.int32))))
    st = dual_expansion_stats(wq.to("cpu") if quick else wq)
    a8, _, l0a = be.quantize_dual_2d(x, out_e4m3=True)
    t_q = timer(lambda: be.quantize_dual_2d(x, out_e4m3=True))
    # fp64 model of the FP8 GEMM: expanded operands times L0, per 512-group
    l1n, l0n, _ = normalize_dual_scales(wq)
    b8 = expand_dual_to_e4m3(wq.codes(), l1n).double()
    a8s = a8[:sub].view(torch.float8_e4m3fn).double()
    ref64 = torch.zeros(sub, n, dtype=torch.float64, device=dev)
    for gi in range(k // 512):
        s = slice(gi * 512, (gi + 1) * 512)
        ref64 += (a8s[:, s] @ b8[:, s].t()) * l0a[:sub, gi : gi + 1].double() * l0n[:, gi].double().unsqueeze(0)
    ref64 += bias.double()
    outs = {}
    for wm in ("fp4", "fp8"):
        b2 = TritonBackend(dual_weight=wm)
        wp = b2.prepare_dual_weight(wq)
        for promote in (True, False):
            b2.promote = promote
            t_g = timer(lambda: b2.dual_gemm(a8, l0a, wp, bias, torch.bfloat16))
            t_all = timer(lambda: b2.dual_linear(x, wp, bias, out_dtype=torch.bfloat16))
            bits = (4 + 8 / 32 + 32 / 512) if wm == "fp4" else (8 + 32 / 512)
            name = f"mxfp4_dual w={wm} promote={'y' if promote else 'n'}"
            add(name, bits, t_all, t_g, t_q)
            o = b2.dual_gemm(a8[:sub], l0a[:sub], wp, bias, torch.float32)
            outs[(wm, promote)] = o
            acc_rows.append([name, "vs fp64 of the FP8 GEMM", *(f"{e:.2e}" for e in rel_err(o, ref64))])
        if wm == "fp4":
            hw0 = TritonBackend(dual_weight="fp4", hw_cvt="0").dual_gemm(a8[:sub], l0a[:sub], wp, bias, torch.float32)
            checks.append(("dual fp4-weight expansion: hw cvt == integer path (promote=y)", torch.equal(hw0, outs[("fp4", True)])))
    checks.append(("dual weight modes fp4 == fp8 (promote=y)", torch.equal(outs[("fp4", True)], outs[("fp8", True)])))
    rd = ref_be.dual_linear(x[:sub], wq, bias, out_dtype=torch.float32)
    acc_rows.append(["mxfp4_dual w=fp8 promote=y", "vs reference backend (fp32)", *(f"{e:.2e}" for e in rel_err(outs[("fp8", True)], rd))])

    # ---- FP8 per-channel
    wq8, ws8 = quantize_fp8_per_token(w)
    wp8 = be.prepare_fp8_weight(wq8, ws8.reshape(-1))
    xq, sx = be.quantize_fp8_2d(x)
    rq, rs = quantize_fp8_per_token(x[:sub])
    # torch CUDA divides by the python scalar 448 as a reciprocal multiply; the kernel
    # (like torch on CPU, the reference) divides: compare the codes only where scales agree
    same = (sx[:sub] == rs).reshape(-1)
    checks.append(("quantize_fp8 per-token codes == torch (rows with equal scales)",
                   torch.equal(xq[:sub][same].view(torch.uint8), rq[same].view(torch.uint8))))
    t_q = timer(lambda: be.quantize_fp8_2d(x))
    ref8 = (xq[:sub].double() @ wq8.double().t()) * sx[:sub].double() * ws8.reshape(1, -1).double()
    for impl in ("scaled_mm", "triton"):
        if impl == "scaled_mm" and (dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 9)):
            continue
        for promote in ((True, False) if impl == "triton" else (None,)):
            t_g = timer(lambda: be.fp8_gemm_2d(xq, sx, wp8, None, torch.bfloat16, impl=impl, promote=promote))
            b2 = TritonBackend(fp8_gemm=impl, promote=bool(promote) if promote is not None else True)
            t_all = timer(lambda: b2.fp8_linear(x, wp8, None, out_dtype=torch.bfloat16))
            name = f"fp8 per-channel {impl}" + ("" if promote is None else f" promote={'y' if promote else 'n'}")
            add(name, 8 + 32 / k, t_all, t_g, t_q)
            odt = torch.bfloat16 if impl == "scaled_mm" else torch.float32
            o = be.fp8_gemm_2d(xq[:sub], sx[:sub], wp8, None, odt, impl=impl, promote=promote)
            acc_rows.append([name, "vs fp64" + (" (bf16 output)" if odt == torch.bfloat16 else ""),
                             *(f"{e:.2e}" for e in rel_err(o, ref8))])

    log(f"\n=== M={m} K={k} N={n}  (bf16 cuBLAS {t_bf16:.3f} ms = {ref_bf16_tf:.0f} TFLOP/s; "
        f"MX path: {'tl.dot_scaled' if ds else 'explicit FP8 (per-32 rescale)'})")
    log(fmt_table(rows, ["method", "w bits", "ms", "TFLOP/s", "x bf16", "gemm ms", "gemm TF/s", "of FP8 pk",
                         "of BF16 pk", "quant ms"]))
    log("\naccuracy (first %d rows): relative L2 error, max |err| / max |ref|" % sub)
    log(fmt_table(acc_rows, ["method", "against", "rel L2", "max rel"]))
    log("\nchecks: " + "; ".join(f"{c}: {'OK' if ok else 'FAIL'}" for c, ok in checks))
    log(f"dual-level weight expansion: {st['blocks_below_119']} of {st['blocks']} blocks below L1=119, "
        f"{st['elements_changed']} elements changed, rel L2 {st['rel_l2_error']:.2e}")
    results.append(dict(shape=[m, k, n], accuracy=acc_rows, checks=[(c, bool(ok)) for c, ok in checks], dual_stats=st))


def bench_act_quant(m, k, timer, dev, results):
    from mxdit.kernels.triton import TritonBackend

    be = TritonBackend()
    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
    rows = []
    cases = [
        ("mxfp8 (codes + E8M0)", lambda: be.quantize_mx_2d(x, "fp8_e4m3"), m * k * 2 + m * k + m * k // 32),
        ("mxfp4 packed", lambda: be.quantize_mx_2d(x, "fp4_e2m1"), m * k * 2 + m * k // 2 + m * k // 32),
        ("mxfp4 -> E4M3 bytes (GEMM input)", lambda: be.quantize_mx_2d(x, "fp4_e2m1", out_e4m3=True),
         m * k * 2 + m * k + m * k // 32),
        ("dual canonical", lambda: be.quantize_dual_2d(x), m * k * 2 + m * k // 2 + m * k // 32 + m * k // 128),
        ("dual -> E4M3 bytes (GEMM input)", lambda: be.quantize_dual_2d(x, out_e4m3=True),
         m * k * 2 + m * k + m * k // 128),
        ("fp8 per-token (2 passes)", lambda: be.quantize_fp8_2d(x), m * k * 4 + m * k + 4 * m),
    ]
    for name, fn, nbytes in cases:
        t = timer(fn)
        rows.append([name, f"{t:.3f}", f"{nbytes / (t * 1e-3) / 1e9:.0f}"])
        results.append(dict(act_quant=name, m=m, k=k, ms=t, gbps=nbytes / (t * 1e-3) / 1e9))
    log(f"\n=== activation quantization alone, M={m} K={k} bf16 (GB/s counts bytes read + written once)")
    log(fmt_table(rows, ["kernel", "ms", "GB/s"]))


# ----------------------------------------------------------------------------- table 3
def bench_block(m, grid, timer, dev, results, small):
    from mxdit.layers.rope import WanRotaryPosEmbed
    from mxdit.models.wan.config import WanTransformerConfig
    from mxdit.models.wan.transformer import WanTransformerBlock, _Factory
    from mxdit import quantize_module

    if small:
        cfg = WanTransformerConfig(num_attention_heads=4, attention_head_dim=128, ffn_dim=512, num_layers=1)
        ctx = 16
    else:
        cfg = WanTransformerConfig()  # 14B: dim 5120, 40 heads x 128, ffn 13824
        ctx = 512
    dim = cfg.inner_dim
    block = WanTransformerBlock(cfg, prefix="blocks.0", factory=_Factory(None, torch.bfloat16, dev))
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            v = torch.randn(p.shape, generator=g) * 0.02
            if name.endswith("weight") and "norm" in name:
                v += 1
            p.copy_(v.to(p.dtype))
    hs = torch.randn(1, m, dim, generator=g).to(dev, torch.bfloat16)
    enc = torch.randn(1, ctx, dim, generator=g).to(dev, torch.bfloat16)
    temb = (torch.randn(1, 6, dim, generator=g) * 0.1).to(dev)
    rope = WanRotaryPosEmbed(cfg.attention_head_dim, (1, 2, 2), cfg.rope_max_seq_len).tables(grid, dev)

    def run(b):
        with torch.no_grad():
            return b(hs, enc, temb, rope)

    ref = run(block)
    t_ref = timer(lambda: run(block))
    rows = [["bf16", f"{t_ref:.2f}", "1.00", "-"]]
    for method in ("mxfp8", "mxfp4", "mxfp4_dual", "fp8"):
        qb = copy.deepcopy(block)
        summary = quantize_module(qb, method, backend="triton", include=["*"])  # a lone block: no "blocks." prefix
        out = run(qb)
        t = timer(lambda: run(qb))
        err = rel_err(out.float(), ref.float())[0]
        rows.append([f"{method} ({len(summary.layers)} linears, {summary.bits_per_weight:.2f} b/w)", f"{t:.2f}",
                     f"{t_ref / t:.2f}", f"{err:.2e}"])
        results.append(dict(block=method, ms=t, vs_bf16=t_ref / t, rel_err_vs_bf16=err))
        del qb
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    log(f"\n=== Wan block forward, M={m} tokens (grid {grid}), dim {dim}, {cfg.num_attention_heads} heads, "
        f"ffn {cfg.ffn_dim}, text {ctx}; output error vs the BF16 block (rel L2)")
    log(fmt_table(rows, ["block", "ms", "x bf16", "rel err vs bf16"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=32760)
    ap.add_argument("--shapes", default="5120x5120,5120x13824,13824x5120", help="KxN list")
    ap.add_argument("--no-block", action="store_true")
    ap.add_argument("--quick", action="store_true", help="shorter timing windows")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes: code paths only")
    ap.add_argument("--fp8-peak", type=float, default=None)
    ap.add_argument("--bf16-peak", type=float, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    if args.smoke:
        dev = torch.device("cpu")
        shapes, m, grid = [(512, 48)], 40, (2, 4, 5)
    else:
        if not torch.cuda.is_available():
            log("bench_gpu: no CUDA GPU available (torch.cuda.is_available() is False): this benchmark "
                "measures the Triton kernels on an NVIDIA GPU, so nothing was measured. "
                "(`--smoke` runs its code paths on the CPU interpreter.)")
            return 0
        try:
            import triton  # noqa: F401
        except ImportError:
            log("bench_gpu: triton is not installed; nothing was measured.")
            return 0
        dev = torch.device("cuda")
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        m = args.m
        grid = (21, 30, 52) if m == 32760 else (1, 1, m)
    timer = Timer(dev.type == "cuda", args.quick)

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter smoke run)"
    peaks = next((v for key, v in PEAKS.items() if key in name), (float("nan"), float("nan")))
    peaks = (args.fp8_peak or peaks[0], args.bf16_peak or peaks[1])
    import triton

    log(f"device: {name}" + (f", capability {torch.cuda.get_device_capability(dev)}" if dev.type == "cuda" else "")
        + f"; torch {torch.__version__}, triton {triton.__version__}; peaks FP8 {peaks[0]:.0f} / BF16 {peaks[1]:.0f} "
        "TFLOP/s dense")
    results: list = []
    for k, n in shapes:
        bench_shape(m, k, n, timer, peaks, dev, results, args.smoke or args.quick)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    bench_act_quant(m, shapes[0][0], timer, dev, results)
    if not args.no_block:
        bench_block(m, grid, timer, dev, results, small=args.smoke)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.smoke:
        log("\n(smoke run: interpreter timings are meaningless)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
