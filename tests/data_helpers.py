"""The data tests' shared corpus and reference: the planted-case corpus (duplicates, PII,
contamination, junk, bad input), a small DataConfig for it, and what data.prepare must write,
computed the way one process streaming the corpus through the pipeline would (the reference the
sharded job is checked against). English-like text comes from tests/helpers.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data.decontaminate import DecontamConfig
from data.tokenizer import Tokenizer
from job_config import DataConfig
from tests.helpers import prose


def planted_corpus(tmp: Path, rng: random.Random) -> tuple[list[str], dict]:
    """Source files with planted duplicates, PII, contamination, junk and bad input."""
    bench_items = [prose(rng, 40) for _ in range(5)]
    (tmp / "bench.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in bench_items))
    plan = {"exact": 3, "near": 2, "email": 2, "phone": 1, "contaminated": 2, "junk": 2}
    docs = [prose(rng, 300) for _ in range(30)]
    records = list(docs)
    records += [docs[1], docs[5], docs[9]]  # exact duplicates
    for i in (2, 6):  # near duplicates: 2 words of 300 changed (Jaccard ~0.94)
        words = docs[i].split()
        words[100], words[200] = "changed", "edited"
        records.append(" ".join(words))
    records[10] += " Write to jane.roe@gmail.com or call 415-555-0132."
    records[11] += " Or bob.smith@yahoo.co.uk."
    for i in (12, 13):  # a benchmark item pasted in the middle
        records[i] = records[i][:800] + " " + bench_items[i - 10] + " " + records[i][800:]
    records += ["buy now " * 3, "click here"]  # junk: too few words for the prose rules
    rng.shuffle(records[30:])
    lines = [json.dumps({"text": t}) for t in records]
    lines.insert(4, "{not json")  # bad input: counted with its line number
    lines.insert(9, json.dumps({"body": "no text field"}))
    (tmp / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # invalid UTF-8
    return [str(tmp / "corpus.jsonl"), str(tmp / "latin1.txt")], plan


def small_data_config(tmp: Path, sources: list[str], **overrides) -> DataConfig:
    cfg = DataConfig(
        path=str(tmp / "prepared"),
        sources=sources,
        tokenizer="train",
        vocab_size=300,
        val_fraction=0.1,
        shard_tokens=5000,
        workers=1,
        decontaminate=DecontamConfig(benchmarks=[f"toy={tmp / 'bench.jsonl'}"], ngram=13),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def streaming_reference(cfg: DataConfig, tokenizer: Tokenizer) -> dict:
    """What data.prepare must write for `cfg`, computed the way it was before the sharded job:
    one process streams the corpus through `Pipeline.run` (dedup state held in this process),
    splits the kept documents by position and cuts shards of shard_tokens * 4 characters.
    -> {"shards": {file name: tokens}, "stages": counters (no seconds), "source_errors"}."""
    import numpy as np

    from data.pipeline import build_pipeline
    from data.prepare import iter_corpus
    from data.sources import SourceErrors

    errors = SourceErrors()
    pipe = build_pipeline(cfg)
    unit_chars, f = cfg.shard_tokens * 4, cfg.val_fraction
    pending: dict[str, list[str]] = {"train": [], "val": []}
    shards: dict[str, np.ndarray] = {}

    def close(split: str) -> None:
        bos = [] if tokenizer.bos_ids == [tokenizer.eot_id] else list(tokenizer.bos_ids)
        ids = [bos + tokenizer.encode(t) + [tokenizer.eot_id] for t in pending[split]]
        index = sum(name.startswith(split) for name in shards)
        shards[f"{split}_{index:06d}.bin"] = np.array([i for d in ids for i in d], np.int64)
        pending[split] = []

    for k, (text, _) in enumerate(pipe.run(iter_corpus(cfg, errors))):
        split = "val" if int((k + 1) * f) > int(k * f) else "train"
        pending[split].append(text)
        if sum(map(len, pending[split])) >= unit_chars:
            close(split)
    for split in ("train", "val"):
        if pending[split]:
            close(split)
    stages = {name: {k: v for k, v in st.items() if k != "seconds"}
              for name, st in pipe.stats_dict().items()}
    return {"shards": shards, "stages": stages,
            "source_errors": {"count": errors.count, "first": errors.summary()[:100]}}


def assert_prepared_like_streaming(path: Path, reference: dict) -> None:
    """The prepared directory `path` holds exactly the streaming reference's shards, counters
    and source errors."""
    import numpy as np

    from data.shards import read_shard

    manifest = json.loads((path / "manifest.json").read_text())
    names = sorted(p.name for p in path.glob("*.bin"))
    assert names == sorted(reference["shards"])
    for name in names:
        assert np.array_equal(read_shard(path / name), reference["shards"][name]), name
    assert manifest["stages"] == reference["stages"]
    assert manifest["source_errors"] == reference["source_errors"]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a prepared directory (prepare_log.json: timings, left out)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())
            if p.is_file() and p.name != "prepare_log.json"}
