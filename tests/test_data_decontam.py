"""Decontamination: benchmark items pasted inside training documents are caught, per benchmark;
cut mode removes the span plus the margin, drop mode drops; benchmark files parse."""

from __future__ import annotations

import random

import pytest

from data.decontaminate import (
    BenchmarkError,
    BenchmarkIndex,
    DecontamConfig,
    Decontaminator,
    load_benchmark_texts,
    ngram_size,
)
from data.normalize import ngram_hashes

WORDS = ("alpha beta gamma delta epsilon zeta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega river stone cloud").split()


def filler(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def real(benchmark_dir):
    """HellaSwag and LAMBADA files in their release formats (generated: tests/helpers.py)."""
    hellaswag = benchmark_dir / "hellaswag" / "hellaswag_val_full.txt"
    lambada = benchmark_dir / "lambada" / "lambada_test.jsonl"
    hs = load_benchmark_texts("hellaswag", hellaswag)
    lb = load_benchmark_texts("lambada", lambada)
    cfg = DecontamConfig(benchmarks=[f"hellaswag={hellaswag}", f"lambada={lambada}"])
    return hs, lb, Decontaminator(cfg), hellaswag


def test_benchmark_files_parse(real):
    hs, lb, stage, hellaswag = real
    assert len(hs) == 600 and len(lb) == 600
    # An item's text: the context followed by its gold ending.
    lines = hellaswag.read_text().split("\n")
    assert hs[0] == lines[0] + " " + lines[2 + int(lines[1])]
    info = stage.describe()["benchmarks"]
    assert info["lambada"]["n"] == 13 and info["hellaswag"]["n"] == 13


def test_pasted_items_caught_per_benchmark(real):
    hs, lb, stage, _ = real
    rng = random.Random()
    planted = {"hellaswag": 0, "lambada": 0}
    docs, expect = [], []
    for _ in range(40):
        kind = rng.choice(["hellaswag", "lambada", "clean"])
        body = filler(rng, 150)
        if kind != "clean":
            item = rng.choice(hs if kind == "hellaswag" else lb)
            # Pasted mid-document, with different case and punctuation around it.
            body = f"{filler(rng, 100)}\n\n{item.upper()}!!\n\n{filler(rng, 100)}"
            planted[kind] += 1
        docs.append(body)
        expect.append(kind)
    counts: dict[str, int] = {}
    outs = [stage(d, None, counts) for d in docs]
    assert counts.get("hellaswag", 0) == planted["hellaswag"]
    assert counts.get("lambada", 0) == planted["lambada"]
    for doc, out, kind in zip(docs, outs, expect):
        if kind == "clean":
            assert out == doc
        else:  # the item is gone, each side's words beyond the 200-character margin remain
            assert out is not None and len(out) < len(doc)
            grams = ngram_hashes(out, 13)
            assert len(grams) and not any(ix.contains(grams).any() for ix in stage.indexes)


def test_cut_and_drop_modes_with_a_small_index():
    rng = random.Random()
    item = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"
    index = BenchmarkIndex.build("toy", [item], n=8)
    assert index.n == 8 and index.short_items == 0
    left, right = filler(rng, 120), filler(rng, 120)  # > 200 + 200 characters each
    doc = f"{left} {item} {right}"
    counts: dict[str, int] = {}
    cut = Decontaminator(DecontamConfig(benchmarks=[]), [index])(doc, None, counts)
    # Exactly the item plus 200 characters on each side is removed.
    start = doc.index(item)
    expected = doc[: start - 200] + "\n" + doc[start + len(item) + 200 :]
    assert cut == expected
    n_grams = len(item.split()) - 8 + 1
    assert counts == {"toy": 1, "toy.ngrams": n_grams, "cut_docs": 1, "chars_cut": len(item) + 400}
    counts = {}
    drop = Decontaminator(DecontamConfig(benchmarks=[], mode="drop"), [index])
    assert drop(doc, None, counts) is None and counts["dropped_docs"] == 1
    # 7 words of the item (below n = 8) do not match.
    part = " ".join(item.split()[:7])
    assert drop(f"{left} {part} {right}", None, {}) is not None
    # Too many cuts drop the document.
    many = " ".join(f"{filler(rng, 60)} {item}" for _ in range(12))
    counts = {}
    cutter = Decontaminator(DecontamConfig(benchmarks=[], max_cuts=10), [index])
    assert cutter(many, None, counts) is None and counts["dropped_docs"] == 1


def test_ngram_size_rule():
    short = ["one two three four five six seven eight nine"] * 20  # 9 words
    assert ngram_size(short) == 9
    assert ngram_size(["w " * 40] * 10) == 13
    assert ngram_size(["a b c"] * 10) == 8  # clamped


def test_bad_benchmark_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bench.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(BenchmarkError, match=r"bench.jsonl:2"):
        load_benchmark_texts("x", bad)
    hs = tmp_path / "hellaswag.txt"
    hs.write_text("ctx\n7\na\nb\nc\nd\n")
    with pytest.raises(BenchmarkError, match=r"hellaswag.txt:2: expected a label"):
        load_benchmark_texts("hellaswag", hs)
    with pytest.warns(UserWarning, match="skipped"):
        stage = Decontaminator(DecontamConfig(benchmarks=[f"gone={tmp_path / 'none.jsonl'}"]))
    assert stage.describe()["missing"] == ["gone"]
