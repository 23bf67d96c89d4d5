"""Contamination: benchmark items pasted into a training corpus are found dirty, and every other
item's flag equals an exact (unhashed) n-gram comparison, so hashing adds no false positives."""

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data.shards import read_shard, write_shard
from eval.contamination import (
    NgramIndex,
    dirty_flags,
    iter_documents,
    load_or_build_index,
    ngram_hashes,
    normalize_words,
)
from eval.tasks import load_task
from tests.helpers import small_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["textwrap.py", "argparse.py", "difflib.py", "calendar.py", "shutil.py",
                "pathlib.py", "inspect.py", "typing.py", "dataclasses.py", "fractions.py"]


def test_normalization_and_hashing():
    # lm-eval's normalization (data/normalize.py, shared with data.prepare's decontamination)
    words = normalize_words("Hello, World!  It's 3.5\tdegrees")
    assert words == [b"hello", b"world", b"its", b"35", b"degrees"]
    a = ngram_hashes("The cat sat on the mat.", 3)
    assert a.dtype == np.uint64 and len(a) == 4
    # Same words after normalization -> same hashes; one word changed -> that window changes.
    assert np.array_equal(a, ngram_hashes("the CAT sat... on the mat", 3))
    b = ngram_hashes("The cat sat on a mat", 3)
    assert np.array_equal(a[:2], b[:2]) and not np.any(np.isin(a[2:], b[2:]))
    assert len(ngram_hashes("too short", 3)) == 0


def test_iter_documents_splits_on_eot_across_arrays():
    eot = 9
    stream = [np.array([1, 2, 9, 3]), np.array([4, 9]), np.array([9, 5, 6])]
    docs = [d.tolist() for d in iter_documents(stream, eot)]
    assert docs == [[1, 2], [3, 4], [], [5, 6]]


def _corpus_documents() -> list[str]:
    docs = []
    for name in CORPUS_FILES:
        path = STDLIB / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            # split each module into a few documents at blank lines (~ 8 KB each)
            chunks, cur = [], ""
            for block in text.split("\n\n"):
                cur += block + "\n\n"
                if len(cur) > 8000:
                    chunks.append(cur)
                    cur = ""
            docs += chunks + ([cur] if cur else [])
    assert len(docs) > 50, f"too little stdlib text found under {STDLIB}"
    return docs


def _exact_ngrams(texts, n) -> set:
    grams = set()
    for t in texts:
        w = normalize_words(t)
        grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    return grams


def test_pasted_items_and_only_those_are_dirty(tmp_path, benchmark_dir):
    rng = random.Random()
    tok = small_tokenizer()
    tasks = {name: load_task(name, benchmark_dir, limit=600) for name in ("hellaswag", "lambada")}
    pasted = {name: set(rng.sample(range(600), 15)) for name in tasks}
    docs = _corpus_documents()
    for name, idx in pasted.items():
        for i in idx:  # paste inside a random document, between its lines
            d = rng.randrange(len(docs))
            lines = docs[d].split("\n")
            at = rng.randrange(len(lines) + 1)
            docs[d] = "\n".join(lines[:at] + [tasks[name][i].text] + lines[at:])

    # Tokenize like data.prepare (each document followed by eot) and cut the stream into three
    # shards at arbitrary points, so documents run across shard boundaries.
    stream = np.array([t for d in docs for t in tok.encode(d) + [tok.eot_id]], dtype=np.uint16)
    cuts = sorted(rng.sample(range(1, len(stream)), 2))
    for k, part in enumerate(np.split(stream, cuts)):
        write_shard(tmp_path / f"train_{k:06d}.bin", part, tok.n_vocab)
    write_shard(tmp_path / "val_000000.bin", stream[:1000], tok.n_vocab)  # not indexed

    index = load_or_build_index(tmp_path, 13, tok)
    assert sorted(p.name for p in tmp_path.glob("ngrams_*.npy")) == [
        "ngrams_10.npy", "ngrams_13.npy", "ngrams_8.npy", "ngrams_9.npy"]  # every task's n
    assert not list(tmp_path.glob("*.tmp"))
    # Documents recovered across shards: the same index as from the texts directly (built in
    # several merge rounds here).
    texts = [tok.decode(d.tolist()) for d in iter_documents(
        [read_shard(p) for p in sorted(tmp_path.glob("train_*.bin"))], tok.eot_id)]
    assert texts == docs  # byte-level BPE round trip
    assert np.array_equal(index.hashes, NgramIndex.from_texts(texts, 13, 5000).hashes)

    class NoDecode:  # the saved index is reused: nothing is decoded the second time
        eot_id = tok.eot_id

        def decode(self, ids):
            raise AssertionError("index rebuilt although the shards did not change")

    assert np.array_equal(load_or_build_index(tmp_path, 13, NoDecode()).hashes, index.hashes)
    meta_path = tmp_path / "ngrams_13.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "hash": "some-older-hash"}))
    with pytest.raises(AssertionError, match="index rebuilt"):  # built with another hash
        load_or_build_index(tmp_path, 13, NoDecode())
    meta_path.write_text(json.dumps(meta))
    write_shard(tmp_path / "train_000003.bin", stream[:50], tok.n_vocab)  # a new shard
    with pytest.raises(AssertionError, match="index rebuilt"):
        load_or_build_index(tmp_path, 13, NoDecode())

    exact = _exact_ngrams(docs, 13)
    assert len(index) == len(exact)  # no two distinct 13-grams of the corpus share a hash
    for name, items in tasks.items():
        flags = dirty_flags([it.text for it in items], index)
        assert all(flags[i] for i in pasted[name]), name
        # Every flag equals the exact comparison: no false positives or negatives from hashing.
        truth = []
        for it in items:
            w = normalize_words(it.text)
            truth.append(any(tuple(w[i : i + 13]) in exact for i in range(len(w) - 12)))
        assert flags == truth, name
        # An item that was not pasted can still be dirty for real: HellaSwag has several items
        # cut from the same video, sharing whole sentences with a pasted one. Apart from those,
        # dirty items are false positives w.r.t. the pastes (stdlib text sharing 13 words with
        # a benchmark item); allow 1% of them (0 seen in practice).
        pasted_grams = _exact_ngrams([items[i].text for i in pasted[name]], 13)
        unexplained = 0
        for i, (it, flag) in enumerate(zip(items, flags)):
            if flag and i not in pasted[name]:
                w = normalize_words(it.text)
                near_dup = any(tuple(w[j : j + 13]) in pasted_grams for j in range(len(w) - 12))
                unexplained += not near_dup
        assert unexplained <= 0.01 * len(items), (name, unexplained)


def test_threshold_fraction_and_save_load(tmp_path, benchmark_dir):
    items = load_task("lambada", benchmark_dir, limit=40)
    item = items[3]
    words = item.text.split()
    half = " ".join(words[: len(words) // 2])  # about half of the item's 13-grams
    index = NgramIndex.from_texts(["unrelated words " * 20, half], 13)
    found, total = index.overlap(item.text)
    assert 0 < found < total
    assert dirty_flags([item.text], index) == [True]  # "any" n-gram
    assert dirty_flags([item.text], index, threshold=0.9) == [False]
    assert dirty_flags([item.text], index, threshold=found / total) == [True]
    path = tmp_path / "ngrams_13.npy"
    index.save(path)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = NgramIndex.load(path, 13)
    assert np.array_equal(loaded.hashes, index.hashes)
    assert np.all(loaded.hashes[1:] > loaded.hashes[:-1])  # sorted, unique
    assert dirty_flags([it.text for it in items], loaded) == dirty_flags(
        [it.text for it in items], index
    )
