"""Contamination check: which benchmark items share word n-grams with the training data.

The method is GPT-3's, as lm-evaluation-harness implements it (REFERENCE.md "Contamination"):
text is normalized (lowercase, ASCII punctuation removed, split on whitespace) and cut into word
n-grams, N per benchmark (13 for LAMBADA / HellaSwag / Winogrande, 10 ARC-Challenge, 9 ARC-Easy,
8 PIQA). An item is dirty when its n-grams occur in training data: any of them by default, or at
least a given fraction of them.

The training side is an index: every word n-gram of every training document, hashed to 64 bits,
stored as a sorted array of unique np.uint64 (8 bytes per distinct n-gram, so a billion-token
corpus takes a few GB; membership is a binary search). It is built from a prepared data dir's
train shards (documents decoded with the data dir's tokenizer, split on end-of-text, no
n-gram crossing a document boundary) and saved beside them as `ngrams_<n>.npy`, with a sidecar
`ngrams_<n>.json` recording which shards it covers, so it is built once and reused.

Hashing is data/normalize.py's, shared with the decontamination stage of data.prepare: 64-bit
polynomial hashes of the words and of each run of n word hashes, mixed with splitmix64, all in
NumPy. Two different n-grams collide with probability about 2^-64 per pair, so with I indexed
n-grams and Q item n-grams the expected number of false matches is I * Q / 2^64: about 1e-6 for
a billion-n-gram index and ten thousand items.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.atomic import atomic_path, write_json
from common.errors import FileFormatError, read_json
from data.manifest import manifest_tokenizer
from data.normalize import combine_ngrams, match_bytes, ngram_hashes, word_hashes, word_spans
from eval.tasks import TASKS

# N per task (eval/tasks.py, from REFERENCE.md): the 5th-percentile item length in words,
# clamped to [8, 13].
TASK_NGRAM_N = {name: spec.ngram_n for name, spec in TASKS.items()}
HASH_NAME = "data.normalize.ngram_hashes/1"  # saved with each index; another hash -> rebuild


def normalize_words(text: str) -> list[bytes]:
    """The words `ngram_hashes` hashes: lowercased (ASCII, as lm-eval), ASCII punctuation
    removed, split on whitespace (as UTF-8 bytes). For counting and exact reference checks."""
    return match_bytes(text).split()


def text_word_hashes(text: str) -> np.ndarray:
    """(W,) uint64 hashes of the words of `text`, for combining into n-grams of several n."""
    buf = match_bytes(text)
    starts, ends = word_spans(buf)
    return word_hashes(buf, starts, ends)


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------


class _SortedUnion:
    """Accumulates hash arrays into one sorted unique array in O(N log N) total work.

    Arrays are buffered, then deduplicated into sorted runs; runs of similar size are merged
    (like a log-structured merge tree), so no big array is re-merged for every small chunk.
    """

    def __init__(self, chunk: int = 1 << 24):
        self.chunk = chunk
        self.pending: list[np.ndarray] = []
        self.pending_size = 0
        self.runs: list[np.ndarray] = []

    def add(self, hashes: np.ndarray) -> None:
        if len(hashes):
            self.pending.append(hashes)
            self.pending_size += len(hashes)
            if self.pending_size >= self.chunk:
                self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.runs.append(np.unique(np.concatenate(self.pending)))
            self.pending, self.pending_size = [], 0
        while len(self.runs) >= 2 and 2 * len(self.runs[-1]) >= len(self.runs[-2]):
            last = self.runs.pop()
            self.runs[-1] = np.union1d(self.runs[-1], last)

    def result(self) -> np.ndarray:
        self._flush()
        out = np.empty(0, dtype=np.uint64)
        for run in self.runs:
            out = np.union1d(out, run)
        return out.astype(np.uint64, copy=False)


class NgramIndex:
    """A sorted array of unique 64-bit n-gram hashes with vectorized membership."""

    def __init__(self, hashes: np.ndarray, n: int):
        self.hashes = hashes
        self.n = n

    @classmethod
    def from_texts(cls, texts: Iterable[str], n: int, chunk_ngrams: int = 1 << 24) -> NgramIndex:
        """Index every n-gram of every text. Deduplicates in chunks to bound peak memory."""
        union = _SortedUnion(chunk_ngrams)
        for text in texts:
            union.add(combine_ngrams(text_word_hashes(text), n))
        return cls(union.result(), n)

    def __len__(self) -> int:
        return len(self.hashes)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """(K,) uint64 -> (K,) bool: which hashes are in the index."""
        if len(self.hashes) == 0 or len(hashes) == 0:
            return np.zeros(len(hashes), dtype=bool)
        pos = np.searchsorted(self.hashes, hashes)
        pos = np.minimum(pos, len(self.hashes) - 1)
        return self.hashes[pos] == hashes

    def overlap(self, text: str) -> tuple[int, int]:
        """(n-grams of `text` found in the index, n-grams of `text`)."""
        h = ngram_hashes(text, self.n)
        return int(self.contains(h).sum()), len(h)

    def save(self, path: str | Path) -> None:
        """Write the array atomically (common/atomic.py)."""
        # A file object, not a path: np.save would append ".npy" to the temporary's name.
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, self.hashes)

    @classmethod
    def load(cls, path: str | Path, n: int) -> NgramIndex:
        try:
            hashes = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:  # truncated, not .npy, a pickle
            raise FileFormatError(path, "an n-gram index (.npy of uint64)", str(e)[:200]) from None
        if not isinstance(hashes, np.ndarray) or hashes.dtype != np.uint64 or hashes.ndim != 1:
            got = f"{getattr(hashes, 'dtype', type(hashes))} {getattr(hashes, 'shape', '')}"
            raise FileFormatError(path, "a 1-D uint64 array", f"got {got}")
        return cls(hashes, n)


def is_dirty(overlap: int, total: int, threshold: float | None = None) -> bool:
    """Dirty when any n-gram matched (threshold None) or at least `threshold` of them did.

    An item shorter than n words has no n-grams and is never dirty (lm-eval behaves the same;
    the per-task N is chosen so that about 5% of items are that short).
    """
    if total == 0:
        return False
    if threshold is None:
        return overlap > 0
    return overlap / total >= threshold


def dirty_flags(
    texts: Sequence[str], index: NgramIndex, threshold: float | None = None
) -> list[bool]:
    return [is_dirty(*index.overlap(t), threshold) for t in texts]


# ---------------------------------------------------------------------------------------------
# Building from a prepared data dir (train shards) and caching beside them
# ---------------------------------------------------------------------------------------------


def train_shards(data_dir: str | Path) -> list[Path]:
    shards = sorted(Path(data_dir).glob("train_*.bin"))
    if not shards:
        raise FileNotFoundError(f"{data_dir}: no train_*.bin shards to build an n-gram index from")
    return shards


def iter_documents(
    token_arrays: Iterable[np.ndarray], eot_id: int
) -> Iterator[np.ndarray]:
    """Split a stream of token arrays into documents at the end-of-text token.

    Each document is followed by eot; a document may run across shard boundaries, so the tail
    of one array is carried into the next. A final document without eot is still yielded.
    """
    carry = np.empty(0, dtype=np.int64)
    for arr in token_arrays:
        arr = np.asarray(arr)
        ends = np.flatnonzero(arr == eot_id)
        start = 0
        for end in ends:
            doc = arr[start:end]
            if len(carry):
                doc, carry = np.concatenate([carry, doc]), np.empty(0, dtype=np.int64)
            yield doc
            start = end + 1
        if start < len(arr):
            carry = np.concatenate([carry, arr[start:]])
    if len(carry):
        yield carry


def _shard_signature(shards: Sequence[Path]) -> list[list]:
    return [[p.name, p.stat().st_size] for p in shards]


def build_indexes(
    data_dir: str | Path,
    tokenizer,
    ns: Iterable[int] = (8, 9, 10, 13),
    progress: bool = True,
) -> dict[int, NgramIndex]:
    """Build and save `ngrams_<n>.npy` for every n from the train shards of a prepared dir.

    The shards are decoded once; every n is indexed from the same pass.
    """
    from data.shards import read_shard  # imported here: keeps this module importable alone

    data_dir = Path(data_dir)
    ns = sorted(set(ns))
    shards = train_shards(data_dir)
    unions = {n: _SortedUnion() for n in ns}
    arrays = [read_shard(p) for p in shards]  # memory-mapped
    bar = tqdm(
        total=sum(len(a) for a in arrays), unit="tok", unit_scale=True, disable=not progress,
        desc=f"n-gram index {data_dir.name}",
    )
    for doc in iter_documents(arrays, tokenizer.eot_id):
        words = text_word_hashes(tokenizer.decode(doc.tolist()))
        for n in ns:
            unions[n].add(combine_ngrams(words, n))
        bar.update(len(doc) + 1)
    bar.close()

    signature = _shard_signature(shards)
    indexes = {}
    for n in ns:
        index = NgramIndex(unions[n].result(), n)
        index.save(data_dir / f"ngrams_{n}.npy")
        meta = {"n": n, "count": len(index), "shards": signature, "hash": HASH_NAME}
        write_json(data_dir / f"ngrams_{n}.json", meta)
        indexes[n] = index
    return indexes


def load_or_build_index(
    data_dir: str | Path, n: int, tokenizer=None, progress: bool = True
) -> NgramIndex:
    """The saved index for n when it is current (covers exactly today's shards), else build.

    `tokenizer` decodes the shards; by default the data dir's own (from its manifest).
    """
    data_dir = Path(data_dir)
    npy, meta_path = data_dir / f"ngrams_{n}.npy", data_dir / f"ngrams_{n}.json"
    if npy.is_file() and meta_path.is_file():
        # The index is a cache of the shards: a damaged or stale one is rebuilt, not trusted.
        try:
            meta = read_json(meta_path, "n-gram index metadata")
            current = isinstance(meta, dict) and meta.get("hash") == HASH_NAME and \
                meta.get("shards") == _shard_signature(train_shards(data_dir))
            index = NgramIndex.load(npy, n) if current else None
            if index is not None and len(index) == meta.get("count"):
                return index
        except FileFormatError as e:
            print(f"rebuilding the n-gram index: {e}", file=sys.stderr)
    if tokenizer is None:
        tokenizer = manifest_tokenizer(data_dir)
    # Build every task's n in the same pass: decoding the shards is the expensive part.
    return build_indexes(data_dir, tokenizer, set(TASK_NGRAM_N.values()) | {n}, progress)[n]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.contamination",
        description="Build the n-gram indexes of a prepared data dir's train shards (python -m "
        "eval builds the one it needs on demand; this builds every task's n in one pass).",
    )
    parser.add_argument(
        "--data", metavar="DIR", required=True,
        help="prepared data dir (train_*.bin + manifest.json); the indexes are written there",
    )
    parser.add_argument("--n", type=int, nargs="+", default=sorted(set(TASK_NGRAM_N.values())),
                        help="n-gram sizes (default: every task's)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """python -m eval.contamination --data DIR: build the n-gram indexes of a prepared dir."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    indexes = build_indexes(args.data, manifest_tokenizer(args.data), args.n)
    for n, index in indexes.items():
        size = (Path(args.data) / f"ngrams_{n}.npy").stat().st_size
        print(f"ngrams_{n}.npy: {len(index):,} distinct {n}-grams, {size / 1e6:.1f} MB")
    print(f"built in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
