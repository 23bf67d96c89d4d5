"""The sharded preparation job (data/job.py) against the single-process streaming pipeline it
replaced: the same shards, counters and source errors for any task size and number of dedup
partitions; its parts (dedup by partition, connected components, file pieces) against their
references. Tasks run in this process here (workers=0); tests/test_data_ray.py runs them on Ray.
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from bench.data_scale import perturbed_copies
from data.components import EDGES, connected_components
from data.dedup import MinHasher, NearDedup, NearDedupConfig
from data.dedup_sharded import ShardedNear
from data.prepare import PrepareError, prepare
from data.shuffle import save_array, write_partitioned
from data.sources import SourceErrors, iter_file, iter_piece, split_file, stdlib_files
from data.tokenizer import load_tokenizer
from tests.data_helpers import (
    assert_prepared_like_streaming,
    planted_corpus,
    small_data_config,
    streaming_reference,
)


def _inline(root: Path):
    """run_stage / task_dir for data/components.py, tasks run here into root/stage/p."""
    def run_stage(name, fn, jobs):
        out = []
        for p, job in enumerate(jobs):
            (root / name / str(p)).mkdir(parents=True)
            out.append(fn(root / name / str(p), *job))
        return out
    return run_stage, lambda name, p: str(root / name / str(p))


def test_sharded_near_dedup_equals_streaming_on_crafted_signatures(seed, tmp_path):
    """Signatures built to share bands with one or two earlier documents (so clusters form and
    bridge): the partitioned decisions and counters equal NearDedup.admit in order, for
    several thresholds, map-task sizes and partition counts."""
    rng = np.random.default_rng(seed)
    hasher = MinHasher(NearDedupConfig())
    sigs: list = []
    for d in range(400):
        sig = rng.integers(0, 2**32, 112, dtype=np.uint64).astype(np.uint32)
        if d and rng.random() < 0.7:
            for parent in rng.choice(d, size=min(d, int(rng.integers(1, 3))), replace=False):
                if sigs[parent] is None:
                    continue
                for band in rng.choice(14, size=int(rng.integers(1, 12)), replace=False):
                    sig[band * 8 : band * 8 + 8] = sigs[parent][0][band * 8 : band * 8 + 8]
        sigs.append(None if rng.random() < 0.03 else (sig, hasher.band_keys(sig)))
    bridged = 0
    for trial, threshold in enumerate([0.0, 0.3, 0.7]):
        stream = NearDedup(NearDedupConfig(verify_threshold=threshold))
        counts: dict = {}
        expected = [stream.admit(s, counts) for s in sigs]
        per_task, parts = int(rng.integers(7, 120)), int(rng.integers(1, 6))
        root = tmp_path / str(trial)
        sharded = ShardedNear(stream)
        map_dirs = []
        for t, lo in enumerate(range(0, len(sigs), per_task)):  # the map tasks' files
            base = root / "map" / str(t)
            base.mkdir(parents=True)
            mine = sigs[lo : lo + per_task]
            rows = [i for i, s in enumerate(mine) if s is not None]
            save_array(base / "near_dedup.rows.npy", np.array(rows, np.int64))
            for key, array in sharded.map_arrays([mine[i] for i in rows]).items():
                save_array(base / f"near_dedup.{key}.npy", array)
            (root / "scatter" / str(t)).mkdir(parents=True)
            sharded.scatter(root / "scatter" / str(t), t, base, np.ones(len(rows), bool), parts)
            map_dirs.append(str(base))
        scatter_dirs = [str(root / "scatter" / str(t)) for t in range(len(map_dirs))]
        reduced = []
        for p in range(parts):
            (root / "reduce" / str(p)).mkdir(parents=True)
            reduced.append(sharded.reduce(root / "reduce" / str(p), p, scatter_dirs, map_dirs,
                                          parts))
        reduce_dirs = [str(root / "reduce" / str(p)) for p in range(parts)]
        components = connected_components(*_inline(root / "cc"), reduce_dirs, parts) if any(
            r["edges"] for r in reduced) else None
        got, got_counts = [], {}
        for t in range(len(map_dirs)):
            decide = sharded.decider(reduce_dirs, t)
            for i, s in enumerate(sigs[t * per_task : (t + 1) * per_task]):
                keep, names = decide(i, s is not None)
                got.append(keep)
                for name in names:
                    got_counts[name] = got_counts.get(name, 0) + 1
        sharded.finish_counts(got_counts, got.count(False), components)
        print(f"threshold {threshold}: {per_task} per task, {parts} partitions: {counts}")
        assert got == expected
        assert got_counts == counts
        bridged += counts.get("bridged_clusters", 0)
    assert bridged > 0  # the crafted copies from two parents did bridge clusters


def test_connected_components_equal_union_find(seed, tmp_path):
    rng = random.Random(seed)
    for trial in range(8):
        nodes = rng.sample(range(1, 2**40), rng.randrange(2, 120))
        if trial % 4 == 0:  # a long chain: the worst case for label propagation
            order = rng.sample(nodes, len(nodes))
            edges = list(zip(order, order[1:]))
        else:
            edges = [tuple(rng.sample(nodes, 2)) for _ in range(rng.randrange(1, 2 * len(nodes)))]
        parent = {x: x for e in edges for x in e}

        def find(x, parent=parent):
            while parent[x] != x:
                x = parent[x]
            return x

        for a, b in edges:
            parent[find(a)] = find(b)
        sizes: dict = {}
        for x in parent:
            sizes[find(x)] = sizes.get(find(x), 0) + 1
        parts = rng.randrange(1, 6)
        e = np.array(edges, np.uint64)
        both = np.concatenate([e, e[:, ::-1]])
        src = tmp_path / str(trial) / "src"
        src.mkdir(parents=True)
        write_partitioned(src / EDGES, both, both[:, 0], parts)
        got = connected_components(*_inline(tmp_path / str(trial)), [str(src)], parts)
        assert (got["components"], got["nodes"], got["largest"]) == (
            len(sizes), len(parent), max(sizes.values()))


def test_pieces_read_like_the_whole_file(seed, tmp_path):
    """jsonl cut at line boundaries, parquet at row groups: the pieces in order give the
    file's documents, line / row numbers and errors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    lines = [rng.choice(["", "{broken", json.dumps({"body": 1}), json.dumps({"text": f"d{i}"})])
             for i in range(rng.randrange(1, 60))]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + rng.choice(["", "\n"]))
    texts = [f"row {i}" if rng.random() < 0.9 else None for i in range(rng.randrange(1, 80))]
    pq.write_table(pa.table({"text": texts}), tmp_path / "b.parquet", row_group_size=7)
    for name in ("a.jsonl", "b.parquet"):
        path = str(tmp_path / name)
        whole = SourceErrors()
        expected = [(d.text, d.line) for d in iter_file(path, whole)]
        for per_piece in (1, 3, 10, 1000):
            errors = SourceErrors()
            pieces = split_file(path, per_piece)
            got = [(d.text, d.line) for p in pieces for d in iter_piece(p, errors)]
            assert got == expected and errors.entries == whole.entries, (name, per_piece)
            assert name.endswith("parquet") or all(p.docs <= per_piece for p in pieces)


