"""data.prepare on Ray: a local Ray cluster (2 CPUs, started here) writes the same files as
local worker processes, byte for byte; a worker killed mid-job is retried by Ray and the
output does not change; a killed driver's rerun skips the finished tasks and ends the same.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest
import ray

from bench.data_scale import perturbed_copies
from data.prepare import prepare
from data.sources import stdlib_files
from data.tokenizer import train_bpe
from tests.data_helpers import planted_corpus, small_data_config, snapshot
from tests.helpers import REPO

# Our tasks' process titles while they run (Ray names a worker after its task).
TASK_TITLES = (b"ray::map", b"ray::scatter", b"ray::reduce", b"ray::finish", b"ray::tokenize")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def stdlib_run(tmp_path_factory):
    """A slice of the standard library with two perturbed copies (exact, near and distinct
    variants), a BPE trained on it, and the files a local run (2 processes) writes."""
    seed = random.randrange(2**31)
    print(f"corpus seed {seed}")
    tmp = tmp_path_factory.mktemp("ray")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in stdlib_files() if 2000 < f.stat().st_size < 15000][::25][:40]
    perturbed_copies(files, root, tmp / "corpus", copies=3, seed=seed)
    (tmp / "bench.jsonl").write_text(
        json.dumps({"text": " ".join(files[5].read_text().split()[30:70])}) + "\n")
    train_bpe([f.read_text() for f in files], 400, tmp / "bpe.tiktoken", name="bpe")
    cfg = small_data_config(tmp, [str(tmp / "corpus")], tokenizer=str(tmp / "bpe.tiktoken"),
                            shard_tokens=8000, val_fraction=0.05, workers=2)
    prepare(cfg, progress=False)
    expected = snapshot(Path(cfg.path))
    assert sum(name.endswith(".bin") for name in expected) >= 4
    shutil.rmtree(cfg.path)
    return cfg, expected


def _ray_settings(cfg, **extra):
    """Ray, and another cut of the work: neither may change the output."""
    values = {"executor": "ray", "docs_per_task": 4, "dedup_partitions": 3, **extra}
    for key, value in values.items():
        setattr(cfg, key, value)
    return cfg


def test_ray_writes_the_local_files_on_the_stdlib(cluster, stdlib_run):
    cfg, expected = stdlib_run
    manifest = prepare(_ray_settings(cfg), progress=False)
    assert manifest["stages"]["exact_dedup"]["removed"] > 0
    assert manifest["stages"]["near_dedup"]["removed"] > 0
    assert snapshot(Path(cfg.path)) == expected
    log = json.loads((Path(cfg.path) / "prepare_log.json").read_text())
    assert log["executor"] == "ray" and log["tasks"]["map"]["processes"] >= 2  # in parallel
    shutil.rmtree(cfg.path)


def test_ray_writes_the_local_files_on_the_planted_cases(cluster, tmp_path, seed):
    sources, plan = planted_corpus(tmp_path, random.Random(seed))
    cfg = small_data_config(tmp_path, sources, workers=2, shard_tokens=3000)
    local = prepare(cfg, progress=False)
    assert local["stages"]["near_dedup"]["removed"] == plan["near"]
    expected = snapshot(Path(cfg.path))
    for path in Path(cfg.path).iterdir():  # keep the trained tokenizer and its settings
        if not path.name.startswith(("tokenizer.", "prepare.json")):
            path.unlink()
    prepare(_ray_settings(cfg, docs_per_task=5), progress=False)  # the jsonl in 8 pieces
    assert snapshot(Path(cfg.path)) == expected


def _task_processes() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read()
            except OSError:
                continue
            if title.startswith(TASK_TITLES):
                pids.append(int(entry))
    return pids


def test_worker_killed_mid_job_is_retried_with_the_same_output(cluster, stdlib_run):
    cfg, expected = stdlib_run
    killed: list[int] = []
    running = True

    def kill_one_busy_worker():
        while running and not killed:
            for pid in _task_processes():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.002)

    killer = threading.Thread(target=kill_one_busy_worker)
    killer.start()
    try:
        prepare(_ray_settings(cfg, task_retries=3), progress=False)
    finally:
        running = False
        killer.join()
    assert killed, "no task was running to kill"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # that worker is gone; Ray ran its task again elsewhere
    assert snapshot(Path(cfg.path)) == expected
    shutil.rmtree(cfg.path)


def _finished(path: Path, stage: str) -> list[Path]:
    """The finished tasks of a stage (not the hidden temporaries of running ones)."""
    return [d for d in (path / "tasks" / stage).glob("*")
            if not d.name.startswith(".") and (d / "result.json").exists()]


def test_killed_driver_rerun_skips_finished_tasks_with_the_same_output(cluster, stdlib_run):
    cfg, expected = stdlib_run
    path = Path(cfg.path)
    config = path.parent / "ray_job.toml"
    config.write_text(
        "[data]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in {
            "sources": cfg.sources, "tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size,
            "shard_tokens": cfg.shard_tokens, "val_fraction": cfg.val_fraction,
            "executor": "ray", "ray_address": cluster, "docs_per_task": 4,
            "dedup_partitions": 3, "path": str(path)}.items())
        + f'[data.decontaminate]\nbenchmarks = {json.dumps(cfg.decontaminate.benchmarks)}\n'
        + f"ngram = {cfg.decontaminate.ngram}\n")
    cmd = [sys.executable, "-m", "data.prepare", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while len(_finished(path, "map")) < 3 and time.time() < deadline:
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not (path / "manifest.json").exists(), "the job ended before the kill"
    time.sleep(2)  # tasks that were running when their driver died have stopped by now
    done = {stage.name: len(_finished(path, stage.name)) for stage in (path / "tasks").iterdir()
            if stage.is_dir() and _finished(path, stage.name)}
    print("finished before the kill:", done)
    assert done["map"] >= 3
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    log = json.loads((path / "prepare_log.json").read_text())["tasks"]
    assert {stage: log[stage]["skipped"] for stage in done} == done
    assert log["map"]["ran"] == log["map"]["tasks"] - done["map"] > 0
    assert snapshot(path) == expected
    shutil.rmtree(path)
