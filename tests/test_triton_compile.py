"""Every Triton kernel and autotune config compiles for Hopper (sm_90a) and the Blackwell
tl.dot_scaled path for sm_100a — without a GPU, through Triton's own compiler and ptxas —
and the GEMMs use Hopper's wgmma tensor-core instructions.  (Speed needs a GPU:
benchmarks/bench_gpu.py.)"""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")


def test_kernels_compile_for_hopper_and_blackwell():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    proc = subprocess.run([sys.executable, "-m", "mxdit.kernels.triton.aot_check"], env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "0 failures" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("ok   ") and ln.split()[1] in ("mx", "dual", "fp8")]
    hopper = [ln for ln in lines if "sm_100" not in ln]
    blackwell = [ln for ln in lines if "sm_100" in ln]
    assert hopper and all("wgmma" in ln for ln in hopper), out[-3000:]  # Hopper FP8 tensor cores
    assert blackwell and all("tcgen05" in ln for ln in blackwell), out[-3000:]  # tl.dot_scaled: block-scaled MMA
    attn = [ln for ln in out.splitlines() if ln.startswith("ok   attn mxfp8")]
    assert attn and all("wgmma" in ln for ln in attn), out[-3000:]  # MXFP8 flash attention: FP8 wgmma for Q K^T
