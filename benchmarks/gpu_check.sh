#!/usr/bin/env bash
# One GPU check for whoever next has an NVIDIA GPU (written for an H200; < 8 min there).
# Runs every GPU correctness test without the Triton interpreter, bench_gpu.py (the GEMMs),
# bench_attention.py (attention quality + speed at 480p / 720p token counts) and one tiny
# end-to-end generation with quantized attention, writing every table to $OUT
# (default ./gpu_check_out).  Exit status: 0 all passed, 1 a check failed.
# Usage:  OUT=/path bash benchmarks/gpu_check.sh      (from the repository root)
set -u
OUT="${OUT:-./gpu_check_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
unset TRITON_INTERPRET
status=0
step() {  # step NAME TIMEOUT_S CMD...: run, tee to $OUT/NAME.txt, remember failures
    local name="$1" limit="$2"; shift 2
    echo "=== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}
: > "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch" | tee -a "$OUT/summary.txt"; exit 1
fi
# 1. GPU correctness tests (no interpreter): quantized attention on CUDA
step tests_gpu 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention_gpu.py
# 2. the GEMMs and the Triton kernels' on-GPU checks (its "checks:" line must have no FAIL)
step bench_gpu 240 "$PY" benchmarks/bench_gpu.py --quick --json "$OUT/bench_gpu.json"
if grep -q "FAIL" "$OUT/bench_gpu.txt"; then echo "=== bench_gpu: a check FAILED" | tee -a "$OUT/summary.txt"; status=1; fi
# 3. attention quality (32760 tokens = 480p 81 frames) and speed (480p, 720p) vs SDPA flash
step bench_attention 150 "$PY" benchmarks/bench_attention.py --device cuda --seq 32760 --time-seq 32760,75600 \
    --reps 2 --out "$OUT"
# 4. one tiny end-to-end generation with MXFP8 linears and rotated MXFP8 self-attention
step generate_tiny 90 "$PY" - "$OUT" <<'PYEOF'
import sys, time, torch
from mxdit.pipelines.tiny import ensure_tiny_wan_model_dir
from mxdit.pipelines.wan import WanVideoPipeline, psnr
out = sys.argv[1]
model_dir, _ = ensure_tiny_wan_model_dir(f"{out}/tiny-model")
res = {}
for attn in (None, "mxfp8_rotated"):
    pipe = WanVideoPipeline.from_pretrained(model_dir, quantization="mxfp8", device="cuda",
                                            attention_quantization=attn or "none")
    t0 = time.perf_counter()
    frames = pipe(prompt="a cat surfing", height=64, width=64, num_frames=9, num_inference_steps=4, seed=0).frames
    res[attn] = (torch.as_tensor(frames).double(), time.perf_counter() - t0)
a, b = res[None][0], res["mxfp8_rotated"][0]
print(f"| attention | seconds |\n|---|---|\n| bf16 | {res[None][1]:.2f} |\n| mxfp8_rotated | {res['mxfp8_rotated'][1]:.2f} |")
print(f"PSNR of the mxfp8_rotated-attention video against the BF16-attention video: {psnr(a, b):.2f} dB (uint8 frames)")
assert torch.isfinite(b).all()
PYEOF
echo "gpu_check: $( [ $status -eq 0 ] && echo all passed || echo FAILED ) -- tables in $OUT" | tee -a "$OUT/summary.txt"
exit $status
