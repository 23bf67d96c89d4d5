"""The glitch-token audit (python -m eval.glitch_tokens) on a planted case: a BPE trained on
corpus A, a model trained through data.prepare and train.py on corpus B = A without some of A's
frequent words. The tokens only those words used must top the audit's suspects, and the model's
weights must show it: their embedding rows never moved from initialization."""

from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest
import torch

from data.prepare import prepare
from data.sources import stdlib_files
from data.tokenizer import train_bpe
from eval.glitch_tokens import auc_below, main, token_kinds
from job_config import DataConfig
from model.load import load_model
from model.transformer import build_model
from tests.helpers import run_train, tiny_overrides

FILES = ["argparse.py", "dataclasses.py", "functools.py", "inspect.py", "pathlib.py", "typing.py",
         "enum.py", "textwrap.py"]
VOCAB = 1024


def corpus_a() -> list[str]:
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files() if p.name in FILES]
    assert len(texts) >= len(FILES) - 1, "standard library sources missing"
    return texts


def test_planted_glitch_tokens_top_the_audit(tmp_path, seed):
    a = corpus_a()
    tok = train_bpe(a, VOCAB, tmp_path / "a.tiktoken")
    # Among A's frequent one-token words, those whose token only they use (it vanishes when
    # they are cut out): 20 of them drawn at random; B lacks every occurrence of those.
    freq = collections.Counter(w for t in a for w in re.findall(r"[A-Za-z]+", t))
    frequent = [w for w, _ in freq.most_common(300) if len(w) >= 4 and len(tok.encode(" " + w)) == 1]
    used_a = collections.Counter(i for t in a for i in tok.encode(t))

    def cut(words: list[str]) -> list[str]:
        # Cut where the tokenizer's split regex cuts: at the ends of a run of letters.
        pattern = re.compile(r"(?<![A-Za-z])(" + "|".join(words) + r")(?![A-Za-z])")
        return [pattern.sub("", t) for t in a]

    left = collections.Counter(i for t in cut(frequent[5:]) for i in tok.encode(t))
    own = [w for w in frequent[5:] if left[tok.encode(" " + w)[0]] == 0]
    removed = [str(w) for w in np.random.default_rng(seed).choice(own, size=20, replace=False)]
    b = cut(removed)
    used_b = collections.Counter(i for t in b for i in tok.encode(t))
    planted = {i for i in used_a if used_b[i] == 0}  # the ids that only A's removed words used
    assert len(planted) >= 15, (removed, planted)
    print(f"removed {removed}\nplanted {sorted(tok.decode([i]) for i in planted)}")

    source = tmp_path / "b.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in b))
    data = tmp_path / "data"
    prepare(DataConfig(path=str(data), sources=[str(source)], tokenizer=str(tmp_path / "a.tiktoken"),
                       stages=[], val_fraction=0.2, shard_tokens=50_000, workers=1))
    run = tmp_path / "run"
    steps = 60
    run_train(tiny_overrides(data, run, **{"model.vocab_size": VOCAB, "train.steps": steps,
                                           "train.seed": seed, "checkpoint.every": steps,
                                           "train.val_every": steps}))
    main(["--run", str(run), "--device", "cpu", "--top", "50"])
    report = json.loads((run / "glitch_tokens.json").read_text())

    top = {r["id"] for r in report["suspects"][:50]}
    recall = len(planted & top) / len(planted)
    print(f"recall at 50: {recall:.2f}; summary {report['summary']}")
    assert recall >= 0.8
    assert all(r["count"] == 0 for r in report["suspects"] if r["id"] in planted)

    # The weights tell the same story. Never-seen embedding rows are exactly their initial
    # values (no gradient, no weight decay on embeddings); every common row has moved.
    model, cfg, _ = load_model(run, "cpu")
    init = build_model(cfg.model, "cpu", seed=seed).embed.weight
    ids = torch.tensor(sorted(planted))
    assert torch.equal(model.embed.weight[ids], init[ids])
    common = torch.tensor([r["id"] for r in report["common"]])
    assert not torch.isclose(model.embed.weight[common], init[common]).all(dim=1).any()
    s = report["summary"]
    # Initial rows are smaller than trained ones: every never-seen norm below every common one.
    assert s["embedding_norm"]["auc_never_below_common"] > 0.95
    # Their unembedding rows are pushed down at every position, all the same way: larger rows
    # (AUC near 0), aligned with each other (Land & Bartolo's indicator).
    assert s["unembedding_norm"]["auc_never_below_common"] < 0.05
    assert s["indicator"]["never_seen_median"] > s["indicator"]["common_median"] + 0.3
    # Asked to repeat them, the model gives them far less probability than common tokens.
    lp = s["repeat_logprob_median"]
    assert lp["suspects"] < lp["common"] - 1.0


def test_auc_below_against_a_direct_count(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=40).round(1), rng.normal(0.5, size=60).round(1)  # ties on purpose
    pairs = [(a < b) + 0.5 * (a == b) for a in x for b in y]
    assert auc_below(x, y) == pytest.approx(np.mean(pairs))


def test_token_kinds_tell_words_from_bytes_and_fragments():
    tok = train_bpe(["naïve café " * 50, "日本語 " * 50, "plain words here " * 50], 300)
    strings, kinds = token_kinds(tok, tok.n_vocab)
    assert kinds[ord("a")] == "byte" and kinds[0xC3] == "byte"
    assert kinds[tok.eot_id] == "special"
    by_text = dict(zip(strings, kinds))
    assert by_text[" words"] == "word" and by_text["日本語"] == "word"
    # 日 is three bytes: a merge of two of them is no whole character.
    fragments = [s for s, k in zip(strings, kinds) if k == "fragment"]
    assert fragments and all("\\x" in s for s in fragments)
