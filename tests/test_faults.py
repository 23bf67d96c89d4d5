"""Fault injection (issue 12): SIGKILL at random points while training writes checkpoints,
while data.prepare writes shards, while an HF export is written, and while the contamination
index is built. The next run resumes from the last complete state or starts clean: no partial
file is ever read, no step whose checkpoint the run announced is lost, and the end result is
bit-identical to an uninterrupted run.

Kill points come from common/atomic.py's hook: with PRETRAIN_FAULT_LOG set, every atomic write
logs its stages (open, written, replaced, built, committed...) and PRETRAIN_KILL_AT=N makes the
process SIGKILL itself at the Nth one. Each test draws its kill points from the `seed` fixture
(printed). The processes are forks of this one (tests/helpers.py run_forked), so the 20+ runs
of each test take seconds. A longer sweep, with kills at random times as well:
`python -m scripts.fault_sweep` (scripts/fault_sweep.py).
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import numpy as np
import pytest

import train  # noqa: F401  (imported once here, so forked runs start warm)
from common.atomic import temp_path
from data.prepare import prepare
from data.shards import read_shard
from job_config import DataConfig
from model.checkpoint import (
    find_checkpoint,
    load_config_dict,
    load_model_state,
    load_train_state,
)
from model.config import ModelConfig
from model.transformer import build_model
from tests.helpers import run_forked, step_losses, tiny_overrides, train_main

KILLS = 20  # kill points per test (the issue asks for at least 20)


def fault_env(log: Path, kill_at: int | None, match: str = "") -> dict[str, str]:
    env = {"PRETRAIN_FAULT_LOG": str(log), "PRETRAIN_KILL_MATCH": match}
    if kill_at is not None:
        env["PRETRAIN_KILL_AT"] = str(kill_at)
    return env


def fault_labels(log: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()] if log.exists() else []


def visible_files(root: Path) -> list[Path]:
    """What a reader globbing `root` can see: temporaries are hidden (`.NAME.tmp`)."""
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


@pytest.fixture(scope="module", autouse=True)
def warm():
    # Building a model on the meta device imports torch._dynamo (seconds): once, before forks.
    build_model(ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=64), "cpu")


def check_checkpoints_complete(run: Path) -> None:
    """Every checkpoint a reader can find is whole: all its files load."""
    for step_dir in sorted((run / "checkpoints").glob("step_*")):
        load_model_state(step_dir)
        load_train_state(step_dir)
        load_config_dict(step_dir)


def test_killed_training_resumes_without_losing_a_checkpointed_step(tiny_data, tmp_path, seed):
    """SIGKILL at KILLS random write points of a training run (checkpoints every 2 steps,
    config.toml, run_info.json, `latest`, pruning): each time the next run resumes from the
    newest checkpoint (never from an older one than the killed run announced, never from a
    partial one), and the final per-step losses equal an uninterrupted run's bit for bit."""
    rng = random.Random(seed)
    steps = 10
    extra = {"train.steps": steps, "checkpoint.every": 2, "checkpoint.keep": 2,
             "train.val_every": 0}
    reference = tmp_path / "reference"
    log = tmp_path / "reference.log"
    result = run_forked(train_main, tiny_overrides(tiny_data, reference, **extra),
                        env=fault_env(log, None))
    assert result.returncode == 0, result.stderr[-3000:]
    want = step_losses(reference)
    points = len(fault_labels(log))
    assert points > 40, fault_labels(log)

    # Chains of runs in one run directory: each run is killed at a random point and the next
    # resumes, until one finishes (then its losses are checked and a new chain starts).
    kills, chains, latest_after, done = 0, 0, [], 0
    run = tmp_path / "run0"
    while True:
        latest = run / "checkpoints" / "latest"
        args = {**extra, "checkpoint.resume": "latest" if latest.exists() else ""}
        log = tmp_path / f"faults{len(latest_after)}.log"
        # a resumed run has about the writes left that its chain has not done yet
        left = points - done
        kill_at = rng.randint(1, left) if kills < KILLS and left > 8 else None  # else: finish
        result = run_forked(train_main, tiny_overrides(tiny_data, run, **args),
                            env=fault_env(log, kill_at))
        latest_after.append(int(find_checkpoint(run).name[5:]) if latest.exists() else 0)
        if result.returncode == 0:
            got = step_losses(run)
            assert sorted(got) == list(range(1, steps + 1))
            assert got == want  # bit-identical: nothing partial was read back
            chains += 1
            if kills >= KILLS:
                break
            run, done = tmp_path / f"run{chains}", 0
            continue
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        kills += 1
        done += kill_at - 6  # the run's own config.toml / run_info.json writes come again
        check_checkpoints_complete(run)
        announced = [int(line.split("step_")[1][:6]) for line in result.stdout.splitlines()
                     if line.startswith("checkpoint: ")]
        if announced:  # nothing the run said it saved is lost
            assert int(find_checkpoint(run).name[5:]) >= announced[-1]
    print(f"seed {seed}: {kills} kills over {chains} chains of runs; newest checkpoint after "
          f"each run: {latest_after}")


