"""Parallel training on the CPU: gloo process groups launched by torchrun, tiny model and data.

Every multi-process run is compared with a one-process run of the same global batch: tensor
parallel (TP=2), FSDP2 and DDP over 2 ranks, DeepSpeed ZeRO-2 / ZeRO-3; then a checkpoint saved
by 2 FSDP ranks is resumed on 1 process and on TP=2. The runs go through train.py end to end
and the losses are read from each run's metrics.jsonl.

Tolerances: fp32 everywhere. Sharding changes only the order of floating-point sums (a matmul
split in two halves and added, gradients averaged by a reduce-scatter instead of inside one
backward), each a relative change near 1e-7; over 6 AdamW steps at lr 1e-3 on a loss of ~5.5
that stays far below the 1e-5 relative the issue asks for (measured: ~1e-7). DeepSpeed
flattens parameters and gradients into buckets and computes the clipping norm its own way,
so it is held to 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.shards import write_shard

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
STEPS = 6

# Tiny model: 4 query heads, 2 KV heads (so TP=2 leaves one KV head per rank).
MODEL = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
TRAIN = dict(steps=STEPS, seq_len=32, batch_size=8, micro_batch_size=2, threads=1, val_every=3,
             val_batches=4, log_every=1, seed=7, device="cpu", dtype="float32")


def _toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()


def write_config(path: Path, data_dir: Path, run_dir: Path, **sections) -> Path:
    base = {
        "model": dict(MODEL),
        "data": {"path": str(data_dir)},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
        "train": dict(TRAIN, run_dir=str(run_dir)),
        "checkpoint": {"every": 3, "keep": 3},
        "logging": {"plot": False},
        "parallel": {},
    }
    for name, values in sections.items():
        base[name].update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A prepared data dir made directly with data.shards: a token stream with structure
    (repeated random phrases) so the loss moves, and a manifest like data.prepare's."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    phrases = [rng.integers(1, VOCAB, size=rng.integers(3, 12)) for _ in range(40)]
    manifest: dict = {"tokenizer": {"name": "synthetic", "n_vocab": VOCAB, "eot_id": 0}}
    for split, n in (("train", 20_000), ("val", 4_000)):
        pieces, total = [], 0
        while total < n:
            piece = phrases[rng.integers(len(phrases))]
            pieces += [piece, [0]] if rng.random() < 0.1 else [piece]
            total += len(piece)
        tokens = np.concatenate(pieces)[:n].astype(np.uint16)
        write_shard(root / f"{split}_000000.bin", tokens, VOCAB)
        manifest[split] = {"shards": [{"file": f"{split}_000000.bin", "tokens": n}], "tokens": n}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def run_train(config: Path, nproc: int = 1, *extra: str, expect_ok: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if nproc == 1:
        cmd = [sys.executable, "train.py", "--config", str(config), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "train.py", "--config", str(config), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def val_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def assert_close(got: dict, want: dict, rtol: float, what: str) -> None:
    assert set(got) == set(want), f"{what}: steps {sorted(got)} vs {sorted(want)}"
    for step in sorted(want):
        rel = abs(got[step] - want[step]) / abs(want[step])
        assert rel <= rtol, f"{what}: step {step} loss {got[step]} vs {want[step]} (rel {rel:.2e})"


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """One process, the same global batch (8 sequences = 4 micro-batches of 2)."""
    tmp = tmp_path_factory.mktemp("ref")
    run_train(write_config(tmp / "c.toml", data_dir, tmp / "run"))
    return tmp / "run"


def test_reference_learns(reference):
    got = losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] < got[1]


@pytest.mark.parametrize(
    "name, parallel",
    [
        ("tp2", {"tp": 2}),
        ("fsdp2", {"dp_shard": 2, "data_parallel": "fsdp"}),
        ("ddp2", {"dp_shard": 2, "data_parallel": "ddp"}),
    ],
)
def test_two_ranks_match_one_process(name, parallel, data_dir, reference, tmp_path):
    run_train(write_config(tmp_path / "c.toml", data_dir, tmp_path / name, parallel=parallel), 2)
    assert_close(losses(tmp_path / name), losses(reference), 1e-5, name)
    assert_close(val_losses(tmp_path / name), val_losses(reference), 1e-5, f"{name} validation")
