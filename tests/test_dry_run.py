"""`train.py --dry-run --world-size N`: the mesh and every rank's memory for a big config, on
this CPU, allocating nothing (the models below are 28 and 32 GB in fp32)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

# Run train.main in a fresh process and print its peak RSS last (KiB on Linux).
SCRIPT = ("import resource, sys, train; train.main(sys.argv[1:]); "
          "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def dry_run(*args: str) -> tuple[str, float]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args, "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rss_gib = int(proc.stdout.split("peak_rss_kib")[-1]) / 2**20
    return proc.stdout, rss_gib


@pytest.mark.parametrize("config, world, params, per_rank", [
    # moe-1b: EP 8 borrowed from dp_shard 64: experts 64 / 8 per EP group, FSDP over the 8 groups
    ("configs/moe-1b.toml", 64, "6.976B", "ep 8"),
    # llama3-8b: TP 2 x FSDP 32
    ("configs/llama3-8b.toml", 64, "8.030B", "tp 2"),
])
def test_dry_run_prints_mesh_and_per_rank_memory_without_allocating(config, world, params, per_rank):
    out, rss = dry_run("--config", config, "--world-size", str(world))
    print(out)
    assert f"dry run: {params} parameters" in out and f"world size {world}" in out
    assert "mesh pp 1 x dp_replicate 1" in out and per_rank in out
    rows = re.findall(r"ranks? (\d+)(?:-(\d+))?: +([\d.]+) \| +([\d.]+) \| +([\d.]+) \| +([\d.]+)", out)
    covered = sum(int(b or a) - int(a) + 1 for a, b, *_ in rows)
    assert covered == world, rows  # every rank has a line (equal ones share it)
    total_gib = float(params[:-1]) * 1e9 * 16 / 2**30  # fp32 weights, grads, AdamW moments
    per_rank_gib = [float(r[5]) for r in rows]
    # The shards add up to the whole (up to rounding and FSDP's uneven last rows).
    assert abs(sum(float(r[5]) * (int(r[1] or r[0]) - int(r[0]) + 1) for r in rows) - total_gib) < 0.02 * total_gib
    assert max(per_rank_gib) < 2 * total_gib / world
    assert rss < 2.0, f"peak RSS {rss:.2f} GiB: the dry run allocated the model"


def test_dry_run_with_pipeline_and_bad_layout():
    out, _ = dry_run("--config", "configs/llama3-8b.toml", "--world-size", "64",
                     "--parallel.pp=4", "--parallel.pp_schedule=Interleaved1F1B")
    assert "8 pipeline stage(s)" in out
    # 4 stages of 4 rank groups each hold different layers; the first and last hold more
    # (the 128k-row embedding, the output matrix)
    assert len(re.findall(r"ranks \d+-\d+:", out)) >= 2
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/moe-1b.toml",
                           "--dry-run", "--world-size", "12"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    assert "parallel.ep = 8 borrows ep / tp = 8 ranks from dp_shard = 12" in proc.stderr
