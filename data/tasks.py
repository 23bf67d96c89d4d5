"""Resumable tasks: each task of a job leaves a directory that is its done marker.

    runner = TaskRunner(out / "tasks", executor)
    results = runner.run("map", map_task, jobs)      # map_task(tmp_dir, *job) -> small JSON

Task k of stage S writes its files into a temporary directory; on success `result.json` (its
return value, seconds, peak memory, process) is added and the directory is renamed to
`tasks/S/k` (common/atomic.py). So `tasks/S/k/result.json` exists iff the task finished, and a
rerun after a killed job runs only the tasks without one. A task killed halfway leaves only a
hidden temporary, which its rerun replaces; a task that runs twice (a Ray retry) writes the
same files, so tasks must be deterministic functions of their inputs.

Memory: each task resets its process's peak resident set (Linux: /proc/self/clear_refs) and
reports the peak during the task, so a worker reused by many tasks still reports per task.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.atomic import atomic_dir, write_json
from data.executor import Executor

RESULT = "result.json"


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """Start a new peak-memory measurement; returns the resident set now (MB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    except OSError:
        pass
    return _status_mb("VmRSS") or 0.0


def peak_rss() -> float:
    """Peak resident set (MB) since the last reset_peak_rss (since start where unsupported)."""
    peak = _status_mb("VmHWM")
    if peak is None:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale / 1024
    return peak


def run_task(task_dir: str, fn: Callable, args: tuple) -> dict:
    """Worker side: run fn(tmp, *args) into task_dir, atomically; the result record."""
    rss = reset_peak_rss()
    started, wall, cpu = time.time(), time.perf_counter(), time.process_time()
    with atomic_dir(task_dir) as tmp:
        result = fn(tmp, *args)
        info = {
            "result": result,
            "seconds": round(time.perf_counter() - wall, 4),
            "cpu_seconds": round(time.process_time() - cpu, 4),
            "rss_start_mb": round(rss, 1),
            "peak_rss_mb": round(peak_rss(), 1),
            "started": round(started, 3),  # epoch seconds: a job's timeline, task by task
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        write_json(tmp / RESULT, info)
    return info


class TaskRunner:
    """Runs a job's stages of tasks on an executor, skipping the tasks already done."""

    def __init__(self, root: Path, executor: Executor, progress: bool = True):
        self.root = Path(root)
        self.executor = executor
        self.progress = progress
        self.log: dict[str, dict] = {}  # per stage: tasks, skipped, seconds, memory

    def dir(self, stage: str, key: int | str) -> Path:
        return self.root / stage / (f"{key:06d}" if isinstance(key, int) else key)

    def run(
        self,
        stage: str,
        fn: Callable,
        jobs: Sequence[tuple],
        keys: Sequence[int | str] | None = None,
        until: Callable[[list], bool] | None = None,
    ) -> list[Any]:
        """fn(tmp, *job) for every job not done yet; their results, in job order.

        `until(results)` (results so far, None where not done) stops submitting new tasks
        once true; the results of tasks never run stay None."""
        keys = list(range(len(jobs))) if keys is None else list(keys)
        infos: list[dict | None] = [None] * len(jobs)
        for i, key in enumerate(keys):
            path = self.dir(stage, key) / RESULT
            if path.exists():
                infos[i] = json.loads(path.read_text())
        skipped = sum(info is not None for info in infos)
        results = lambda: [info and info["result"] for info in infos]  # noqa: E731
        todo = [] if until and until(results()) else [i for i in range(len(jobs)) if not infos[i]]
        wall = time.perf_counter()
        bar = tqdm(total=len(jobs), initial=skipped, desc=f"{stage:<24}", unit="task",
                   file=sys.stdout, mininterval=2, disable=not self.progress or not todo)
        calls = ((str(self.dir(stage, keys[i])), fn, jobs[i]) for i in todo)
        for j, info in self.executor.run(run_task, calls, name=stage):
            infos[todo[j]] = info
            bar.update(1)
            if until and until(results()):
                break
        bar.close()
        ran = [infos[i] for i in todo if infos[i]]
        self.log[stage] = {
            "tasks": len(jobs), "skipped": skipped, "ran": len(ran),
            "wall_seconds": round(time.perf_counter() - wall, 3),
            "task_seconds": round(sum(info["seconds"] for info in ran), 3),
            "cpu_seconds": round(sum(info["cpu_seconds"] for info in ran), 3),
            "peak_rss_mb": max((info["peak_rss_mb"] for info in ran), default=None),
            "peak_rss_above_start_mb": max(
                (round(info["peak_rss_mb"] - info["rss_start_mb"], 1) for info in ran),
                default=None),
            "rss_start_mb_min": min((info["rss_start_mb"] for info in ran), default=None),
            "processes": len({(info["host"], info["pid"]) for info in ran}),
            # epoch seconds: where the stage's wall time went (idle workers, driver work)
            "first_started": min((info.get("started", 0) for info in ran), default=None),
            "last_finished": max((info.get("started", 0) + info["seconds"] for info in ran),
                                 default=None),
            "driver_started": round(time.time() - (time.perf_counter() - wall), 3),
        }
        return results()
