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
from job_config import ConfigError
from model.checkpoint import load_tokenizer_identity, resolve_checkpoint
from model.load import checkpoint_tokenizer, load_job_config
from objectives.chat_tokens import ChatTokenizer, resolve_template


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


@dataclass
class EncodedTasks:
    """A fine-tuning run's tasks tokenized: training and held-out examples per task."""

    tokenizer: object
    tokenizer_identity: dict | None  # what the run's checkpoints record: the base's
    template: str
    train: dict[str, list]
    val: dict[str, list]
    weights: dict[str, float]
    info: dict  # for run_info.json: per task counts, weight, dropped; tokenizer; template


def encode_tasks(cfg, convert: Callable, encode: Callable) -> EncodedTasks:
    """Read the [posttrain] tasks (`convert(record, where)`), tokenize each item with the run's
    tokenizer and chat template (`encode(chat, item, capacity)`, None to drop it: nothing left
    to learn from once cut to seq_len + 1 tokens). The tokenizer is the base model's
    (checkpoint.init_from), as its checkpoint records it."""
    base = resolve_checkpoint(cfg.checkpoint.init_from)
    tokenizer = checkpoint_tokenizer(base, load_job_config(base))
    if tokenizer.n_vocab > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.name} has {tokenizer.n_vocab} ids, more than "
                         f"model.vocab_size = {cfg.model.vocab_size}")
    template = resolve_template(tokenizer, cfg.posttrain.chat_template)
    chat = ChatTokenizer(tokenizer, template)
    tasks = load_tasks(cfg.posttrain, convert)
    capacity = cfg.train.seq_len + 1
    dropped: dict[str, int] = {}

    def run(name: str, items: list) -> list:
        out = [encode(chat, item, capacity) for item in items]
        dropped[name] = dropped.get(name, 0) + sum(e is None for e in out)
        return [e for e in out if e is not None]

    train = {n: run(n, items) for n, items in tasks.train.items()}
    val = {n: run(n, items) for n, items in tasks.val.items()}
    info = {"tasks": {n: {"train": len(train[n]), "val": len(val.get(n, [])),
                          "weight": tasks.weights[n], "dropped": dropped.get(n, 0)}
                      for n in train},
            "val_tasks": sorted(val), "tokenizer": tokenizer.identity(), "chat_template": template}
    return EncodedTasks(tokenizer, load_tokenizer_identity(base), template, train, val,
                        tasks.weights, info)


def describe_tasks(info: dict, items: str) -> str:
    """'hh (2012 pairs / 300 held out, weight 1)' for the startup line."""
    return ", ".join(f"{n} ({v['train']} {items} / {v['val']} held out, weight {v['weight']:g}"
                     f"{', ' + str(v['dropped']) + ' dropped' if v['dropped'] else ''})"
                     for n, v in info["tasks"].items())


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


class TaskLoader:
    """The loader interface (data/loader.py's) over a TaskMixture: each step a global batch of
    `batch_size` items (packed rows, pairs) made by `next_item`, of which rank r takes the
    micro-batches m * world + r; so every world size sees the same global batches."""

    def __init__(self, mixture: TaskMixture, batch_size: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"train.batch_size = {batch_size} must be a multiple of train.micro_batch_size "
                f"({micro_batch_size}) x world size ({world_size})"
            )
        self.mixture = mixture
        self.batch_size, self.micro, self.rank, self.world = (batch_size, micro_batch_size,
                                                              rank, world_size)
        self.accum_steps = batch_size // (micro_batch_size * world_size)

    def next_item(self):
        raise NotImplementedError

    def make_batch(self, items: list):
        raise NotImplementedError

    def next_step(self) -> list:
        """This rank's `accum_steps` micro-batches of the next global batch."""
        items = [self.next_item() for _ in range(self.batch_size)]
        starts = [(m * self.world + self.rank) * self.micro for m in range(self.accum_steps)]
        return [self.make_batch(items[s : s + self.micro]) for s in starts]

    def metrics(self) -> dict[str, float]:
        return self.mixture.metrics()

    def state_dict(self) -> dict:
        return self.mixture.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state)