def test_killed_prepare_reruns_to_the_same_files(tmp_path, seed):
    """SIGKILL at KILLS random write points of data.prepare (settings fingerprint, tokenizer
    files, shards, manifest; in this process and, for some runs, in a worker process). After
    each kill every visible shard reads whole and the manifest is absent or complete; the rerun
    keeps every shard already written (same inode) and ends with files byte-equal to an
    uninterrupted preparation."""
    rng = random.Random(seed)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["".join(rng.choices("bcdfgklmnpstaeiou", k=rng.randint(2, 7))) for _ in range(500)]
    for i in range(80):
        (corpus / f"{i:03d}.txt").write_text(" ".join(rng.choices(words, k=300)))

    def config(out: Path, workers: int = 0) -> DataConfig:
        return DataConfig(path=str(out), sources=[str(corpus)], vocab_size=400, stages=[],
                          shard_tokens=3000, val_fraction=0.1, workers=workers)

    log = tmp_path / "reference.log"
    ref_dir = tmp_path / "reference" / "data"  # same name: the trained tokenizer is named after it
    result = run_forked(prepare, config(ref_dir), env=fault_env(log, None))
    assert result.returncode == 0, result.stderr[-3000:]
    reference = {p.name: p.read_bytes() for p in visible_files(ref_dir)}
    points = len(fault_labels(log))
    assert sum(name.endswith(".bin") for name in reference) >= 8 and points > 30

    def check_finished(out: Path) -> None:
        got = {p.name: p.read_bytes() for p in visible_files(out)}
        assert set(got) == set(reference)
        for name in reference:
            # manifest.json and prepare.json hold the path, prepare_log.json the timings
            if name not in ("manifest.json", "prepare.json", "prepare_log.json"):
                assert got[name] == reference[name], name
        manifest, want = (json.loads(d["manifest.json"]) for d in (got, reference))
        for key in ("train", "val", "tokenizer", "fingerprint"):
            assert manifest[key] == want[key], key
        assert not list(out.glob(".*"))  # a finished preparation leaves no temporary behind

    # Chains of runs on one directory, each killed at a random point, until one finishes.
    kills, runs, chains, worker_deaths, done = 0, 0, 0, 0, 0
    out = tmp_path / "out0" / "data"
    while True:
        workers = 1 if runs % 4 == 3 else 0  # then a worker process writes the shards
        # a rerun has only the writes left that its chain has not done yet
        left = points - done
        kill_at = rng.randint(1, left) if kills < KILLS and left > 8 else None  # else: finish
        before = {p.name: p.stat().st_ino for p in out.glob("*.bin")}
        result = run_forked(prepare, config(out, workers),
                            env=fault_env(tmp_path / f"faults{runs}.log", kill_at))
        runs += 1
        for shard in out.glob("*.bin"):  # every visible shard is whole and right
            assert np.array_equal(read_shard(shard), read_shard(ref_dir / shard.name))
        for name, inode in before.items():  # finished work is kept, not redone
            assert (out / name).stat().st_ino == inode, f"{name} was written again"
        if result.returncode == 0:
            check_finished(out)
            chains += 1
            if kills >= KILLS:
                break
            out, done = tmp_path / f"out{chains}" / "data", 0
            continue
        if result.returncode == 1:  # a worker was killed: the run stops and says so
            assert "a worker process died" in result.stderr, result.stderr[-3000:]
            worker_deaths += 1
        else:
            assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        if (out / "manifest.json").exists():  # written last: then everything else is done
            check_finished(out)
        kills += 1
        done += kill_at
    print(f"seed {seed}: {kills} kills of data.prepare ({worker_deaths} of a worker) over "
          f"{chains} chains of {runs} runs")


