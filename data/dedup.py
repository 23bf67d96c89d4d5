"""Exact and near-duplicate removal: the `exact_dedup` and `near_dedup` stages.

Both are global stages (see data/pipeline.py): a worker computes a small signature per document,
and the parent keeps the state and decides in document order, so the first document of a group
is the one kept, whatever the number of workers.

exact_dedup: a 64-bit BLAKE2b digest of the text as it reaches the stage (after `normalize`
when that runs first); a document whose digest was seen before, in any source, is dropped.
State: one Python int per distinct document (~70 bytes).

near_dedup: MinHash LSH as in datatrove / FineWeb. Words are lowercased with punctuation removed
and digits mapped to 0; shingles are runs of `shingle_words` (5) words, hashed to 32 bits; the
signature is the minimum over shingles of `num_bands * rows_per_band` (14 x 8 = 112) hash
functions. A document whose signature agrees with an earlier one's on all rows of some band is a
candidate; with `verify_threshold` > 0 the candidate must also agree on at least that fraction of
all 112 values (an unbiased estimate of the Jaccard similarity, std <= 0.05), which removes the
5% of pairs at Jaccard 0.5 that the bands alone would flag. Documents are nodes of a union-find;
a document joining an existing cluster is dropped, so each cluster keeps its first document.
Streaming cannot take back a kept document: when a later document bridges two clusters whose
first documents were both kept, both stay (counted as "bridged_clusters").
State: per document its 112 uint32 values (448 bytes) plus up to 14 bucket entries.

Hash functions: h_i(x) = ((a_i * x + b_i) mod 2**64) >> 32 for 32-bit shingle hashes x and
random 64-bit a_i (odd), b_i: Dietzfelbinger's multiply-add-shift family, 2-independent like
(a*x + b) mod p, but computed exactly with numpy's wrapping uint64 arithmetic (a true mod p with
p = 2**61 - 1 would need 128-bit products). All 112 functions are applied to all shingles at
once: a (S, 112) array per block of shingles, so no Python code runs per shingle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from data.normalize import combine_ngrams, match_bytes, mix64, word_hashes, word_spans

# ---------------------------------------------------------------------------------------------
# Exact
# ---------------------------------------------------------------------------------------------


def text_digest(text: str) -> int:
    """64-bit BLAKE2b digest of the UTF-8 text, as an int."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class ExactDedup:
    """Global stage: drop a document whose exact text was seen earlier in the run."""

    name = "exact_dedup"

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def signature(self, text: str) -> int:
        return text_digest(text)

    def admit(self, sig: int, counts: dict[str, int]) -> bool:
        if sig in self.seen:
            return False
        self.seen.add(sig)
        return True


# ---------------------------------------------------------------------------------------------
# Near (MinHash LSH)
# ---------------------------------------------------------------------------------------------


