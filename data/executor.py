"""Where data.prepare's tasks run: local worker processes, or a Ray cluster. Same task functions.

    executor = make_executor("local", workers=8)                   # processes on this machine
    executor = make_executor("ray", workers=0, address="auto")     # every CPU of a Ray cluster
    for index, result in executor.run(fn, [(a, b), (c, d)]):        # as they complete
        ...
    executor.close()

A task is a module-level function and a tuple of picklable arguments; it reads what it needs
from files (data.path is on a filesystem every worker sees: a local disk here, a shared one on
a cluster) and returns something small.

- Local: a `concurrent.futures.ProcessPoolExecutor` of `workers` spawned processes (no fork:
  the driver may hold threads); workers=0 runs the tasks in this process, one by one (same
  code, same output: for debugging, and for tests that patch this process). A worker that dies
  stops the job with an error; the rerun resumes from the finished tasks (data/tasks.py).
- Ray (`pip install -e ".[ray]"`): each task is a `ray.remote` call with `max_retries`: Ray
  reruns a task whose worker died, on any node. Uses the Ray instance this process is already
  connected to, else `ray.init(address)`; with no address, starts a local Ray with `workers`
  CPUs. Scheduling, placement and retries are Ray's; nothing here schedules.

Both submit lazily with 2 x workers tasks in flight, so a consumer that stops early (data.max_bytes
reached) leaves the rest unsubmitted.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from common.errors import PretrainError


class ExecutorError(PretrainError, RuntimeError):
    """The executor cannot run the tasks (a worker died, Ray missing or unreachable)."""


class Executor(Protocol):
    name: str
    workers: int  # tasks that run at the same time

    def run(self, fn: Callable, jobs: Iterable[tuple], name: str = "") -> Iterator[tuple[int, Any]]:
        """Run fn(*job) for every job; yield (job index, result) as tasks complete."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """Worker processes on this machine (workers=0: this process)."""

    name = "local"

    def __init__(self, workers: int):
        self.inline = workers <= 0
        self.workers = max(1, workers)
        self._pool: cf.ProcessPoolExecutor | None = None

    def run(self, fn: Callable, jobs: Iterable[tuple], name: str = "") -> Iterator[tuple[int, Any]]:
        if self.inline:
            for i, job in enumerate(jobs):
                yield i, fn(*job)
            return
        if self._pool is None:
            spawn = mp.get_context("spawn")
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=spawn)
        pool = self._pool
        submit = lambda job: pool.submit(fn, *job)  # noqa: E731
        wait = lambda pending: cf.wait(pending, return_when=cf.FIRST_COMPLETED)[0]  # noqa: E731
        for future, i in _windowed(jobs, 2 * self.workers, submit, wait, _cancel):
            yield i, self._result(future)

    @staticmethod
    def _result(future: cf.Future) -> Any:
        try:
            return future.result()
        except cf.process.BrokenProcessPool as e:
            raise ExecutorError(
                "a worker process died (killed, or out of memory? lower data.workers or "
                "data.docs_per_task); finished tasks are kept: rerun to resume"
            ) from e

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


class RayExecutor:
    """Tasks on a Ray cluster; Ray retries a task whose worker died (`retries` times)."""

    name = "ray"

    def __init__(self, workers: int = 0, address: str = "", retries: int = 3):
        try:
            import ray
        except ImportError as e:
            raise ExecutorError(
                'data.executor = "ray" needs Ray: pip install -e ".[ray]"'
            ) from e
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": False}
            if address:
                kwargs["address"] = address
            else:  # a Ray on this machine only, for this job
                kwargs.update(num_cpus=max(1, workers), include_dashboard=False)
            ray.init(**kwargs)
            self._started = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.retries = retries
        self._remote = ray.remote(_call)

    def run(self, fn: Callable, jobs: Iterable[tuple], name: str = "") -> Iterator[tuple[int, Any]]:
        ray = self._ray
        remote = self._remote.options(
            num_cpus=1, max_retries=self.retries, retry_exceptions=False,
            name=name or getattr(fn, "__name__", "task"),
        )
        submit = lambda job: remote.remote(fn, *job)  # noqa: E731
        wait = lambda pending: ray.wait(list(pending), num_returns=1)[0]  # noqa: E731
        for ref, i in _windowed(jobs, 2 * self.workers, submit, wait, ray.cancel):
            yield i, ray.get(ref)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def _call(fn: Callable, *args: Any) -> Any:
    return fn(*args)


def _windowed(
    jobs: Iterable[tuple], window: int, submit: Callable, wait: Callable, cancel: Callable
) -> Iterator[tuple[Any, int]]:
    """Submit jobs with at most `window` in flight; yield (handle, job index) once done."""
    pending: dict[Any, int] = {}
    source = enumerate(jobs)
    try:
        while True:
            for i, job in source:
                pending[submit(job)] = i
                if len(pending) >= window:
                    break
            if not pending:
                return
            for handle in wait(pending):
                yield handle, pending.pop(handle)
    finally:
        for handle in pending:
            cancel(handle)


def _cancel(future: cf.Future) -> None:
    future.cancel()


def make_executor(kind: str, workers: int, address: str = "", retries: int = 3) -> Executor:
    """"local" (processes on this machine) or "ray"."""
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, address, retries)
    raise ExecutorError(f'data.executor must be "local" or "ray", got {kind!r}')
