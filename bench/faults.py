"""python -m bench.faults [--kills 50] [--parts train,prepare,export] [--seed S] [--out FILE]

The long fault-injection sweep (tests/test_faults.py is its short form): real `python train.py`,
`python -m data.prepare` and `python -m model.hf export` processes, each SIGKILLed either at a
random write point (common/atomic.py's PRETRAIN_KILL_AT hook) or at a random moment (a timer
anywhere in the run: in the middle of a torch.save, an append to metrics.jsonl, tokenizer
training...). After every kill the visible files are checked (no partial shard, checkpoint or
export directory), the next run resumes, and the finished result is compared with an
uninterrupted run's. Prints a table: kills, runs, partial files seen, checkpointed steps lost,
whether the end result was bit-identical.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
TINY = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.vocab_size": 512, "model.max_seq_len": 64, "train.seq_len": 32,
        "train.batch_size": 8, "train.micro_batch_size": 4, "train.steps": 12,
        "train.val_every": 0, "train.log_every": 4, "train.threads": 1, "optim.lr": 1e-2,
        "optim.warmup_steps": 2, "checkpoint.every": 2, "checkpoint.keep": 2,
        "logging.plot": False}


def flags(values: dict) -> list[str]:
    return [f"--{k}={json.dumps(v) if isinstance(v, str | list) else str(v).lower()}"
            for k, v in values.items()]


def launch(cmd: list[str], rng: random.Random, duration: float, points: int,
           log: Path) -> tuple[int, str, str]:
    """Run cmd, killed at a random write point (half the time) or after a random delay in
    [0, duration]; returns (exit status, what killed it, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PRETRAIN_FAULT_LOG": str(log)}
    how = "point" if rng.random() < 0.5 else "timer"
    if how == "point":
        env["PRETRAIN_KILL_AT"] = str(rng.randint(1, max(1, points)))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if how == "timer":
        try:
            proc.wait(timeout=rng.uniform(0, duration))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # worker processes of a killed run
    except ProcessLookupError:
        pass
    return proc.returncode, how, out


def reference_run(cmd: list[str], log: Path) -> tuple[float, int, str]:
    """(seconds, write points, stdout) of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PRETRAIN_FAULT_LOG": str(log)}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"reference run failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}"
                         f"\n{proc.stderr[-3000:]}")
    return time.time() - t0, len(log.read_text().splitlines()), proc.stdout


def visible(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def sweep(kills: int, rng: random.Random, tmp: Path, reference: list[str], make_cmd,
          check_after_kill, check_done, fresh) -> dict:
    """Chains of runs: kill, check, resume... until a run finishes; `kills` kills in all."""
    duration, points, _ = reference_run(reference, tmp / "reference.log")
    row = {"kills": 0, "point": 0, "timer": 0, "runs": 0, "partial": 0, "lost": 0, "equal": True}
    state = fresh(0)
    while True:
        log = tmp / f"faults{row['runs']}.log"  # the hook counts the writes of this run only
        code, how, out = launch(make_cmd(state), rng, duration, points, log)
        row["runs"] += 1
        if code == 0:
            row["equal"] &= check_done(state)
            if row["kills"] >= kills:
                return row
            state = fresh(row["runs"])
            continue
        row["kills"] += 1
        row[how] += 1
        partial, lost = check_after_kill(state, out)
        row["partial"] += partial
        row["lost"] += lost


def train_part(kills: int, rng: random.Random, tmp: Path) -> dict:
    from data.prepare import prepare
    from job_config import DataConfig
    from model.checkpoint import find_checkpoint, load_model_state, load_train_state

    data = tmp / "data"
    prepare(DataConfig(path=str(data), sources=["stdlib"], vocab_size=512, max_bytes=600_000,
                       tokenizer_train_bytes=200_000, shard_tokens=40_000, val_fraction=0.2,
                       workers=0, stages=[]))

    def cmd(run: Path, resume: bool = False) -> list[str]:
        values = {**TINY, "data.path": str(data), "train.run_dir": str(run),
                  "checkpoint.resume": "latest" if resume else ""}
        return [sys.executable, "train.py", "--config", "configs/tiny.toml", *flags(values)]

    def losses(run: Path) -> dict[int, float]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    def after_kill(run: Path, out: str) -> tuple[int, int]:
        partial = 0
        for step_dir in (run / "checkpoints").glob("step_*"):
            try:
                load_model_state(step_dir), load_train_state(step_dir)
            except Exception:
                partial += 1
        announced = [int(x.split("step_")[1][:6]) for x in out.splitlines()
                     if x.startswith("checkpoint: ")]
        newest = int(find_checkpoint(run).name[5:]) if (run / "checkpoints" / "latest").exists() \
            else 0
        return partial, int(bool(announced) and newest < announced[-1])

    return sweep(kills, rng, tmp, cmd(tmp / "reference"),
                 lambda run: cmd(run, (run / "checkpoints" / "latest").exists()),
                 after_kill, lambda run: losses(run) == losses(tmp / "reference"),
                 lambda i: tmp / f"run{i}")


def prepare_part(kills: int, rng: random.Random, tmp: Path) -> dict:
    from data.shards import read_shard

    corpus = tmp / "corpus"
    corpus.mkdir()
    words = ["".join(rng.choices("bcdfgklmnpstaeiou", k=rng.randint(2, 7))) for _ in range(800)]
    for i in range(150):
        (corpus / f"{i:03d}.txt").write_text(" ".join(rng.choices(words, k=400)))

    def cmd(out: Path) -> list[str]:
        values = {"data.path": str(out), "data.sources": [str(corpus)], "data.vocab_size": 600,
                  "data.stages": [], "data.shard_tokens": 4000, "data.val_fraction": 0.1,
                  "data.workers": 1}
        return [sys.executable, "-m", "data.prepare", *flags(values)]

    ref = tmp / "reference" / "data"
    inodes: dict[str, int] = {}

    def after_kill(out: Path, _: str) -> tuple[int, int]:
        partial = lost = 0
        for shard in out.glob("*.bin"):
            try:
                if not np.array_equal(read_shard(shard), read_shard(ref / shard.name)):
                    partial += 1
            except Exception:
                partial += 1
            lost += inodes.setdefault(shard.name, shard.stat().st_ino) != shard.stat().st_ino
        return partial, lost

    def done(out: Path) -> bool:
        inodes.clear()
        skip = ("manifest.json", "prepare.json", "prepare_log.json")  # path, timings
        names = [p.name for p in visible(ref) if p.name not in skip]
        return all((out / n).read_bytes() == (ref / n).read_bytes() for n in names)

    return sweep(kills, rng, tmp, cmd(ref), cmd, after_kill, done,
                 lambda i: tmp / f"out{i}" / "data")


def export_part(kills: int, rng: random.Random, tmp: Path) -> dict:
    from data.prepare import prepare
    from job_config import DataConfig

    data, run = tmp / "data", tmp / "train"
    prepare(DataConfig(path=str(data), sources=["stdlib"], vocab_size=512, max_bytes=600_000,
                       tokenizer_train_bytes=200_000, shard_tokens=40_000, val_fraction=0.2,
                       workers=0, stages=[]))
    values = {**TINY, "data.path": str(data), "train.run_dir": str(run), "train.steps": 2}
    subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.toml", *flags(values)],
                   cwd=REPO, check=True, capture_output=True)

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "model.hf", "export", "--run", str(run), "--out-dir",
                str(out), "--max-shard-size", "20KB", "--overwrite"]

    ref = tmp / "reference"

    @functools.cache
    def want() -> dict[str, bytes]:  # the uninterrupted export (sweep runs it first)
        return tree(ref)

    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in visible(root)}

    def fresh(i: int) -> Path:
        out = tmp / f"out{i}"
        if i % 2:  # an older complete export that the killed one replaces
            shutil.copytree(ref, out)
        return out

    return sweep(kills, rng, tmp, cmd(ref), cmd,
                 lambda out, _: (int(out.exists() and tree(out) != want()), 0),
                 lambda out: tree(out) == want(), fresh)


PARTS = {"train": train_part, "prepare": prepare_part, "export": export_part}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.faults",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="kills per part")
    parser.add_argument("--parts", default="train,prepare,export", help=f"of {sorted(PARTS)}")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    parser.add_argument("--out", metavar="FILE", default=None, help="also write the table here")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"seed {seed}", flush=True)
    rows = []
    for name in args.parts.split(","):
        rng = random.Random(f"{seed}-{name}")
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            row = {"part": name, **PARTS[name](args.kills, rng, Path(tmp))}
            row["seconds"] = round(time.time() - t0)
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = ["part", "kills", "point", "timer", "runs", "partial", "lost", "equal", "seconds"]
    table = "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                      + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows])
    print(f"\nseed {seed}: kills at a write point or a random moment; partial = files a reader "
          f"would see half-written; lost = checkpointed steps (or shards) redone\n{table}")
    if args.out:
        write_text(args.out, f"seed {seed}\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
