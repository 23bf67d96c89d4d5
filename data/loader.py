"""Batches from token shards: memory-mapped, seeded, split across ranks, exactly resumable.

The shards of a split are one logical token stream. It is cut into windows of seq_len + 1 tokens
(window i starts at token i * seq_len; inputs are its first seq_len tokens, targets its last),
visited in a seeded random order that changes every epoch. Each training step consumes one
global batch of `batch_size` windows; rank r of `world` takes, for micro-step m, the windows
[(m * world + r) * micro, (m * world + r + 1) * micro) of it. So a run on any number of ranks
sees the same global batches, and the loader's whole state is two integers (epoch, position).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.shards import read_shard


class TokenStream:
    """The shards of one split of a prepared data dir, as one indexable token sequence."""

    def __init__(self, data_path: str | Path, split: str, manifest: dict):
        self.path = Path(data_path)
        files = [s["file"] for s in manifest[split]["shards"]]
        if not files:
            raise FileNotFoundError(f"{self.path}/manifest.json lists no {split} shards")
        self.shards = [read_shard(self.path / f) for f in files]
        for f, shard, entry in zip(files, self.shards, manifest[split]["shards"]):
            if len(shard) != entry["tokens"]:
                raise ValueError(
                    f"{self.path / f}: {len(shard)} tokens, manifest.json says {entry['tokens']}"
                )
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.num_tokens = int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            local = start + filled - int(self.offsets[shard])
            take = min(length - filled, len(self.shards[shard]) - local)
            out[filled : filled + take] = self.shards[shard][local : local + take]
            filled += take
            shard += 1
        return out


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64
    doc_ids: torch.Tensor | None = None  # (B, T) int32, documents counted from the window start


def document_ids(inputs: np.ndarray, eot_id: int) -> np.ndarray:
    """(B, T) -> (B, T): id of the document each token belongs to. The end-of-text token closes
    its document, so the token after it starts the next id."""
    is_eot = inputs == eot_id
    return (np.cumsum(is_eot, axis=1) - is_eot).astype(np.int32)


def make_batch(
    stream: TokenStream, window_ids: np.ndarray, seq_len: int, eot_id: int | None = None
) -> Batch:
    """Windows `window_ids` of `stream` as one batch (document ids when eot_id is given)."""
    T = seq_len
    rows = np.stack([stream.read(int(w) * T, T + 1) for w in window_ids])  # (B, T+1)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    doc_ids = None if eot_id is None else torch.from_numpy(document_ids(inputs, eot_id))
    return Batch(torch.from_numpy(inputs.copy()), torch.from_numpy(targets.copy()), doc_ids)


class DataLoader:
    def __init__(
        self,
        stream: TokenStream,
        seq_len: int,
        batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        eot_id: int | None = None,
    ):
        if batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"train.batch_size = {batch_size} must be a multiple of train.micro_batch_size "
                f"({micro_batch_size}) x world size ({world_size})"
            )
        self.stream, self.seq_len = stream, seq_len
        self.batch_size, self.micro = batch_size, micro_batch_size
        self.rank, self.world = rank, world_size
        self.accum_steps = batch_size // (micro_batch_size * world_size)
        self.seed = seed
        self.eot_id = eot_id  # set to yield document ids
        self.num_windows = (stream.num_tokens - 1) // seq_len
        if self.num_windows < batch_size:
            raise ValueError(
                f"{stream.path}: {stream.num_tokens} tokens make {self.num_windows} windows of "
                f"{seq_len + 1}, fewer than one batch of {batch_size}"
            )
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def _take_global(self) -> np.ndarray:
        """Window ids of the next global batch; advances the state."""
        ids = []
        need = self.batch_size
        while need:
            take = min(need, self.num_windows - self.position)
            ids.append(self._order[self.position : self.position + take])
            self.position += take
            need -= take
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return np.concatenate(ids)

    def next_step(self) -> list[Batch]:
        """This rank's `accum_steps` micro-batches of the next global batch."""
        ids = self._take_global()
        micro = []
        for m in range(self.accum_steps):
            start = (m * self.world + self.rank) * self.micro
            window_ids = ids[start : start + self.micro]
            micro.append(make_batch(self.stream, window_ids, self.seq_len, self.eot_id))
        return micro

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def validation_batches(
    stream: TokenStream, seq_len: int, micro_batch_size: int, num_batches: int,
    rank: int = 0, world_size: int = 1, eot_id: int | None = None,
) -> list[Batch]:
    """The same validation windows on every call: the first ones of the split, in order,
    dealt round-robin to ranks (micro-batch j goes to rank j % world)."""
    windows = (stream.num_tokens - 1) // seq_len
    total = min(num_batches, windows // micro_batch_size)
    return [
        make_batch(stream, np.arange(j * micro_batch_size, (j + 1) * micro_batch_size), seq_len, eot_id)
        for j in range(rank, total, world_size)
    ]