@pytest.mark.parametrize("corpus", ["planted", "stdlib"])
def test_job_equals_streaming_for_any_task_size_and_partitions(corpus, seed, tmp_path):
    """Shards, counters and source errors equal the streaming single-process pipeline's, for
    random docs_per_task, dedup_partitions and data.max_bytes cut points."""
    rng = random.Random(seed)
    if corpus == "planted":
        sources, _ = planted_corpus(tmp_path, rng)
        cfg = small_data_config(tmp_path, sources, workers=0, shard_tokens=2000)
        cfg.max_bytes = rng.choice([0, rng.randrange(25000, 70000)])
    else:  # a slice of the standard library and three perturbed copies of it
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [f for f in stdlib_files() if f.stat().st_size < 20000][:: 40][:30]
        perturbed_copies(files, root, tmp_path / "corpus", copies=4, seed=seed)
        (tmp_path / "bench.jsonl").write_text(  # a benchmark item pasted into the corpus
            json.dumps({"text": " ".join(files[3].read_text().split()[20:60])}) + "\n")
        cfg = small_data_config(tmp_path, [str(tmp_path / "corpus")], workers=0,
                                shard_tokens=20000, val_fraction=0.05)
    cfg.docs_per_task = rng.randrange(1, 40)
    cfg.dedup_partitions = rng.randrange(1, 6)
    print(f"docs_per_task {cfg.docs_per_task}, dedup_partitions {cfg.dedup_partitions}, "
          f"max_bytes {cfg.max_bytes}")
    manifest = prepare(cfg, progress=False)
    path = Path(cfg.path)
    reference = streaming_reference(cfg, load_tokenizer(path / "tokenizer.tiktoken"))
    assert_prepared_like_streaming(path, reference)
    assert not (path / "tasks").exists()  # intermediate files removed once done
    removed = {k: v["removed"] for k, v in manifest["stages"].items()}
    print(removed)
    if not cfg.max_bytes:  # the planted duplicates come last: a cut may leave them out
        assert removed["exact_dedup"] > 0 and removed["near_dedup"] > 0


def test_finished_tasks_of_other_settings_stop_the_rerun(tmp_path):
    """A job stopped after some tasks (here a dry run, which leaves them all): a rerun with other
    output settings stops at prepare.json (naming the field), one with another way of cutting
    the work at tasks/job.json (naming it); --overwrite starts clean; the same settings resume."""
    rng = random.Random(0)
    sources, _ = planted_corpus(tmp_path, rng)
    cfg = small_data_config(tmp_path, sources, workers=0)
    prepare(cfg, dry_run=True, progress=False)  # leaves its finished tasks in data.path/tasks
    path = Path(cfg.path)
    assert (path / "tasks" / "finish").is_dir()
    recorded = json.loads((path / "prepare.json").read_text())["settings"]
    assert json.loads((path / "tasks" / "job.json").read_text())["fingerprint"] == recorded
    cfg.near_dedup.verify_threshold = 0.5
    with pytest.raises(PrepareError, match=r"data\.near_dedup\.verify_threshold: 0\.7 -> 0\.5"):
        prepare(cfg, progress=False)
    cfg.near_dedup.verify_threshold = 0.7
    cfg.docs_per_task = 3
    with pytest.raises(PrepareError, match=r"other settings \(docs_per_task\)"):
        prepare(cfg, progress=False)
    cfg.near_dedup.verify_threshold = 0.5
    manifest = prepare(cfg, progress=False, overwrite=True)  # deletes tasks/ and prepare.json
    assert manifest["fingerprint"]["data.near_dedup.verify_threshold"] == 0.5
    assert not (path / "tasks").exists()
    cfg.near_dedup.verify_threshold, cfg.docs_per_task = 0.7, 1000
    prepare(cfg, dry_run=True, progress=False, overwrite=True)
    prepare(cfg, progress=False)  # the same settings resume the finished tasks
    log = json.loads((path / "prepare_log.json").read_text())["tasks"]
    assert log["map"]["ran"] == 0 and log["finish"]["ran"] == 0 and log["tokenize"]["ran"] > 0
    reference = streaming_reference(cfg, load_tokenizer(path / "tokenizer.tiktoken"))
    assert_prepared_like_streaming(path, reference)
