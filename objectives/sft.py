"""Supervised fine-tuning: chat conversations rendered with the model's chat template, the
loss on the assistant's tokens only, tasks mixed by weight, validation loss per task.

Every conversation becomes (ids, labels): labels are the ids where the token is the
assistant's (objectives/chat_tokens.py) and -100 elsewhere, and -100 on its first token, which
nothing in the conversation predicts. A training row holds seq_len + 1 tokens; inputs are its
first seq_len, targets its last seq_len labels, so a target is the label of the next token.

Packing (posttrain.packing, the default): conversations are laid end to end in a row until the
next one does not fit (the rest is padding); each is its own document for attention
(`doc_ids`), so none sees another, and since RoPE depends only on relative positions a packed
conversation computes what it would alone. Without packing a row holds one conversation,
padded. A conversation longer than a row is cut to it; one left with no assistant token is
dropped (and counted).

The order is deterministic and independent of the world size, as in data/loader.py
(objectives/tasks.py): draw k of the run picks its task by weight with a generator seeded by
(seed, k) and takes that task's next conversation in a seeded order that changes every epoch;
a global batch is `batch_size` rows, rank r taking its micro-batches' rows. The whole state is
the number of draws and each task's (epoch, position), saved in checkpoints.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from data.conversations import to_messages
from data.loader import Batch
from job_config import JobConfig
from model.loss import IGNORE_INDEX
from objectives.tasks import TaskLoader, TaskMixture, describe_tasks, encode_tasks
from parallel.dist import all_reduce_max, all_reduce_sum
from parallel.parallelize import LossFn, build_loss_fn

Example = tuple[np.ndarray, np.ndarray]  # (ids, labels), int64, same length


def to_example(ids: list[int], mask: list[bool], capacity: int) -> Example | None:
    """(ids, labels) cut to `capacity` tokens, or None when no assistant token is left."""
    ids_a = np.asarray(ids[:capacity], np.int64)
    labels = np.where(np.asarray(mask[:capacity], bool), ids_a, IGNORE_INDEX)
    labels[0] = IGNORE_INDEX  # no token of this conversation predicts its first
    return (ids_a, labels) if (labels != IGNORE_INDEX).any() else None


def rows_to_batch(rows: list[list[Example]], seq_len: int, pad_id: int, packing: bool) -> Batch:
    """Rows of examples -> Batch: inputs (B, T), targets (B, T), doc_ids (B, T) when packing
    (padding is a document of its own)."""
    B, T = len(rows), seq_len
    ids = np.full((B, T + 1), pad_id, np.int64)
    labels = np.full((B, T + 1), IGNORE_INDEX, np.int64)
    docs = np.zeros((B, T + 1), np.int32)
    for r, row in enumerate(rows):
        pos = 0
        for d, (x, y) in enumerate(row):
            ids[r, pos : pos + len(x)], labels[r, pos : pos + len(x)] = x, y
            docs[r, pos : pos + len(x)] = d
            pos += len(x)
        docs[r, pos:] = len(row)
    doc_ids = torch.from_numpy(docs[:, :T].copy()) if packing else None
    return Batch(torch.from_numpy(ids[:, :T].copy()), torch.from_numpy(labels[:, 1:].copy()),
                 doc_ids)


def pack(examples: list[Example], capacity: int, packing: bool) -> list[list[Example]]:
    """Examples in order -> rows, greedily (a row closes when the next does not fit)."""
    rows, row, used = [], [], 0
    for ex in examples:
        if row and (not packing or used + len(ex[0]) > capacity):
            rows.append(row)
            row, used = [], 0
        row.append(ex)
        used += len(ex[0])
    return rows + ([row] if row else [])


class SFTLoader(TaskLoader):
    """Training rows of packed conversations from weighted tasks (see the module docstring)."""

    def __init__(
        self, tasks: dict[str, list[Example]], weights: dict[str, float], seq_len: int,
        batch_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
        seed: int = 0, packing: bool = True, pad_id: int = 0,
    ):
        super().__init__(TaskMixture(tasks, weights, seed), batch_size, micro_batch_size, rank,
                         world_size)
        self.seq_len, self.packing, self.pad_id = seq_len, packing, pad_id

    def next_item(self) -> list[Example]:
        """The next row: conversations in draw order until the next does not fit."""
        row, used, capacity = [], 0, self.seq_len + 1
        while True:
            task, ex = self.mixture.peek()
            if row and (not self.packing or used + len(ex[0]) > capacity):
                return row
            row.append(ex)  # examples were cut to the capacity when they were made
            used += len(ex[0])
            self.mixture.take(task)

    def make_batch(self, rows: list[list[Example]]) -> Batch:
        return rows_to_batch(rows, self.seq_len, self.pad_id, self.packing)

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for task in self.mixture.tasks for x, _ in task)


def split_for_ranks(batches: list, rank: int, world: int, device: torch.device) -> list:
    """Batches dealt round-robin to ranks, cut to the count every rank has (sharded models run
    collectives in forward: all ranks must run as many)."""
    mine = batches[rank::world]
    fewest = -all_reduce_max(torch.tensor(-float(len(mine)), device=device)).item()
    return mine[: int(fewest)]


class SFT:
    def __init__(self, cfg: JobConfig, mesh, device: torch.device):
        t, pc = cfg.train, cfg.posttrain
        self.cfg, self.device = cfg, device
        tasks = encode_tasks(cfg, to_messages,
                             lambda chat, messages, cap: to_example(*chat.encode(messages), cap))
        self.tokenizer_identity = tasks.tokenizer_identity
        self.tokenizer, self.template, self.info = tasks.tokenizer, tasks.template, tasks.info
        pad = self.tokenizer.eot_id
        self.loader = SFTLoader(tasks.train, tasks.weights, t.seq_len, t.batch_size,
                                t.micro_batch_size, mesh.dp_rank, mesh.dp_size, t.seed,
                                pc.packing, pad)
        self.val_sets = {}
        for name, examples in tasks.val.items():
            rows = pack(examples, t.seq_len + 1, pc.packing)
            batches = [rows_to_batch(rows[i : i + t.micro_batch_size], t.seq_len, pad, pc.packing)
                       for i in range(0, len(rows), t.micro_batch_size)]
            self.val_sets[name] = split_for_ranks(batches, mesh.dp_rank, mesh.dp_size, device)
        self.tokens_per_step = t.batch_size * t.seq_len

    def build_loss(self, model: nn.Module, raw: nn.Module) -> LossFn:
        # The language-model loss of pretraining: targets of -100 (not the assistant's) carry none.
        return build_loss_fn(model, raw, self.cfg, self.device)

    @torch.no_grad()
    def validate(self, model: nn.Module, loss_fn: LossFn) -> dict[str, float]:
        """Loss per assistant token on each held-out task (token-weighted), and over all."""
        model.eval()
        names = list(self.val_sets)
        sums = torch.zeros(len(names), 2, dtype=torch.float64, device=self.device)
        for i, name in enumerate(names):
            for batch in self.val_sets[name]:
                n = (batch.targets != IGNORE_INDEX).sum()
                sums[i, 0] += loss_fn(batch).double() * n
                sums[i, 1] += n
        model.train()
        sums = all_reduce_sum(sums)
        out = {f"val/{n}/loss": (sums[i, 0] / sums[i, 1]).item() for i, n in enumerate(names)}
        if names:
            out["val_loss"] = (sums[:, 0].sum() / sums[:, 1].sum()).item()
        return out

    def metrics(self) -> dict[str, float]:
        return self.loader.metrics()

    def describe(self) -> str:
        kind = "packed" if self.cfg.posttrain.packing else "padded"
        return (f"sft on {describe_tasks(self.info, 'conversations')}; "
                f"{self.loader.num_tokens:,} tokens, {kind} rows; tokenizer "
                f"{self.tokenizer.name} ({self.tokenizer.n_vocab} ids)")