@dataclass
class NearDedupConfig:
    """Settings of the near_dedup stage ([data.near_dedup] in the job config)."""

    num_bands: int = 14  # LSH bands; a pair is a candidate if all rows of one band agree
    rows_per_band: int = 8  # rows (hash functions) per band; 14 x 8 = 112 hash functions
    shingle_words: int = 5  # words per shingle
    # A candidate must agree on at least this fraction of all hash values (estimated Jaccard);
    # 0 keeps every LSH candidate (plain LSH, as datatrove does).
    verify_threshold: float = 0.7
    seed: int = 0  # seeds the hash functions: fixed so reruns give identical output

    def __post_init__(self) -> None:
        for name in ("num_bands", "rows_per_band", "shingle_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"near_dedup.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.verify_threshold <= 1.0:
            raise ValueError(
                f"near_dedup.verify_threshold must be in [0, 1], got {self.verify_threshold}"
            )


_BLOCK = 1024  # shingles per (block, num_perm) array: 1024 x 112 x 8 bytes = 0.9 MB, in cache


class MinHasher:
    """MinHash signatures and LSH band keys for one configuration."""

    def __init__(self, cfg: NearDedupConfig):
        self.cfg = cfg
        self.num_perm = cfg.num_bands * cfg.rows_per_band
        rng = np.random.default_rng(cfg.seed)
        # (num_perm,) each; a odd so that x -> a*x is a bijection mod 2**64.
        self.a = rng.integers(0, 2**64, self.num_perm, dtype=np.uint64, endpoint=False)
        self.a |= np.uint64(1)
        self.b = rng.integers(0, 2**64, self.num_perm, dtype=np.uint64, endpoint=False)
        # Combines a band's rows into one 64-bit key; the band index is mixed in so that
        # bands never share keys.
        self.row_mult = mix64(np.arange(1, cfg.rows_per_band + 1, dtype=np.uint64)) | np.uint64(1)
        self.band_salt = mix64(np.arange(cfg.num_bands, dtype=np.uint64) + np.uint64(977))

    def shingles(self, text: str) -> np.ndarray:
        """32-bit shingle hashes (uint64 values < 2**32, shape (S,)); a text shorter than one
        shingle gives one shingle of all its words, an empty text none."""
        buf = match_bytes(text, digits_to_zero=True)
        starts, ends = word_spans(buf)
        if len(starts) == 0:
            return np.zeros(0, np.uint64)
        words = word_hashes(buf, starts, ends)
        return combine_ngrams(words, min(self.cfg.shingle_words, len(words))) >> np.uint64(32)

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """MinHash signature: uint32 (num_perm,), the min over shingles of each h_i."""
        out = np.full(self.num_perm, np.iinfo(np.uint64).max, np.uint64)
        buf = np.empty((min(_BLOCK, len(shingles)), self.num_perm), np.uint64)
        for i in range(0, len(shingles), _BLOCK):
            x = shingles[i : i + _BLOCK, None]  # (s, 1) against a, b (num_perm,)
            values = buf[: len(x)]  # (s, num_perm), computed in place
            np.multiply(x, self.a, out=values)
            values += self.b
            np.minimum(out, values.min(axis=0), out=out)
        # ">> 32" commutes with min (it is monotonic), so it is applied to the 112 minima only.
        return (out >> np.uint64(32)).astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """One uint64 key per band, shape (num_bands,)."""
        rows = sig.astype(np.uint64).reshape(self.cfg.num_bands, self.cfg.rows_per_band)
        return mix64((rows * self.row_mult).sum(axis=1) + self.band_salt)


class NearDedup:
    """Global stage: MinHash LSH near-duplicate removal, one document kept per cluster."""

    name = "near_dedup"

    def __init__(self, cfg: NearDedupConfig | None = None):
        self.cfg = cfg or NearDedupConfig()
        self.hasher = MinHasher(self.cfg)
        self.buckets: dict[int, int] = {}  # band key -> first document id with that key
        self.parent: list[int] = []  # union-find over document ids
        self.size: list[int] = []
        self.sigs = np.zeros((1024, self.hasher.num_perm), np.uint32)  # grows by doubling
        self.clusters_with_dups = 0
        self.largest = 1

    def signature(self, text: str) -> tuple[np.ndarray, np.ndarray] | None:
        shingles = self.hasher.shingles(text)
        if len(shingles) == 0:
            return None
        sig = self.hasher.signature(shingles)
        return sig, self.hasher.band_keys(sig)

    def _find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def _union(self, root_a: int, root_b: int) -> int:
        if self.size[root_a] < self.size[root_b]:
            root_a, root_b = root_b, root_a
        dup_before = (self.size[root_a] > 1) + (self.size[root_b] > 1)
        self.parent[root_b] = root_a
        self.size[root_a] += self.size[root_b]
        self.clusters_with_dups += 1 - dup_before
        self.largest = max(self.largest, self.size[root_a])
        return root_a

    def admit(self, sig: tuple[np.ndarray, np.ndarray] | None, counts: dict[str, int]) -> bool:
        if sig is None:  # no words: nothing to compare
            counts["no_words"] = counts.get("no_words", 0) + 1
            return True
        values, keys = sig
        doc = len(self.parent)
        self.parent.append(doc)
        self.size.append(1)
        if doc == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.zeros_like(self.sigs)])
        self.sigs[doc] = values
        candidates = set()
        for key in keys.tolist():
            other = self.buckets.setdefault(key, doc)
            if other != doc:
                candidates.add(other)
        if not candidates:
            return True
        threshold = self.cfg.verify_threshold
        matched = [
            other
            for other in sorted(candidates)
            if threshold <= 0 or np.mean(self.sigs[other] == values) >= threshold
        ]
        if not matched:
            counts["rejected_candidates"] = counts.get("rejected_candidates", 0) + 1
            return True
        roots = sorted({self._find(other) for other in matched})
        if len(roots) > 1:
            counts["bridged_clusters"] = counts.get("bridged_clusters", 0) + len(roots) - 1
        root = roots[0]
        for other in roots[1:]:
            root = self._union(root, other)
        self._union(root, doc)
        counts["clusters"] = self.clusters_with_dups
        counts["largest_cluster"] = self.largest
        return False


def jaccard(a: str, b: str, shingle_words: int = 5) -> float:
    """Exact Jaccard similarity of the two texts' shingle sets, with near_dedup's shingling."""
    hasher = MinHasher(NearDedupConfig(shingle_words=shingle_words))
    sa, sb = set(hasher.shingles(a).tolist()), set(hasher.shingles(b).tolist())
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)
