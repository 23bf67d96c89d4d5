"""Exact and near-duplicate removal on planted cases (fresh random documents every run)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from data.dedup import ExactDedup, MinHasher, NearDedup, NearDedupConfig, jaccard
from data.normalize import Normalize
from data.pipeline import Pipeline


@dataclass
class Doc:
    text: str
    source: str = "test"
    line: int | None = None


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    print(f"seed {seed}")  # shown on failure, to reproduce
    return np.random.default_rng(seed)


def random_words(rng, count: int) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, size=rng.integers(3, 9))) for _ in range(count)]


def edit(rng, words: list[str], vocab: list[str], k: int) -> list[str]:
    """Replace k random positions by random vocabulary words."""
    out = list(words)
    for i in rng.choice(len(out), size=k, replace=False):
        out[i] = vocab[rng.integers(len(vocab))]
    return out


def test_exact_dedup_across_sources_after_normalization(rng):
    vocab = random_words(rng, 500)
    base = [" ".join(rng.choice(vocab, 50)) + "\n" for _ in range(40)]
    planted = [3, 7, 7, 12, 30]  # indices copied again (7 twice)
    docs = [Doc(t, "a.txt") for t in base]
    # Copies from another source, some with CRLF line endings: equal after `normalize`.
    docs += [Doc(base[i].replace("\n", "\r\n") if j % 2 else base[i], "b.jsonl", j)
             for j, i in enumerate(planted)]
    pipe = Pipeline([Normalize(), ExactDedup()])
    kept = list(pipe.run(docs))
    assert len(kept) == len(base)
    assert [d.source for _, d in kept] == ["a.txt"] * len(base)  # the first copy is kept
    assert pipe.stats[1].removed == len(planted)


def test_minhash_estimates_jaccard(rng):
    """The fraction of agreeing MinHash values is an unbiased Jaccard estimate: over 40 pairs,
    the mean error is within 0.03 (std of one estimate is <= 0.05 with 112 values, so the mean
    of 40 has std <= 0.008; 0.03 is over 3.5 sigma)."""
    hasher = MinHasher(NearDedupConfig())
    vocab = random_words(rng, 3000)
    errors = []
    for _ in range(40):
        words = list(rng.choice(vocab, 300))
        other = edit(rng, words, vocab, int(rng.integers(1, 60)))
        a, b = " ".join(words), " ".join(other)
        est = np.mean(hasher.signature(hasher.shingles(a)) == hasher.signature(hasher.shingles(b)))
        errors.append(est - jaccard(a, b))
    assert abs(np.mean(errors)) < 0.03


def test_near_dedup_recall_and_precision(rng):
    """Near-duplicates (measured Jaccard >= 0.85) removed at rate >= 0.9; distinct documents,
    including similar ones at Jaccard 0.3-0.5, kept at rate >= 0.99.

    Expected rates with 14 bands x 8 rows and verification at 0.7: P(removed | J=0.85) is
    about 0.99, P(removed | J=0.5) below 1e-4, so the thresholds leave a wide margin."""
    vocab = random_words(rng, 5000)
    bases = [list(rng.choice(vocab, 400)) for _ in range(300)]
    near, similar = [], []
    for i in range(150):
        copy = edit(rng, bases[i], vocab, int(rng.integers(1, 6)))
        near.append((" ".join(bases[i]), " ".join(copy)))
    for i in range(150, 300):
        copy = edit(rng, bases[i], vocab, int(rng.integers(35, 60)))
        similar.append((" ".join(bases[i]), " ".join(copy)))
    near_j = [jaccard(a, b) for a, b in near]  # measured, not assumed from the edit count
    similar_j = [jaccard(a, b) for a, b in similar]

    docs = [Doc(" ".join(b), "base") for b in bases]
    docs += [Doc(b, "near") for _, b in near] + [Doc(b, "similar") for _, b in similar]
    stage = NearDedup()
    pipe = Pipeline([stage])
    kept = {d.text for _, d in pipe.run(docs)}

    near_hi = [b for (_, b), j in zip(near, near_j) if j >= 0.85]
    assert len(near_hi) >= 100
    removed_rate = np.mean([b not in kept for b in near_hi])
    assert removed_rate >= 0.9, removed_rate
    similar_lo = [b for (_, b), j in zip(similar, similar_j) if j < 0.5]
    assert len(similar_lo) >= 100 and max(similar_j) > 0.3  # really similar, just below 0.5
    distinct = [" ".join(b) for b in bases] + similar_lo
    kept_rate = np.mean([t in kept for t in distinct])
    assert kept_rate >= 0.99, kept_rate
    assert pipe.stats[0].removed == len(docs) - len(kept)


def test_near_dedup_keeps_first_of_cluster_and_counts_clusters(rng):
    vocab = random_words(rng, 2000)
    base = list(rng.choice(vocab, 300))
    copies = [" ".join(edit(rng, base, vocab, 1)) for _ in range(4)]
    other = " ".join(rng.choice(vocab, 300))
    stage = NearDedup()
    pipe = Pipeline([stage])
    kept = [t for t, _ in pipe.run([Doc(" ".join(base)), *map(Doc, copies), Doc(other)])]
    assert kept == [" ".join(base), other]
    assert pipe.stats[0].counts["clusters"] == 1
    assert pipe.stats[0].counts["largest_cluster"] == 5


def test_shingles_normalize_case_punctuation_digits():
    hasher = MinHasher(NearDedupConfig())
    a = hasher.shingles("The Quick, brown fox; jumped over 12 lazy dogs!")
    b = hasher.shingles("the quick brown fox jumped over 47 lazy dogs")
    assert np.array_equal(a, b)
    assert len(hasher.shingles("")) == 0
    assert len(hasher.shingles("two words")) == 1  # shorter than a shingle: one of all words
