"""Decontamination against benchmark test sets: the `decontaminate` stage.

As in GPT-3 / lm-evaluation-harness: text is lowercased, ASCII punctuation is removed and it is
split on whitespace (data.normalize.ngram_hashes, which eval's contamination check shares); the
word n-grams of every benchmark item go into an index, N per benchmark = the 5th percentile of
item length in words clamped to [8, 13] (13 for LAMBADA and HellaSwag, lower for short items,
e.g. 8 for PIQA); items shorter than N are counted as "short_items" and not indexed.

A training document sharing an n-gram with a benchmark is, by config:
- "drop": dropped;
- "cut": the matched spans plus `margin` (200) characters each side are removed, pieces shorter
  than `min_piece_chars` (200) are dropped, and a document cut more than `max_cuts` (10) times,
  or with nothing left, is dropped.
Counts: "<benchmark>" = documents that matched it, "<benchmark>.ngrams" = matched n-grams,
"cut_docs", "dropped_docs", "chars_cut".

The index per N is a sorted numpy array of 64-bit n-gram hashes; a document's n-grams are looked
up with one `np.searchsorted`, no Python code per n-gram.

Benchmark files are read by `load_benchmark_texts` (HellaSwag's 6-lines-per-item text form,
and jsonl with a "text" field such as LAMBADA's). TODO(lead): switch to eval/tasks.py's loaders
once they land, so that eval and decontamination read benchmarks one way.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import PretrainError
from data.normalize import (
    combine_ngrams,
    match_bytes,
    match_offsets,
    ngram_hashes,
    word_hashes,
    word_spans,
)

__all__ = [
    "DecontamConfig",
    "Decontaminator",
    "BenchmarkIndex",
    "load_benchmark_texts",
    "ngram_hashes",
    "ngram_size",
]

DEFAULT_BENCHMARKS = [
    "hellaswag=../shared/benchmarks/hellaswag/hellaswag_val_full.txt",
    "lambada=../shared/benchmarks/lambada/lambada_test.jsonl",
]


@dataclass
class DecontamConfig:
    """Settings of the decontaminate stage ([data.decontaminate])."""

    # "name=path" per benchmark; relative paths are from the working directory (the repo root).
    benchmarks: list[str] = field(default_factory=lambda: list(DEFAULT_BENCHMARKS))
    ngram: int = 0  # N for every benchmark; 0: per benchmark, 5th-percentile length in [8, 13]
    mode: str = "cut"  # "cut" the matched spans out, or "drop" the document
    margin: int = 200  # characters removed on each side of a match (cut mode)
    min_piece_chars: int = 200  # pieces shorter than this are dropped after cutting
    max_cuts: int = 10  # a document needing more cuts is dropped
    missing: str = "skip"  # a benchmark file that does not exist: "skip" (warn) or "error"

    def __post_init__(self) -> None:
        if self.mode not in ("cut", "drop"):
            raise ValueError(f"decontaminate.mode must be 'cut' or 'drop', got {self.mode!r}")
        if self.missing not in ("skip", "error"):
            raise ValueError(
                f"decontaminate.missing must be 'skip' or 'error', got {self.missing!r}"
            )
        for spec in self.benchmarks:
            if "=" not in spec:
                raise ValueError(f"decontaminate.benchmarks entry {spec!r}: expected 'name=path'")


class BenchmarkError(PretrainError, ValueError):
    pass


def load_benchmark_texts(name: str, path: str | Path) -> list[str]:
    """The texts of a benchmark's items, one string per item.

    - HellaSwag text form (a .txt named hellaswag*): 6 lines per item, context, gold label
      (0-3), 4 endings; an item's text is the context followed by its gold ending.
    - jsonl (LAMBADA and any other): one JSON object per line with a "text" field.
    Errors name the file, the line and what was expected.
    """
    path = Path(path)
    try:
        content = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise BenchmarkError(f"{path}: unreadable ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".txt" and name.lower().startswith("hellaswag"):
        lines = content.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) % 6:
            raise BenchmarkError(f"{path}: {len(lines)} lines, expected 6 per HellaSwag item")
        texts = []
        for i in range(0, len(lines), 6):
            label = lines[i + 1].strip()
            if label not in ("0", "1", "2", "3"):
                raise BenchmarkError(f"{path}:{i + 2}: expected a label 0-3, got {label!r}")
            texts.append(lines[i] + " " + lines[i + 2 + int(label)])
        return texts
    texts = []
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise BenchmarkError(f"{path}:{number}: not JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise BenchmarkError(f"{path}:{number}: expected an object with a 'text' string")
        texts.append(record["text"])
    return texts


def _item_chunks(texts: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Word hashes of the items, a run of items at a time -> (hashes uint64 (W,), item index of
    each word (W,)) per run. A run's matching bytes are joined with spaces so that one
    vectorized pass covers it; runs of about 256 KB bound the temporaries (~40 bytes per byte)."""
    bufs = [match_bytes(t) for t in texts]
    first = 0
    while first < len(bufs):
        last, size = first, 0
        while last < len(bufs) and (last == first or size + len(bufs[last]) < 1 << 18):
            size += len(bufs[last]) + 1
            last += 1
        joined = b" ".join(bufs[first:last])
        starts, ends = word_spans(joined)
        item_start = np.cumsum([0] + [len(b) + 1 for b in bufs[first : last - 1]])
        items = np.searchsorted(item_start, starts, side="right") - 1 + first
        yield word_hashes(joined, starts, ends), items
        first = last


