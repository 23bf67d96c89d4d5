"""bench/kernels.py runs end to end (interpreter smoke mode on the CPU), refuses politely
without a GPU, and its offline compile check builds every kernel for Hopper (sm_90)."""

import pytest
import torch

from bench import kernels as bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_bench_without_gpu_says_so(capsys):
    assert bench.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the real benchmark")
def test_bench_smoke_writes_table(tmp_path):
    out = tmp_path / "kernels-smoke.md"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert "triton (ours)" in text and "| 300 | fused |" in text and "| 300 | plain |" in text


def test_attention_flop_convention():
    # 4 B H T^2 D forward, halved when causal; backward 2.5x (FlashAttention's benchmarks).
    assert bench.attention_flops(2, 3, 10, 8, False, "fwd") == 4 * 2 * 3 * 100 * 8
    assert bench.attention_flops(2, 3, 10, 8, True, "bwd") == 2.5 * 2 * 2 * 3 * 100 * 8


@pytest.mark.slow
def test_attention_kernels_compile_for_hopper():
    """Every kernel compiles for sm_90 (Hopper), the attention ones with wgmma tensor-core
    instructions, on this CPU, with the ptxas that ships with Triton: catches code only the interpreter accepts.
    Runs in a subprocess because this process imported the kernels under TRITON_INTERPRET=1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton.backends.nvidia.compiler  # noqa: F401  (ships with triton on Linux)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--compile-check", "--head-dims", "64"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("wgmma") == 3 and "wgmma 0," not in res.stdout  # attention
    assert res.stdout.count(": compiled") == 7  # norm, RoPE, SwiGLU, cross-entropy, delta