def test_killed_hf_export_leaves_the_old_export_or_none(tiny_data, tmp_path, seed):
    """SIGKILL at KILLS random write points of `model.hf export` (safetensors shards, index,
    configs, tokenizer files, the directory swap), half of them over an existing export
    (--overwrite). After each kill the output directory is absent, or holds exactly the files
    of a complete export; the next export is byte-equal to an uninterrupted one."""
    from model.hf import export_run

    rng = random.Random(seed)
    run = tmp_path / "run"
    result = run_forked(train_main, tiny_overrides(tiny_data, run, **{"train.steps": 2}))
    assert result.returncode == 0, result.stderr[-3000:]
    log = tmp_path / "reference.log"
    # 20KB shards: several safetensors files and an index, so kills land between them
    args = (run, tmp_path / "reference", None, None, "20KB")
    result = run_forked(export_run, *args, env=fault_env(log, None))
    assert result.returncode == 0, result.stderr[-3000:]
    reference = {p.name: p.read_bytes() for p in visible_files(tmp_path / "reference")}
    points = len(fault_labels(log))
    assert "model.safetensors.index.json" in reference and points > 10

    for kill in range(KILLS):
        out = tmp_path / f"out{kill}"
        over_old = kill % 2 == 1
        if over_old:  # an earlier complete export that the killed one would replace
            assert run_forked(export_run, *args[:1], out, None, None, "20KB").returncode == 0
        result = run_forked(export_run, run, out, None, None, "20KB", None, over_old,
                            env=fault_env(tmp_path / f"run{kill}.log", rng.randint(1, points)))
        assert result.returncode in (-signal.SIGKILL, 0), result.stderr[-3000:]
        if out.exists():  # the old export or the new one, whole
            got = {p.name: p.read_bytes() for p in visible_files(out)}
            assert got == reference, sorted(set(got) ^ set(reference))
        else:
            assert not over_old
        result = run_forked(export_run, run, out, None, None, "20KB", None, True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert {p.name: p.read_bytes() for p in visible_files(out)} == reference
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    print(f"seed {seed}: {KILLS} kills of model.hf export")


def test_a_write_failing_midway_leaves_no_temporary_and_names_the_file(tiny_data, tmp_path):
    """Disk full midway (simulated with RLIMIT_FSIZE: the kernel fails the write that would
    grow a file past the limit, whichever library writes it): a checkpoint save and an HF
    export stop with an error naming the file, leave no temporary behind, and keep the
    previous checkpoint / export whole."""
    import resource

    from model.hf import export_run

    run = tmp_path / "run"
    args = tiny_overrides(tiny_data, run, **{"train.steps": 2, "checkpoint.every": 2})
    assert run_forked(train_main, args).returncode == 0

    def with_file_limit(limit: int, fn, *a):
        def limited():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            fn(*a)
        return run_forked(limited)

    before = {p: p.read_bytes() for p in visible_files(run / "checkpoints")}
    resume = tiny_overrides(tiny_data, run, **{"train.steps": 4, "checkpoint.every": 2,
                                               "checkpoint.resume": "latest"})
    result = with_file_limit(100_000, train_main, resume)  # the model file is ~0.5 MB
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "step_000004" in result.stderr and "File too large" in result.stderr
    assert {p: p.read_bytes() for p in visible_files(run / "checkpoints")} == before
    assert not list((run / "checkpoints").glob(".*"))
    assert not temp_path(run / "checkpoints" / "step_000004").exists()

    out = tmp_path / "hf"
    assert run_forked(export_run, run, out).returncode == 0
    exported = {p: p.read_bytes() for p in visible_files(out)}
    result = with_file_limit(100_000, lambda: run_cli_export(run, out))
    assert result.returncode == 2 and "File too large" in result.stderr, result.stderr[-3000:]
    assert "model.safetensors" in result.stderr
    assert {p: p.read_bytes() for p in visible_files(out)} == exported
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]


def run_cli_export(run: Path, out: Path) -> None:
    from common.errors import run_cli
    from model.hf import main

    run_cli(lambda: main(["export", "--run", str(run), "--out-dir", str(out), "--overwrite"]))


def test_killed_index_build_is_never_read_half_written(tmp_path, seed):
    """SIGKILL at 10 random write points of the contamination index build (ngrams_<n>.npy
    and .json for every task's n): the next load_or_build_index returns exactly the index of
    an uninterrupted build, loaded whole or rebuilt; a damaged index file is rebuilt, not read."""
    from data.shards import write_shard
    from eval.contamination import build_indexes, load_or_build_index
    from tests.helpers import prose, small_tokenizer

    rng = random.Random(seed)
    tok = small_tokenizer()
    data = tmp_path / "data"
    docs = [prose(rng, 200) for _ in range(8)]
    stream = np.array([t for d in docs for t in tok.encode(d) + [tok.eot_id]], dtype=np.uint16)
    for k, part in enumerate(np.array_split(stream, 3)):
        write_shard(data / f"train_{k:06d}.bin", part, tok.n_vocab)
    log = tmp_path / "reference.log"
    result = run_forked(build_indexes, data, tok, (8, 9, 10, 13), False, env=fault_env(log, None))
    assert result.returncode == 0, result.stderr[-3000:]
    want = {n: load_or_build_index(data, n, tok, progress=False).hashes.copy() for n in (8, 13)}
    points = len(fault_labels(log))
    for kill in range(10):
        for p in data.glob("ngrams_*"):
            p.unlink()
        if kill % 2:  # an older, complete index of other shards is there as well
            (data / "ngrams_13.npy").write_bytes(b"\x93NUMPY stale")
        result = run_forked(build_indexes, data, tok, (8, 9, 10, 13), False,
                            env=fault_env(tmp_path / f"faults{kill}.log", rng.randint(1, points)))
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        for n in (8, 13):
            assert np.array_equal(load_or_build_index(data, n, tok, progress=False).hashes, want[n])
    print(f"seed {seed}: 10 kills of the n-gram index build")
