"""Scaling of data.prepare: workers, executors and peak memory, against the single-process
merge it replaced, on the Python standard library repeated with perturbations.

    python -m bench.data_scale                         # stdlib x 4, 1 and 2 workers, local + Ray
    python -m bench.data_scale --copies 2 --executors local --out out.md   # + out.json

The corpus: the standard library's .py files (~31 MB), then `--copies - 1` more copies where
each file is, at random, an exact copy, a near copy (2% of its identifiers renamed: a near
duplicate), or a different file (50% renamed): every cleaning stage has work, dedup most of all.
Each run is `python -m data.prepare` in its own process (all stages + tokenization, with a
BPE trained once beforehand), read back from its prepare_log.json; the baseline is data.prepare
as of `--baseline-commit` (the streaming merge in one process), from `git archive`.

Prints one row per run: wall seconds of the job (a Ray cluster's start and stop are shown apart: a
cluster lives for many jobs), speedup over one worker of the same executor, and peak
resident memory of the largest process, absolute and above that process's baseline (the
interpreter + imports + executor runtime, before any data). Then per-stage CPU seconds and
MB/s per core, the rates the README's cost estimate uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

from bench.tables import RESULTS_DIR, device_slug
from common.atomic import write_text
from data.sources import stdlib_files
from data.tokenizer import train_bpe

REPO = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "7ca5b86"  # main before data.prepare became a sharded job (issue 18)
_WORD = re.compile(r"[A-Za-z_]\w*")


def perturb(text: str, fraction: float, rng: random.Random) -> str:
    """Rename a `fraction` of the identifiers (each to a random new one)."""
    return _WORD.sub(lambda m: f"w{rng.randrange(10**6)}" if rng.random() < fraction
                     else m.group(0), text)


def perturbed_copies(files: list[Path], root: Path, out: Path, copies: int, seed: int = 0) -> int:
    """Write `files` (paths below `root`) to out/copy0/, and copies - 1 perturbed copies to
    out/copy1/...: per file, an exact copy, a near copy or a different file, one third each.
    Returns the bytes written."""
    total = 0
    for k in range(copies):
        for i, f in enumerate(files):
            text = f.read_bytes().decode("utf-8", "replace")
            rng = random.Random(seed * 1_000_003 + k * 100_003 + i)
            if k:
                kind = rng.randrange(3)
                text = text if kind == 0 else perturb(text, 0.02 if kind == 1 else 0.5, rng)
            path = out / f"copy{k}" / f.relative_to(root)
            path.parent.mkdir(parents=True, exist_ok=True)
            total += path.write_text(text)
    return total


def _prepare(cmd: list[str], env: dict, path: Path, tries: int = 2) -> dict:
    """Run one preparation; a failed start (on a loaded machine Ray's node can time out while
    it starts) is retried from scratch once."""
    for attempt in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if not proc.returncode:
            break
        print(f"  failed ({proc.stderr.strip().splitlines()[-1][:200]})"
              + ("; again" if attempt + 1 < tries else ""), flush=True)
    else:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    log = json.loads((path / "prepare_log.json").read_text())
    return {"log": log, "wall": time.time() - t0, "stderr": proc.stderr}


_BASELINE_WRAPPER = """
import json, sys, time
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
if __name__ == "__main__":  # spawned workers import this file too
    import data.prepare
    open("/proc/self/clear_refs", "w").write("5")
    start, t0 = status("VmRSS"), time.time()
    data.prepare.main(sys.argv[1:])
    json.dump({"seconds": time.time() - t0, "rss_start_mb": start,
               "peak_rss_mb": status("VmHWM")},
              open(sys.argv[-1].split("=", 1)[1] + "/baseline_log.json", "w"))
