"""bench/gpu_check.py, the one-command GPU check, end to end on this CPU (--smoke: interpreter,
tiny shapes, every part in its own process): tables and log land in the chosen folder only; an
injected part failure is reported (FAIL, traceback in the log) while the other parts still
run; a part that overruns is killed; the targets table reads the measurements right. Autotune
pinning (KERNELS_AUTOTUNE_CONFIGS) keeps the first configs the kernel's own prune allows."""

import io
import json
import os
import sys

import pytest

from bench import gpu_check
from bench.tables import RESULTS_DIR
from kernels import attention as A
from kernels._common import _first_configs, autotune_limit


def test_smoke_run_writes_tables_and_reports_failures(tmp_path):
    before = sorted(RESULTS_DIR.iterdir()) if RESULTS_DIR.exists() else []
    rc = gpu_check.main(["--smoke", "--out-dir", str(tmp_path), "--inject-failure", "loss"])
    assert rc == 1  # a part failed
    assert (sorted(RESULTS_DIR.iterdir()) if RESULTS_DIR.exists() else []) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu-check-cpu.jsonl", "gpu-check-cpu.md", "gpu-check.log"]  # fmt: skip
    md = (tmp_path / "gpu-check-cpu.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "gpu-check-cpu.jsonl").read_text().splitlines()]
    parts = {line.split("|")[1].strip(): line.split("|")[4].strip()
             for line in md.split("## Parts")[1].split("\n## ")[0].splitlines()
             if line.startswith("| ") and "budget" not in line}  # fmt: skip
    assert parts["correctness"] == "PASS" and parts["throughput"] == "PASS"
    assert parts["loss"].startswith("FAIL (exit 1")  # the injected failure ...
    log = (tmp_path / "gpu-check.log").read_text()
    assert "RuntimeError: injected failure in part 'loss'" in log  # ... with its traceback
    # cuDNN attention does not exist on the CPU: a FAIL row, the other providers measured.
    assert parts["attention"] == "FAIL (2 rows: sdpa cudnn)"
    attn = [r for r in rows if r["part"] == "attention" and "provider" in r]
    assert {r["provider"] for r in attn} == {"triton (ours)", "sdpa flash", "sdpa cudnn"}
    for r in attn:
        failed = r["provider"] == "sdpa cudnn"
        assert r["note"].startswith("FAIL: RuntimeError") == failed and (r["fwd_ms"] > 0) != failed
    # Every kernel checked in fp32 and fp16, MoE and the tiny model in fp32, all passing.
    checks = [r for r in rows if r["part"] == "correctness" and "check" in r]
    names = {(r["check"].split(" ")[0], r["dtype"]) for r in checks}
    for kernel in ("attention", "RMSNorm", "RoPE", "SwiGLU", "fused"):
        assert {(kernel, "fp32"), (kernel, "fp16")} <= names
    assert {("MoE", "fp32"), ("tiny", "fp32")} <= names
    assert all(r["status"] == "PASS" and r["err"] <= r["tol"] for r in checks), checks
    # The loss rows emitted before the injected failure still count; throughput measured.
    assert {r["loss"] for r in rows if r["part"] == "loss" and "V" in r} == {"plain", "fused"}
    tput = [r for r in rows if r["part"] == "throughput" and "size" in r]
    assert tput and all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in tput)
    assert f"| correctness: every check passes | {len(checks)} | yes |" in md


def test_overrunning_part_is_killed():
    log = io.StringIO()
    cmd = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"]
    rc, seconds = gpu_check.run_child(cmd, dict(os.environ), timeout=2.0, log=log)
    assert rc is None and seconds < 60 and "started" in log.getvalue()


def test_targets_table_reads_the_measurements():
    attn = dict(provider="triton (ours)", causal=True, D=128, T=8192)
    rows = {
        "attention": [{**attn, "fwd_tflops": 500.0, "bwd_tflops": 300.0},
                      {**attn, "provider": "sdpa flash", "fwd_tflops": 400.0, "bwd_tflops": 350.0},
                      {**attn, "T": 4096, "fwd_tflops": 10.0, "bwd_tflops": 10.0}],
        "loss": [{"V": 131072, "loss": "plain", "peak_mib": 1000.0},
                 {"V": 131072, "loss": "fused", "peak_mib": 200.0},
                 {"V": 32768, "loss": "fused", "peak_mib": 9000.0}],
        "throughput": [{"size": "llama-1b", "mfu": 0.45}, {"size": "llama-1b", "mfu": 0.4},
                       {"size": "gpt2-124m", "mfu": 0.6}],
        "correctness": [{"status": "PASS"}, {"status": "FAIL"}],
    }  # fmt: skip
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in gpu_check.targets_lines(rows)[2:]}  # fmt: skip
    fwd, bwd, loss, mfu, ok = lines.values()
    assert fwd[:2] == ["500.000", "yes"] and fwd[3] == "" and "sdpa flash 400.0 / 350.0" in fwd[2]
    assert bwd[:2] == ["300.000", "**no**"] and "autotune" in bwd[3]  # missed: the next lever
    assert loss[:2] == ["0.200", "yes"]
    assert mfu[:2] == ["0.450", "**no**"]  # the best llama-1b variant, not gpt2-124m
    assert ok[:2] == ["1", "**no**"] and ok[2] == "of 2 checks"
    empty = gpu_check.targets_lines({})
    assert all("| not measured |" in line for line in empty[2:])


def test_autotune_pinning_keeps_the_first_allowed_configs(monkeypatch):
    monkeypatch.delenv("KERNELS_AUTOTUNE_CONFIGS", raising=False)
    assert autotune_limit() is None  # default: every config
    monkeypatch.setenv("KERNELS_AUTOTUNE_CONFIGS", "0")
    assert autotune_limit() is None
    monkeypatch.setenv("KERNELS_AUTOTUNE_CONFIGS", "2")
    assert autotune_limit() == 2
    monkeypatch.setenv("KERNELS_AUTOTUNE_CONFIGS", "two")
    with pytest.raises(ValueError, match="KERNELS_AUTOTUNE_CONFIGS='two'"):
        autotune_limit()
    keep = _first_configs(A._prune_fwd, 2)
    assert keep(A._FWD_CONFIGS, {"HEAD_DIM": 128}) == A._FWD_CONFIGS[:2]
    # hd 256: the prune drops 128-wide key tiles first, then the first two of the rest.
    kept = keep(A._FWD_CONFIGS, {"HEAD_DIM": 256})
    assert len(kept) == 2 and all(c.kwargs["BLOCK_N"] == 64 for c in kept)
    assert kept == [c for c in A._FWD_CONFIGS if c.kwargs["BLOCK_N"] == 64][:2]