def _item_words(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Word hashes of all items -> (hashes uint64 (W,), item index of each word (W,))."""
    chunks = list(_item_chunks(texts))
    return (np.concatenate([np.zeros(0, np.uint64)] + [h for h, _ in chunks]),
            np.concatenate([np.zeros(0, np.int64)] + [i for _, i in chunks]))


def ngram_size(texts: list[str]) -> int:
    """N for a benchmark: 5th percentile of item length in words, clamped to [8, 13]."""
    if not texts:
        return 13
    _, item_of_word = _item_words(texts)
    lengths = np.bincount(item_of_word, minlength=len(texts))
    return int(np.clip(np.percentile(lengths, 5), 8, 13))


@dataclass
class BenchmarkIndex:
    """The n-gram index of one benchmark."""

    name: str
    n: int
    hashes: np.ndarray  # sorted unique uint64 (G,)
    items: int
    short_items: int  # items shorter than n words, not indexed

    @classmethod
    def build(cls, name: str, texts: list[str], n: int = 0) -> BenchmarkIndex:
        if not texts:
            return cls(name, n or 13, np.zeros(0, np.uint64), 0, 0)
        if not n:
            lengths = np.bincount(_item_words(texts)[1], minlength=len(texts))
            n = int(np.clip(np.percentile(lengths, 5), 8, 13))
        kept, lengths = [np.zeros(0, np.uint64)], np.zeros(len(texts), np.int64)
        for words, item_of_word in _item_chunks(texts):  # runs of whole items
            lengths += np.bincount(item_of_word, minlength=len(texts))
            grams = combine_ngrams(words, n)  # (W-n+1,), some crossing item boundaries
            kept.append(grams[item_of_word[: len(grams)] == item_of_word[n - 1 :]])
        # Sorted unique, by sort + neighbour compare (np.unique's hash path is slow on uint64).
        hashes = np.sort(np.concatenate(kept))
        hashes = hashes[np.concatenate([[True], hashes[1:] != hashes[:-1]])]
        return cls(name, n, hashes, len(texts), int(np.sum(lengths < n)))

    def contains(self, grams: np.ndarray) -> np.ndarray:
        """bool (G,): which of `grams` are in the index."""
        if len(self.hashes) == 0 or len(grams) == 0:
            return np.zeros(len(grams), bool)
        pos = np.searchsorted(self.hashes, grams)
        pos[pos == len(self.hashes)] = 0
        return self.hashes[pos] == grams


class Decontaminator:
    """Stage: drop documents sharing an n-gram with a benchmark, or cut the shared spans out."""

    name = "decontaminate"

    def __init__(
        self, cfg: DecontamConfig | None = None, indexes: list[BenchmarkIndex] | None = None
    ):
        self.cfg = cfg or DecontamConfig()
        self.missing: list[str] = []
        if indexes is None:
            indexes = []
            for spec in self.cfg.benchmarks:
                name, path = spec.split("=", 1)
                if not os.path.exists(path):
                    if self.cfg.missing == "error":
                        raise FileNotFoundError(
                            f"decontaminate: benchmark {name!r}: no file {path}"
                        )
                    warnings.warn(
                        f"decontaminate: benchmark {name!r} skipped, no file {path}", stacklevel=2
                    )
                    self.missing.append(name)
                    continue
                indexes.append(
                    BenchmarkIndex.build(name, load_benchmark_texts(name, path), self.cfg.ngram)
                )
        self.indexes = indexes
        # Per N, a bitset over the top bits of all indexed hashes (about 64 bits per n-gram, so
        # ~1.5% of absent n-grams pass): most lookups stop at one gather; only what passes
        # goes to the benchmarks' np.searchsorted.
        self._bitsets: dict[int, tuple[int, np.ndarray]] = {}
        for n in sorted({ix.n for ix in indexes}):
            hashes = np.concatenate([ix.hashes for ix in indexes if ix.n == n])
            bits = int(np.clip(np.ceil(np.log2(max(len(hashes), 1) * 64)), 16, 32))
            bitset = np.zeros(1 << (bits - 3), np.uint8)
            top = hashes >> np.uint64(64 - bits)
            np.bitwise_or.at(
                bitset, top >> np.uint64(3), (1 << (top & np.uint64(7))).astype(np.uint8)
            )
            self._bitsets[n] = (bits, bitset)

    def _maybe(self, n: int, grams: np.ndarray) -> np.ndarray:
        """Indices of `grams` that may be in an index of size n (no false negatives)."""
        bits, bitset = self._bitsets[n]
        top = grams >> np.uint64(64 - bits)
        hit = (bitset[top >> np.uint64(3)] >> (top & np.uint64(7)).astype(np.uint8)) & 1
        return np.flatnonzero(hit)

    def describe(self) -> dict:
        """What the index holds, for the manifest."""
        return {
            "benchmarks": {
                ix.name: {
                    "n": ix.n,
                    "items": ix.items,
                    "short_items": ix.short_items,
                    "ngrams": int(len(ix.hashes)),
                }
                for ix in self.indexes
            },
            "missing": self.missing,
            "mode": self.cfg.mode,
        }

    def matches(self, text: str) -> tuple[dict[str, int], list[tuple[int, int]], tuple]:
        """({benchmark: matched n-grams}, matched word ranges [first, last+1), word data)."""
        buf = match_bytes(text)
        starts, ends = word_spans(buf)
        words = word_hashes(buf, starts, ends)
        hits: dict[str, int] = {}
        ranges: list[tuple[int, int]] = []
        candidates: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for ix in self.indexes:
            if ix.n not in candidates:
                grams = combine_ngrams(words, ix.n)
                maybe = self._maybe(ix.n, grams)
                candidates[ix.n] = (maybe, grams[maybe])
            maybe, grams = candidates[ix.n]
            found = maybe[ix.contains(grams)]
            if len(found):
                hits[ix.name] = len(found)
                ranges.extend(zip(found.tolist(), (found + ix.n).tolist()))
        return hits, ranges, (starts, ends)

    def __call__(self, text: str, doc: object, counts: dict[str, int]) -> str | None:
        hits, ranges, (starts, ends) = self.matches(text)
        if not hits:
            return text
        for name, n in hits.items():
            counts[name] = counts.get(name, 0) + 1
            counts[f"{name}.ngrams"] = counts.get(f"{name}.ngrams", 0) + n
        if self.cfg.mode == "drop":
            counts["dropped_docs"] = counts.get("dropped_docs", 0) + 1
            return None
        out = self.cut(text, ranges, starts, ends, counts)
        if out is None:
            counts["dropped_docs"] = counts.get("dropped_docs", 0) + 1
        else:
            counts["cut_docs"] = counts.get("cut_docs", 0) + 1
        return out

    def cut(
        self,
        text: str,
        ranges: list[tuple[int, int]],
        starts: np.ndarray,
        ends: np.ndarray,
        counts: dict[str, int],
    ) -> str | None:
        """Remove the matched word ranges plus the margin; None if the document must go."""
        # Word byte offsets in match_bytes -> byte offsets in the UTF-8 text -> characters.
        offsets = match_offsets(text)
        raw = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
        char_of = np.cumsum((raw & 0xC0) != 0x80) - 1  # character index of each byte
        spans = []
        for first, last in ranges:
            b0 = offsets[starts[first]]
            b1 = offsets[ends[last - 1] - 1]  # last byte of the last word
            c0, c1 = int(char_of[b0]), int(char_of[b1]) + 1
            spans.append((max(0, c0 - self.cfg.margin), min(len(text), c1 + self.cfg.margin)))
        spans.sort()
        merged = [list(spans[0])]
        for s, e in spans[1:]:
            if s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        if len(merged) > self.cfg.max_cuts:
            return None
        pieces, pos = [], 0
        for s, e in merged:
            pieces.append(text[pos:s])
            pos = e
        pieces.append(text[pos:])
        counts["chars_cut"] = counts.get("chars_cut", 0) + sum(e - s for s, e in merged)
        kept = [p for p in pieces if len(p) >= self.cfg.min_piece_chars]
        return "\n".join(kept) if kept else None