"""


def run_baseline(commit: str, tmp: Path, args: list[str], path: Path) -> dict | None:
    """Today's data.prepare before the sharded job, from git: its merge process's peak."""
    src = tmp / "baseline_src"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True)
    if archive.returncode:
        print(f"baseline skipped: git archive {commit} failed ({archive.stderr.decode()[:200]})")
        return None
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    archive_path = tmp / "baseline.tar"
    archive_path.write_bytes(archive.stdout)
    with tarfile.open(archive_path) as tar:
        tar.extractall(src, filter="data")
    wrapper = src / "baseline_wrapper.py"
    wrapper.write_text(_BASELINE_WRAPPER)
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(wrapper), *args, f"--data.path={path}"],
                          env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"baseline failed:\n{proc.stderr[-3000:]}")
    result = json.loads((path / "baseline_log.json").read_text())
    result["wall"] = time.time() - t0
    return result


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} x{os.cpu_count()}"


def _same_output(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("*.bin"))
    return files == sorted(p.name for p in b.glob("*.bin")) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


def cost_table(rates: dict[str, float | None], corpus_tb: float = 40.0,
               nodes: tuple[int, ...] = (1, 16, 128, 1024), cores: int = 64) -> list[str]:
    """Markdown rows: core-hours of each kind of task for a `corpus_tb` TB corpus at `rates`
    (MB of input per CPU-second), and the hours on N nodes of `cores` cores, if the work
    spreads evenly over them (no I/O limit, no stragglers): a lower bound."""
    mb = corpus_tb * 1e6
    head = " | ".join(f"{n} node{'s' if n > 1 else ''} h" for n in nodes)
    lines = [f"| tasks | MB/s per core | core-hours | {head} |",
             "|---|---|---|" + "---|" * len(nodes)]
    total = 0.0
    for kind, rate in [*rates.items(), ("all", None)]:
        if kind != "all" and not rate:
            continue
        core_h = total if kind == "all" else mb / rate / 3600
        total += 0 if kind == "all" else core_h
        hours = " | ".join(f"{core_h / (n * cores):,.1f}" for n in nodes)
        shown = f"{rate:.2f}" if rate else f"{mb / total / 3600:.2f}"
        lines.append(f"| {kind} | {shown} | {core_h:,.0f} | {hours} |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.data_scale",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", default="1,2", help="worker counts to run")
    parser.add_argument("--executors", default="local,ray")
    parser.add_argument("--docs-per-task", type=int, default=250)
    parser.add_argument("--dedup-partitions", type=int, default=8)
    parser.add_argument("--shard-tokens", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each setting, interleaved; the fastest is shown")
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT, help="'' to skip")
    parser.add_argument("--keep", metavar="DIR", help="keep the corpus and outputs in DIR")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="the results table (default: bench/results/data-scale-<cpu>.md)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)

    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(args.keep or tmp_dir.name)
    tmp.mkdir(parents=True, exist_ok=True)
    corpus = tmp / "corpus"
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    if not corpus.exists():
        perturbed_copies(files, root, corpus, args.copies)
    mb = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file()) / 1e6
    tokenizer = tmp / "bpe4k.tiktoken"
    if not tokenizer.exists():
        sample, taken = [], 0
        for f in files:
            sample.append(f.read_text(errors="replace"))
            taken += len(sample[-1])
            if taken > 10e6:
                break
        train_bpe(sample, 4096, tokenizer, name="bench")
    common = [f'--data.sources=["{corpus}"]', f"--data.tokenizer={tokenizer}",
              f"--data.shard_tokens={args.shard_tokens}"]
    load0 = os.getloadavg()[0]
    print(f"{sum(1 for _ in corpus.rglob('*.py'))} files, {mb:.1f} MB ({args.copies} copies of "
          f"the stdlib); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)

    rows = []
    baseline_path = tmp / "out_baseline"
    baseline = None
    if args.baseline_commit:
        shutil.rmtree(baseline_path, ignore_errors=True)
        baseline = run_baseline(args.baseline_commit, tmp, [*common, "--data.workers=2"],
                                baseline_path)
        if baseline:
            rows.append({"run": f"baseline {args.baseline_commit}, 2 workers",
                         "seconds": baseline["seconds"], "startup": 0.0, "stop": 0.0,
                         "driver": (baseline["peak_rss_mb"],
                                    baseline["peak_rss_mb"] - baseline["rss_start_mb"]),
                         "worker": None, "same": True, "load": load0})
            print(f"  {rows[-1]['run']}: {baseline['seconds']:.1f}s", flush=True)
    logs: dict = {}
    best: dict = {}
    runs: list[dict] = []  # every run, in order, with the load average as it started
    for _ in range(args.repeat):  # interleaved, so that a busy spell hits every setting
        for executor in args.executors.split(","):
            for workers in [int(w) for w in args.workers.split(",")]:
                path = tmp / f"out_{executor}_{workers}"
                load = os.getloadavg()[0]
                cmd = [sys.executable, "-m", "data.prepare", *common, f"--data.path={path}",
                       f"--data.executor={executor}", f"--data.workers={workers}",
                       f"--data.docs_per_task={args.docs_per_task}",
                       f"--data.dedup_partitions={args.dedup_partitions}"]
                log = _prepare(cmd, {**os.environ, "PYTHONPATH": str(REPO)}, path)["log"]
                log["load_at_start"] = load
                runs.append({"executor": executor, "workers": workers, "load": load,
                             "seconds": log["seconds"], "cpu_seconds": sum(
                                 s["cpu_seconds"] for s in log["tasks"].values())})
                print(f"  {executor}, {workers} workers: {log['seconds']:.1f}s (load {load:.1f})",
                      flush=True)
                same = _same_output(path, baseline_path) if baseline else None
                key = (executor, workers)
                if key not in logs or log["seconds"] < logs[key]["seconds"]:
                    logs[key] = log
                best[key] = best.get(key, True) and same if same is not None else None
    for (executor, workers), log in logs.items():
        ran = [s for s in log["tasks"].values() if s["ran"]]
        # A worker's baseline: the least resident memory any task started with.
        worker_base = min(s["rss_start_mb_min"] for s in ran)
        worker_peak = max(s["peak_rss_mb"] for s in ran)
        driver = log["driver"]
        rows.append({"run": f"{executor}, {workers} worker{'s' if workers > 1 else ''}",
                     "seconds": log["seconds"], "startup": log["executor_start_seconds"],
                     "stop": log.get("executor_stop_seconds", 0.0),
                     "driver": (driver["peak_rss_mb"],
                                driver["peak_rss_mb"] - driver["rss_start_mb"]),
                     "worker": (worker_peak, max(s["peak_rss_above_start_mb"] for s in ran),
                                worker_peak - worker_base),
                     "same": best[(executor, workers)], "load": log["load_at_start"]})

    lines = [
        f"# data.prepare scaling on {cpu_name()}",
        "",
        f"{mb:.1f} MB: the standard library and {args.copies - 1} perturbed copies; all stages "
        f"+ tokenization (4096-id BPE), shard_tokens {args.shard_tokens:,}, docs_per_task "
        f"{args.docs_per_task}, dedup_partitions {args.dedup_partitions}; {os.cpu_count()} CPUs, "
        f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at the end; fastest of "
        f"{args.repeat} interleaved runs.",
        "Job seconds exclude starting and stopping the executor (Ray: a cluster lives for many "
        "jobs; both shown apart). Peak resident memory in MB, absolute / above the process's baseline (driver: at its start, "
        "executor running; worker: the least any task started with).",
        "",
        "| run | job s | start s | stop s | speedup | driver (merge process) MB | largest worker MB "
        "| output = baseline | load at start |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    one = {r["run"].split(",")[0]: r["seconds"] for r in rows if r["run"].endswith(" 1 worker")}
    for r in rows:
        base = one.get(r["run"].split(",")[0])
        speed = f"{base / r['seconds']:.2f}" if base else "-"
        same = {True: "yes", False: "NO", None: "-"}[r["same"]]
        driver = f"{r['driver'][0]:.0f} / {r['driver'][1]:.0f}"
        worker = f"{r['worker'][0]:.0f} / {r['worker'][2]:.0f}" if r["worker"] else "-"
        lines.append(f"| {r['run']} | {r['seconds']:.1f} | {r['startup']:.1f} | {r['stop']:.1f} | {speed} | "
                     f"{driver} | {worker} | {same} | {r['load']:.1f} |")
    # Every run, in order: a round's runs follow each other, so their ratio shares a load.
    lines += ["", "Every run in order (round: one run of each setting; speedup: over the same "
                  "executor's 1-worker run of that round; task CPU s: the work, whatever the "
                  "load):", "", "| round | run | load at start | job s | task CPU s | speedup |",
              "|---|---|---|---|---|---|"]
    per_round = len(runs) // max(1, args.repeat)
    for i, run in enumerate(runs):
        round_runs = runs[i - i % per_round : i - i % per_round + per_round]
        one_run = next((r for r in round_runs if r["executor"] == run["executor"]
                        and r["workers"] == 1), None)
        speed = f"{one_run['seconds'] / run['seconds']:.2f}" if one_run else "-"
        lines.append(f"| {i // per_round + 1} | {run['executor']}, {run['workers']} | "
                     f"{run['load']:.1f} | {run['seconds']:.1f} | {run['cpu_seconds']:.1f} | "
                     f"{speed} |")
    # Per-stage rates from the first executor's one-worker run: CPU seconds per kind of task.
    rates = {}
    first = logs.get((args.executors.split(",")[0], 1))
    if first:
        lines += ["", "CPU seconds per kind of task (one worker), and MB of input per "
                      "CPU-second:", "", "| tasks | CPU s | MB/s per core |", "|---|---|---|"]
        kinds: dict[str, float] = {}
        for name, stage in first["tasks"].items():
            kind = "components" if "components" in name else name.split("_")[0]
            kinds[kind] = kinds.get(kind, 0.0) + stage["cpu_seconds"]
        for kind, cpu in kinds.items():
            # setup builds the stages once (the benchmark index): a fixed cost, not a rate
            rates[kind] = mb / cpu if cpu and kind != "setup" else None
            lines.append(f"| {kind} | {cpu:.2f} | {mb / cpu:.1f} |" if cpu else
                         f"| {kind} | 0 | - |")
        lines += ["", "At these rates, 40 TB of text on N nodes of 64 cores (lower bound):", "",
                  *cost_table(rates)]
    table = "\n".join(lines) + "\n"
    print(table)
    path = Path(args.out) if args.out else RESULTS_DIR / f"data-scale-{device_slug(cpu_name())}.md"
    write_text(path, table)
    print(f"wrote {path}")
    result = {"mb": mb, "copies": args.copies, "rows": rows, "runs": runs,
              "rates_mb_per_core_s": rates,
              "cpus": os.cpu_count(), "logs": {f"{e}_{w}": log for (e, w), log in logs.items()}}
    write_text(path.with_suffix(".json"), json.dumps(result, indent=1, default=str))
    tmp_dir.cleanup()
    return result


if __name__ == "__main__":
    main()
