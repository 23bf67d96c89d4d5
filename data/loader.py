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

from data.shards import ShardError, check_token_ids, read_header, read_shard


class TokenStream:
    """The shards of one split of a prepared data dir, as one indexable token sequence."""

    def __init__(self, data_path: str | Path, split: str, manifest: dict):
        self.path = Path(data_path)
        self.files = [self.path / s["file"] for s in manifest[split]["shards"]]
        if not self.files:
            raise ShardError(f"{self.path}/manifest.json lists no {split} shards")
        self.shards = [read_shard(f) for f in self.files]
        # Token ids must stay below the vocabulary of the tokenizer that wrote them (checked in
        # read(): a corrupt id would index past the embedding), which is the manifest's.
        self.vocab_sizes = [read_header(f)["vocab_size"] for f in self.files]
        n_vocab = manifest.get("tokenizer", {}).get("n_vocab")
        for f, shard, entry, vocab in zip(self.files, self.shards, manifest[split]["shards"],
                                          self.vocab_sizes):
            if len(shard) != entry["tokens"]:
                raise ShardError(f"{f}: {len(shard)} tokens, manifest.json says {entry['tokens']}")
            if n_vocab is not None and vocab != n_vocab:
                raise ShardError(
                    f"{f}: written for a vocabulary of {vocab} ids, but manifest.json's tokenizer "
                    f"has {n_vocab} (a shard of another preparation?)"
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
            piece = self.shards[shard][local : local + take]
            check_token_ids(self.files[shard], piece, self.vocab_sizes[shard], local)
            out[filled : filled + take] = piece
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

    def _take_global(self, count: int | None = None) -> np.ndarray:
        """Window ids of the next global batch (or of the next `count` windows); advances the
        state."""
        ids = [np.zeros(0, np.int64)]
        need = self.batch_size if count is None else count
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

    @property
    def num_tokens(self) -> int:
        """Training tokens this loader draws from."""
        return self.stream.num_tokens

    def metrics(self) -> dict[str, float]:
        """What the training log reports about the data (nothing for one dataset)."""
        return {}

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
    """The same validation windows on every call, spread evenly over the whole split (the first
    windows alone would measure a handful of documents), dealt round-robin to ranks: micro-batch
    j goes to rank j % world."""
    windows = (stream.num_tokens - 1) // seq_len
    total = min(num_batches, windows // micro_batch_size)
    chosen = np.linspace(0, windows - 1, total * micro_batch_size).round().astype(np.int64)
    return [
        make_batch(stream, chosen[j * micro_batch_size : (j + 1) * micro_batch_size], seq_len, eot_id)
        for j in range(rank, total, world_size)
    ]


class MixtureLoader:
    """Training batches drawn from several prepared datasets (domains) by weight.

    For global step s, every sequence of the batch picks its domain with a generator seeded by
    (seed, s), so the draw does not depend on the world size or on resuming; each domain hands
    out windows from its own `DataLoader` order (its own epochs). The state is the step, each
    domain loader's state and the windows seen per domain; resuming with other domains or
    weights is refused, so a resumed run keeps its mixture.
    """

    def __init__(
        self,
        streams: dict[str, TokenStream],
        weights: dict[str, float],
        seq_len: int,
        batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        eot_id: int | None = None,
    ):
        if set(streams) != set(weights) or not streams:
            raise ValueError(f"mixture: domains {sorted(streams)} vs weights {sorted(weights)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
        self.names = list(streams)
        total = sum(weights.values())
        self.weights = np.array([weights[n] / total for n in self.names])  # (D,)
        self.loaders = [
            DataLoader(streams[n], seq_len, batch_size, micro_batch_size, rank, world_size,
                       seed + 1000 * (i + 1), eot_id)
            for i, n in enumerate(self.names)
        ]
        self.seq_len, self.batch_size, self.micro = seq_len, batch_size, micro_batch_size
        self.rank, self.world, self.seed, self.eot_id = rank, world_size, seed, eot_id
        self.accum_steps = self.loaders[0].accum_steps
        self.step = 0
        self.seen = np.zeros(len(self.names), np.int64)  # windows drawn per domain

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch, sequences mixed by weight."""
        rng = np.random.default_rng([self.seed, 0x6D6978, self.step])
        domains = rng.choice(len(self.names), size=self.batch_size, p=self.weights)  # (B,)
        windows = np.empty(self.batch_size, np.int64)
        for d, loader in enumerate(self.loaders):
            where = np.flatnonzero(domains == d)
            windows[where] = loader._take_global(len(where))
        self.seen += np.bincount(domains, minlength=len(self.names))
        self.step += 1
        T = self.seq_len
        micro = []
        for m in range(self.accum_steps):
            sl = slice((m * self.world + self.rank) * self.micro,
                       (m * self.world + self.rank + 1) * self.micro)
            rows = np.stack([self.loaders[d].stream.read(int(w) * T, T + 1)
                             for d, w in zip(domains[sl], windows[sl])])  # (micro, T+1)
            inputs, targets = rows[:, :-1], rows[:, 1:]
            doc_ids = None
            if self.eot_id is not None:
                doc_ids = torch.from_numpy(document_ids(inputs, self.eot_id))
            micro.append(Batch(torch.from_numpy(inputs.copy()), torch.from_numpy(targets.copy()),
                               doc_ids))
        return micro

    @property
    def num_tokens(self) -> int:
        """Training tokens of all domains together."""
        return sum(loader.num_tokens for loader in self.loaders)

    def mixture_seen(self) -> dict[str, float]:
        """Fraction of training sequences drawn from each domain so far."""
        total = max(int(self.seen.sum()), 1)
        return {n: int(c) / total for n, c in zip(self.names, self.seen)}

    def metrics(self) -> dict[str, float]:
        """mixture/<domain>: the fraction of training sequences drawn from it so far."""
        return {f"mixture/{k}": v for k, v in self.mixture_seen().items()}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "names": list(self.names),
            "weights": self.weights.tolist(),
            "seen": self.seen.tolist(),
            "loaders": [loader.state_dict() for loader in self.loaders],
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if "names" not in state:
            raise ValueError("loader state is not a mixture's; resume with the same data config")
        if state["names"] != self.names or not np.allclose(state["weights"], self.weights):
            raise ValueError(
                f"loader state has mixture {dict(zip(state['names'], state['weights']))}, this "
                f"run has {dict(zip(self.names, self.weights.tolist()))}"
            )
        if state["seed"] != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this run uses {self.seed}")
        self.step = int(state["step"])
        self.seen = np.array(state["seen"], np.int64)
        for loader, sub in zip(self.loaders, state["loaders"]):
            loader.load_state_dict(sub)


def parse_mixture(entries: list[str]) -> dict[str, float]:
    """["data_cache/code=3", "data_cache/web=1"] -> {path: weight} (data.mixture)."""
    out: dict[str, float] = {}
    for entry in entries:
        path, sep, weight = entry.rpartition("=")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not path or value < 0:
            raise ValueError(f"data.mixture entry {entry!r}: expected 'prepared_dir=weight'")
        out[path] = value
    return out


def build_train_loader(
    data_cfg, manifest: dict, seq_len: int, batch_size: int, micro_batch_size: int,
    rank: int = 0, world_size: int = 1, seed: int = 0, eot_id: int | None = None,
) -> DataLoader | MixtureLoader:
    """The training loader of a config: one dataset (`data.path`), or the domains of
    `data.mixture`, which must share `data.path`'s tokenizer."""
    if not data_cfg.mixture:
        return DataLoader(TokenStream(data_cfg.path, "train", manifest), seq_len, batch_size,
                          micro_batch_size, rank, world_size, seed, eot_id)
    from data.manifest import load_manifest

    weights = parse_mixture(data_cfg.mixture)
    streams = {}
    for path in weights:
        domain_manifest = load_manifest(path, splits=("train",))  # a domain trains only
        if domain_manifest["tokenizer"].get("sha256") != manifest["tokenizer"].get("sha256"):
            raise ValueError(
                f"data.mixture: {path} was tokenized with {domain_manifest['tokenizer']['name']!r}"
                f", data.path {data_cfg.path} with {manifest['tokenizer']['name']!r}; a mixture "
                f"needs one tokenizer"
            )
        streams[path] = TokenStream(path, "train", domain_manifest)
    return MixtureLoader(streams, weights, seq_len, batch_size, micro_batch_size, rank,
                         world_size, seed, eot_id)
