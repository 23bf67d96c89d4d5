"""The tasks of a fine-tuning run ([posttrain] data, holdout, val_data), read and split.

    tasks = load_tasks(cfg.posttrain, to_messages)         # or data.conversations.to_pair
    tasks.train["hh-rlhf-harmless-base-test"]             # records converted, held-out removed
    tasks.val[...], tasks.weights[...]

Each source is one task, named after its file (without .jsonl / .json / .gz) or dataset. The
held-out records of a task are a seeded random `holdout` of them, the same in every run with
the same seed and data (so `python -m eval` can score a run's held-out pairs afterwards);
`val_data` sources are validation-only tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.conversations import HF_PREFIX, read_records
from data.loader import parse_mixture


@dataclass
class Tasks:
    train: dict[str, list]
    val: dict[str, list]
    weights: dict[str, float]


def task_name(source: str) -> str:
    if source.startswith(HF_PREFIX):
        return source[len(HF_PREFIX):].split(":")[0].replace("/", "_")
    name = Path(source).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def read_task(source: str, convert: Callable, limit: int = 0) -> list:
    out = []
    for where, record in read_records(source):
        out.append(convert(record, where))
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"post-training data {source!r} holds no records")
    return out


def holdout_split(records: list, n: int, seed: int = 0) -> tuple[list, list]:
    """(train, held out): `n` records chosen by a generator seeded with `seed`."""
    if n >= len(records):
        raise ValueError(f"posttrain.holdout = {n}: a task has only {len(records)} records")
    order = np.random.default_rng([seed, 0x686F6C64]).permutation(len(records))
    held = set(order[:n].tolist())
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def load_tasks(pc, convert: Callable) -> Tasks:
    """`pc` is the [posttrain] section; `convert(record, where)` makes one training item."""
    weights = parse_mixture([e if "=" in e else f"{e}=1" for e in pc.data])
    train, val, named = {}, {}, {}
    for source in weights:
        name = task_name(source)
        if name in named:
            raise ValueError(f"posttrain.data: {source!r} and {named[name]!r} are both task "
                             f"{name!r}; rename one of the files")
        named[name] = source
        records = read_task(source, convert, pc.max_records)
        if pc.holdout:
            records, held = holdout_split(records, pc.holdout)
            val[name] = held
        train[name] = records
    for source in pc.val_data:
        name = task_name(source)
        val[name if name not in val else f"{name}-val"] = read_task(source, convert,
                                                                    pc.max_records)
    return Tasks(train, val, {task_name(s): w for s, w in weights.items()})


class TaskMixture:
    """Items drawn from weighted tasks, deterministically: draw k picks its task with a
    generator seeded by (seed, k), then that task's next item in a seeded order that changes
    every epoch. The state is the number of draws and each task's (epoch, position)."""

    def __init__(self, tasks: dict[str, list], weights: dict[str, float], seed: int):
        empty = [n for n, items in tasks.items() if not items]
        if empty or not tasks:
            raise ValueError(f"post-training tasks without training examples: {empty or 'all'}")
        self.names = list(tasks)
        self.tasks = [tasks[n] for n in self.names]
        total = sum(weights[n] for n in self.names)
        if total <= 0 or any(weights[n] < 0 for n in self.names):
            raise ValueError(f"posttrain.data weights must be >= 0 with a positive sum: {weights}")
        self.weights = np.array([weights[n] / total for n in self.names])  # (tasks,)
        self.seed = seed
        self.draws = 0
        self.positions = np.zeros((len(self.names), 2), np.int64)  # (epoch, position) per task
        self.seen = np.zeros(len(self.names), np.int64)  # items drawn per task
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _order(self, task: int, epoch: int) -> np.ndarray:
        if (task, epoch) not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != task}
            rng = np.random.default_rng([self.seed, task, epoch])
            self._orders[task, epoch] = rng.permutation(len(self.tasks[task]))
        return self._orders[task, epoch]

    def peek(self) -> tuple[int, object]:
        """(task, item) of the next draw, without taking it."""
        rng = np.random.default_rng([self.seed, 0x736674, self.draws])
        task = int(rng.choice(len(self.names), p=self.weights))
        epoch, pos = self.positions[task]
        return task, self.tasks[task][self._order(task, int(epoch))[pos]]

    def take(self, task: int) -> None:
        """Take the draw `peek` showed."""
        self.draws += 1
        self.seen[task] += 1
        self.positions[task, 1] += 1
        if self.positions[task, 1] == len(self.tasks[task]):
            self.positions[task] = (self.positions[task, 0] + 1, 0)

    def next(self) -> object:
        task, item = self.peek()
        self.take(task)
        return item

    def metrics(self) -> dict[str, float]:
        """mixture/<task>: the fraction of items drawn from it so far."""
        total = max(int(self.seen.sum()), 1)
        return {f"mixture/{n}": int(c) / total for n, c in zip(self.names, self.seen)}

    def state_dict(self) -> dict:
        return {"draws": self.draws, "positions": self.positions.tolist(),
                "seen": self.seen.tolist(), "names": list(self.names),
                "weights": self.weights.tolist(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("names") != self.names or not np.allclose(state["weights"], self.weights):
            raise ValueError(f"loader state has tasks {state.get('names')} with weights "
                             f"{state.get('weights')}, this run {self.names} with "
                             f"{self.weights.tolist()}: resume with the same posttrain.data")
        if state["seed"] != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this run uses {self.seed}")
        self.draws = int(state["draws"])
        self.positions = np.array(state["positions"], np.int64)
        self.seen = np.array(state["seen"], np.int64)
