"""Shared test utilities: tiny prepared corpora and tiny training runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tiny_overrides(data_path: Path, run_dir: Path, **extra) -> list[str]:
    """CLI overrides for a ~100k-parameter model that trains in seconds on a CPU."""
    values = {
        "model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.vocab_size": 512, "model.max_seq_len": 64,
        "data.path": str(data_path),
        "train.run_dir": str(run_dir), "train.seq_len": 32, "train.batch_size": 8,
        "train.micro_batch_size": 4, "train.steps": 12, "train.val_every": 6,
        "train.val_batches": 2, "train.log_every": 4, "train.threads": 1,
        "optim.warmup_steps": 2, "optim.lr": 1e-2,
        "checkpoint.every": 4, "checkpoint.keep": 0, "logging.plot": False,
    }
    values.update(extra)
    return [f"--{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def run_train(args: list[str], nproc: int = 1, check: bool = True, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "train.py", "--config", "configs/tiny.toml", *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--standalone", "train.py", "--config", "configs/tiny.toml", *args,
        ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {}
    for r in records:
        if "loss" in r:
            assert r["step"] not in losses, f"step {r['step']} logged twice"
            losses[r["step"]] = r["loss"]
    return losses
