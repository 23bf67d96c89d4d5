"""The preparation job: sources -> cleaning stages -> dedup by partition -> token shards, as
resumable tasks on an executor (data/executor.py: local processes or a Ray cluster).

Stages of tasks, in order (task k of stage S leaves data.path/tasks/S/k/, its done marker):

  index      one per jsonl / parquet file: cut it into pieces of <= docs_per_task documents
  map        one per run of pieces holding <= docs_per_task documents: read them, run the
             cleaning stages up to the last global (dedup) one, store texts and signatures
  scatter_G  for each global stage G in order, one per map task: route G's signatures of the
             documents still in to `dedup_partitions` partitions
  reduce_G   one per partition: G's decisions (data/dedup_sharded.py); for near_dedup then
             rounds of connected components over the duplicate graph (data/components.py)
  finish     one per map task: apply the decisions, run the stages after the last global one
             on the kept documents only, count, store the kept texts
  tokenize   one per shard: tokenize its documents (end-of-text after each), write the shard

Documents are numbered in corpus order (map task, index in it), so every decision and every
shard is that of the streaming pipeline (data/pipeline.py) on one core: the output does not
depend on the executor, the number of workers, docs_per_task or dedup_partitions. The driver
holds per-task summaries only (counts, one task's document lengths at a time), so its memory
does not grow with the corpus either; each task's memory is bounded by docs_per_task (map,
finish), documents / dedup_partitions (reduce) or one shard (tokenize).

Train / validation split and shard contents are those of the streaming path: the k-th kept
document goes to validation when floor((k+1) f) > floor(k f), and a shard closes when its
documents reach shard_tokens * 4 characters (the driver scans the kept documents' lengths,
task by task, to cut them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import write_json
from common.errors import PretrainError, read_json
from data.components import connected_components
from data.dedup_sharded import sharded
from data.executor import Executor
from data.pipeline import Pipeline, StageStats, build_pipeline
from data.shards import read_header, token_dtype, write_shard
from data.shuffle import save_array
from data.sources import Document, Piece, SourceErrors, expand_source, iter_piece, split_file
from data.tasks import TaskRunner
from data.tokenizer import TokenizerLike, load_tokenizer

BYTES_PER_TOKEN_GUESS = 4  # only sizes the shards: a shard holds whatever its documents give
TASKS_DIR = "tasks"
# Settings that change how the work runs, not what it produces: not part of the manifest's
# "settings" (so local and Ray runs write the same manifest).
EXECUTION_FIELDS = ("workers", "executor", "ray_address", "task_retries", "docs_per_task",
                    "dedup_partitions")


class PrepareError(PretrainError, RuntimeError):
    """data.prepare cannot go on (no documents, settings that differ from the data dir's)."""


def output_settings(cfg: Any) -> dict:
    """The data settings the output depends on (the manifest's "settings")."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_FIELDS}


@dataclass
class JobResult:
    counts: dict  # per split: documents, chars, tokens, shards
    pipeline: Pipeline  # with the counters of the whole corpus
    errors: SourceErrors
    log: dict = field(default_factory=dict)  # per stage: tasks, skipped, seconds, memory


# --- tasks (run in workers: fn(tmp, *args), see data/tasks.py) --------------------------------


class _PositionedErrors(SourceErrors):
    """SourceErrors that remember how many documents preceded each error (for data.max_bytes,
    which keeps the errors met before the first document left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.position = 0
        self.positions: list[int] = []

    def add(self, file: str, line: int | None, reason: str) -> None:
        self.positions.append(self.position)
        super().add(file, line, reason)


@contextmanager
def _working_dir(path: str) -> Iterator[None]:
    """Relative source paths mean the driver's working directory (reported as given)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


_STAGES: dict[tuple, list] = {}


def setup_task(tmp: Path, cfg: Any, cwd: str) -> list[str]:
    """Build the cleaning stages (the benchmark index of decontaminate among them) into
    stages.pkl, which every task loads once per process. An ordinary task: what building
    takes (~70 MB for the default benchmarks) is the same peak as a worker's map tasks reach,
    and a process of its own cost every job a fresh worker's start (1.5-1.9 s on 2 cores)."""
    with _working_dir(cwd):  # benchmark paths are relative to the driver's directory
        pipeline = build_pipeline(cfg)
    (tmp / "stages.pkl").write_bytes(pickle.dumps(pipeline.stages, protocol=5))
    return pipeline.names


def _stages(path: str) -> list:
    """The stages in `path` (a setup task's stages.pkl), loaded once per process."""
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _STAGES:
        _STAGES.clear()
        _STAGES[key] = pickle.loads(Path(path).read_bytes())
    return _STAGES[key]


def index_task(tmp: Path, path: str, docs_per_task: int, cwd: str) -> list[dict]:
    with _working_dir(cwd):
        return [dataclasses.asdict(p) for p in split_file(path, docs_per_task)]


def map_task(tmp: Path, stages: str, pieces: list[dict], text_field: str, head: int,
             cwd: str) -> dict:
    """Read the pieces, run stages [0, head) on each document; store per document its record
    (docs.pkl) and per global stage the signatures of the documents that reached it."""
    pipe = Pipeline(_stages(stages))
    errors = _PositionedErrors()
    global_stages = [i for i in range(head) if pipe.is_global(i)]
    sigs: dict[int, list] = {i: [] for i in global_stages}
    rows: dict[int, list[int]] = {i: [] for i in global_stages}
    docs = []
    with _working_dir(cwd):
        for piece in pieces:
            for doc in iter_piece(Piece(**piece), errors, text_field):
                text, steps = pipe.record(doc, 0, head)
                for i in (i for i in global_stages if i < len(steps)):
                    sig, dt = steps[i]
                    if sig is not None:  # near_dedup: None for a text without words
                        sigs[i].append(sig)
                        rows[i].append(len(docs))
                    steps[i] = (sig is not None, dt)
                docs.append((len(doc.text), doc.source, doc.line, text, steps))
                errors.position = len(docs)
    (tmp / "docs.pkl").write_bytes(pickle.dumps(docs, protocol=5))  # tmp: committed whole
    save_array(tmp / "chars.npy", np.array([d[0] for d in docs], np.int64))
    save_array(tmp / "errors.npy", np.array(errors.positions, np.int64))
    for i in global_stages:
        name = pipe.stages[i].name
        save_array(tmp / f"{name}.rows.npy", np.array(rows[i], np.int64))
        for key, array in sharded(pipe.stages[i]).map_arrays(sigs[i]).items():
            save_array(tmp / f"{name}.{key}.npy", array)
    return {"docs": len(docs), "chars": int(sum(d[0] for d in docs)), "errors": errors.count,
            "error_entries": [[*e, pos] for e, pos in zip(errors.entries, errors.positions)]}


def scatter_task(tmp: Path, stages_path: str, task: int, limit: int, s: int, map_dir: str,
                 earlier: list[tuple[int, list[str]]], partitions: int) -> dict:
    """Route global stage s's signatures of task `task`'s documents that are still in."""
    stages = _stages(stages_path)
    base = Path(map_dir)
    rows = np.load(base / f"{stages[s].name}.rows.npy")
    keep = rows < limit
    for e, reduce_dirs in earlier:  # a document an earlier global stage removed is out
        decide = sharded(stages[e]).decider(reduce_dirs, task)
        had_sig = set(np.load(base / f"{stages[e].name}.rows.npy").tolist())
        keep &= np.array([decide(i, i in had_sig)[0] for i in rows.tolist()], bool)
    sharded(stages[s]).scatter(tmp, task, base, keep, partitions)
    return {"entries": int(keep.sum())}


def reduce_task(tmp: Path, stages: str, s: int, p: int, inputs: list[str],
                map_dirs: list[str], partitions: int) -> dict:
    return sharded(_stages(stages)[s]).reduce(tmp, p, inputs, map_dirs, partitions)


def finish_task(tmp: Path, stages: str, task: int, limit: int, map_dir: str,
                decisions: list[tuple[int, list[str]]], head: int) -> dict:
    """The task's documents in order: the global stages' decisions, the stages after the last
    global one on the kept documents, the counters; store the kept texts (kept.bin)."""
    pipe = Pipeline(_stages(stages))
    docs = pickle.loads((Path(map_dir) / "docs.pkl").read_bytes())[:limit]
    deciders = {s: sharded(pipe.stages[s]).decider(dirs, task) for s, dirs in decisions}

    def admit(stage: Any, decision: tuple[bool, tuple[str, ...]], counts: dict) -> bool:
        keep, names = decision
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        return keep

    kept: list[bytes] = []
    kept_chars: list[int] = []
    for local, (chars, source, line, text, steps) in enumerate(docs):
        alive = text is not None
        for i in deciders:
            if i < len(steps):
                has_sig, dt = steps[i]
                steps[i] = (deciders[i](local, has_sig), dt)
                alive = alive and steps[i][0][0]
        if alive and head < len(pipe.stages):
            text, tail = pipe.record(Document(text, source, line), head)
            steps += tail
        out = pipe.apply(chars, (text if alive else None, steps), admit)
        if out is not None:
            kept.append(out.encode("utf-8", "surrogatepass"))
            kept_chars.append(len(out))
    offsets = np.zeros(len(kept) + 1, np.int64)
    np.cumsum([len(b) for b in kept], out=offsets[1:])
    (tmp / "kept.bin").write_bytes(b"".join(kept))
    save_array(tmp / "kept.offsets.npy", offsets)
    save_array(tmp / "kept.chars.npy", np.array(kept_chars, np.int64))
    return {"kept": len(kept), "stats": [dataclasses.asdict(st) for st in pipe.stats]}


def val_mask(k: np.ndarray, fraction: float) -> np.ndarray:
    """Kept document k goes to validation when floor((k+1) f) > floor(k f)."""
    k = k.astype(np.float64)
    return np.floor((k + 1) * fraction) > np.floor(k * fraction)


def read_kept(finish_dir: str, lo: int, hi: int) -> list[str]:
    """Kept texts [lo, hi) of a finish task."""
    offsets = np.load(Path(finish_dir) / "kept.offsets.npy")
    with open(Path(finish_dir) / "kept.bin", "rb") as f:
        f.seek(int(offsets[lo]))
        blob = f.read(int(offsets[hi] - offsets[lo]))
    cuts = (offsets[lo : hi + 1] - offsets[lo]).tolist()
    return [blob[a:b].decode("utf-8", "surrogatepass") for a, b in zip(cuts, cuts[1:])]


_TOKENIZERS: dict[tuple, TokenizerLike] = {}


def _tokenizer(spec: str) -> TokenizerLike:
    """The tokenizer `spec`, loaded once per process; a file's (a trained BPE, a .tiktoken) is
    reloaded when the file changed (a rerun with --overwrite trains a new one at that path)."""
    try:
        stat = os.stat(spec)
        key: tuple = (spec, stat.st_mtime_ns, stat.st_size)
    except OSError:  # a tiktoken name, hf:DIR
        key = (spec,)
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = load_tokenizer(spec)
    return _TOKENIZERS[key]
_BATCH_CHARS = 1 << 20  # tokenize ~1 MB at a time: a shard's ids never sit in Python lists


def tokenize_task(tmp: Path, shard: str, split: str, ranges: list[tuple[str, int, int, int]],
                  spec: str, fraction: float) -> dict:
    """Tokenize the documents of `split` in each (finish dir, lo, hi, k0) range (k0: the kept
    index of the finish task's first document) into the shard file `shard`: each document is
    the tokenizer's `bos_ids` (Llama 3's <|begin_of_text|>; none for ours, whose end-of-text
    already precedes every document but the first), its text, and end-of-text."""
    tok = _tokenizer(spec)
    dtype = token_dtype(tok.n_vocab)
    bos = [] if tok.bos_ids == [tok.eot_id] else list(tok.bos_ids)
    if Path(shard).exists():  # written (atomically) by a run killed before this task's marker
        return {"tokens": read_header(shard)["num_tokens"]}
    parts: list[np.ndarray] = []

    def flush(batch: list[str]) -> None:
        # One document at a time in this thread: encode_batch would start a thread per call,
        # and each thread's malloc arena keeps its memory in this (long-lived) worker.
        ids = [bos + tok.encode(text) + [tok.eot_id] for text in batch]
        tokens = np.empty(sum(len(d) for d in ids), dtype=dtype)
        pos = 0
        for doc in ids:
            tokens[pos : pos + len(doc)] = doc
            pos += len(doc)
        parts.append(tokens)

    batch, size = [], 0
    for finish_dir, lo, hi, k0 in ranges:
        texts = read_kept(finish_dir, lo, hi)
        is_val = val_mask(np.arange(k0 + lo, k0 + hi), fraction)
        for text, val in zip(texts, is_val.tolist()):
            if val == (split == "val"):
                batch.append(text)
                size += len(text)
                if size >= _BATCH_CHARS:
                    flush(batch)
                    batch, size = [], 0
    if batch:
        flush(batch)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    write_shard(shard, tokens, tok.n_vocab)
    return {"tokens": len(tokens)}


# --- the driver --------------------------------------------------------------------------------


def _check_job(root: Path, cfg: Any, fingerprint: dict) -> None:
    """tasks/job.json names what the finished tasks were made with: data.prepare's settings
    fingerprint (prepare.json) and how the work was cut; another job stops."""
    ident = json.loads(json.dumps({
        "format": 2, "fingerprint": fingerprint, "docs_per_task": cfg.docs_per_task,
        "dedup_partitions": cfg.dedup_partitions,
    }))
    path = root / "job.json"
    if not path.exists():
        write_json(path, ident)
        return
    old = read_json(path, "the finished tasks' settings (a JSON object)")
    if not isinstance(old, dict):
        old = {}
    if old != ident:
        keys = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
        if "fingerprint" in keys:
            keys.remove("fingerprint")
            a, b = old.get("fingerprint") or {}, ident["fingerprint"]
            keys += sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise PrepareError(
            f"{root} holds the finished tasks of a preparation with other settings "
            f"({', '.join(keys)}); rerun with those settings, or with --overwrite to start clean"
        )


def _plan(files: list[str], pieces_of: dict[str, list[dict]], docs_per_task: int) -> list[list]:
    """Consecutive pieces grouped into map tasks of at most docs_per_task documents."""
    tasks: list[list[dict]] = []
    current: list[dict] = []
    n = 0
    for path in files:
        for piece in pieces_of.get(path) or [dataclasses.asdict(Piece(path))]:
            if current and n + piece["docs"] > docs_per_task:
                tasks.append(current)
                current, n = [], 0
            current.append(piece)
            n += piece["docs"]
    if current:
        tasks.append(current)
    return tasks


def _cutoff(maps: list[dict | None], chars_of: Any, max_bytes: int) -> tuple[int, int] | None:
    """(task, index) of the first document data.max_bytes leaves out (the streaming reader
    stops before a document once `max_bytes` characters were read), None if none; raises
    LookupError while the map tasks done so far do not tell."""
    if not max_bytes:
        return None
    seen = 0
    for t, result in enumerate(maps):
        if result is None:
            raise LookupError(t)
        if result["docs"] and seen + result["chars"] >= max_bytes:
            chars = chars_of(t)
            before = seen + np.cumsum(chars) - chars  # characters read before each document
            inside = np.flatnonzero(before >= max_bytes)
            if len(inside):
                return t, int(inside[0])
        seen += result["chars"]
    return None


def _units(kept_chars: Iterator[np.ndarray], cfg: Any, counts: dict) -> dict[str, list]:
    """Cut the kept documents (their lengths, one map task at a time, in order) into shards:
    per split a list of shards, each a list of (task, lo, hi, k0) ranges: kept documents
    [lo, hi) of the map task (those of the split), k0 the kept index of its first one."""
    unit_chars = cfg.shard_tokens * BYTES_PER_TOKEN_GUESS
    units: dict[str, list] = {"train": [], "val": []}
    current: dict[str, list] = {"train": [], "val": []}
    size = {"train": 0, "val": 0}
    k0 = 0
    for t, chars in enumerate(kept_chars):
        is_val = val_mask(np.arange(k0, k0 + len(chars)), cfg.val_fraction)
        for split, mask in (("train", ~is_val), ("val", is_val)):
            idx = np.flatnonzero(mask)
            if not len(idx):
                continue
            cum = np.cumsum(chars[idx])
            counts[split]["documents"] += len(idx)
            counts[split]["chars"] += int(cum[-1])
            base = 0  # first position of idx not yet in a closed shard
            while base < len(idx):
                prev = int(cum[base - 1]) if base else 0
                # The first document at which the open shard reaches unit_chars closes it.
                j = int(np.searchsorted(cum, unit_chars - size[split] + prev, side="left"))
                end = min(j, len(idx) - 1)
                current[split].append((t, int(idx[base]), int(idx[end]) + 1, k0))
                if j >= len(idx):
                    size[split] += int(cum[-1]) - prev
                    break
                units[split].append(current[split])
                current[split], size[split], base = [], 0, j + 1
        k0 += len(chars)
    for split in ("train", "val"):
        if current[split]:
            units[split].append(current[split])
    return units


def run_job(cfg: Any, out: Path, tokenizer_spec: str, executor: Executor, fingerprint: dict,
            dry_run: bool = False, progress: bool = True) -> JobResult:
    """Prepare `out` from `cfg` (a DataConfig) on `executor`; resumes from out/tasks/, whose
    tasks must have been made with `fingerprint` (data.prepare.fingerprint(cfg))."""
    if cfg.docs_per_task < 1 or cfg.dedup_partitions < 1:
        raise PrepareError(f"data.docs_per_task and data.dedup_partitions must be >= 1, got "
                           f"{cfg.docs_per_task} and {cfg.dedup_partitions}")
    out = Path(out).resolve()
    root = out / TASKS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _check_job(root, cfg, fingerprint)
    runner = TaskRunner(root, executor, progress)
    cwd, parts = os.getcwd(), cfg.dedup_partitions
    runner.run("setup", setup_task, [(cfg, cwd)])
    stages = str(runner.dir("setup", 0) / "stages.pkl")
    pipeline = Pipeline(_stages(stages))
    global_stages = [i for i in range(len(pipeline.stages)) if pipeline.is_global(i)]
    # The stages after the last global one run in `finish`, on the kept documents only.
    head = global_stages[-1] + 1 if global_stages else 0

    # Read: cut big files into pieces, group pieces into map tasks, run them (with
    # max_bytes, only until the tasks done so far cover it).
    files = [path for spec in cfg.sources for path in expand_source(spec)]
    big = sorted({f for f in files if Path(f).suffix in (".jsonl", ".parquet")})
    indexed = runner.run("index", index_task, [(f, cfg.docs_per_task, cwd) for f in big])
    tasks = _plan(files, dict(zip(big, indexed)), cfg.docs_per_task)
    map_dirs = [str(runner.dir("map", t)) for t in range(len(tasks))]
    chars_of = lambda t: np.load(Path(map_dirs[t]) / "chars.npy")  # noqa: E731

    def covered(results: list) -> bool:
        try:
            return _cutoff(results, chars_of, cfg.max_bytes) is not None
        except LookupError:
            return False

    maps = runner.run("map", map_task, [(stages, p, cfg.text_field, head, cwd) for p in tasks],
                      until=covered if cfg.max_bytes else None)
    cut = _cutoff(maps, chars_of, cfg.max_bytes)
    used = cut[0] + 1 if cut else len(tasks)
    limits = [maps[t]["docs"] for t in range(used)]
    if cut:
        limits[-1] = cut[1]
    errors = SourceErrors()
    for t in range(used):
        positions = np.load(Path(map_dirs[t]) / "errors.npy")
        in_range = positions <= limits[t] if cut and t == used - 1 else positions >= 0
        errors.count += int(in_range.sum())
        for *entry, pos in maps[t]["error_entries"]:
            if (not cut or t < used - 1 or pos <= limits[t]) and len(errors.entries) < 1000:
                errors.entries.append(tuple(entry))
    map_dirs = map_dirs[:used]

    # Global stages, one after the other: each sees only the documents the earlier ones kept.
    decisions: list[tuple[int, list[str]]] = []
    components: dict[int, dict | None] = {}
    for s in global_stages:
        name = pipeline.stages[s].name
        runner.run(f"scatter_{name}", scatter_task,
                   [(stages, t, limits[t], s, map_dirs[t], list(decisions), parts)
                    for t in range(used)])
        scatter_dirs = [str(runner.dir(f"scatter_{name}", t)) for t in range(used)]
        reduced = runner.run(f"reduce_{name}", reduce_task,
                             [(stages, s, p, scatter_dirs, map_dirs, parts) for p in range(parts)])
        reduce_dirs = [str(runner.dir(f"reduce_{name}", p)) for p in range(parts)]
        if any(r.get("edges") for r in reduced):  # near_dedup: clusters of duplicates
            components[s] = connected_components(
                lambda stage, fn, jobs, name=name: runner.run(f"{name}_{stage}", fn, jobs),
                lambda stage, p, name=name: str(runner.dir(f"{name}_{stage}", p)),
                reduce_dirs, parts)
        decisions.append((s, reduce_dirs))

    finished = runner.run("finish", finish_task,
                          [(stages, t, limits[t], map_dirs[t], decisions, head)
                           for t in range(used)])
    for result in finished:
        for stats, part in zip(pipeline.stats, result["stats"]):
            stats.add(part)
    for s in global_stages:
        stats: StageStats = pipeline.stats[s]
        sharded(pipeline.stages[s]).finish_counts(stats.counts, stats.removed, components.get(s))

    counts = {s: {"documents": 0, "chars": 0, "tokens": 0, "shards": []} for s in ("train", "val")}
    finish_dirs = [str(runner.dir("finish", t)) for t in range(used)]
    units = _units((np.load(Path(d) / "kept.chars.npy") for d in finish_dirs), cfg, counts)
    if not dry_run:
        jobs, keys = [], []
        for split in ("train", "val"):
            for index, ranges in enumerate(units[split]):
                name = f"{split}_{index:06d}"
                ranges = [(finish_dirs[t], lo, hi, k0) for t, lo, hi, k0 in ranges]
                jobs.append((str(out / f"{name}.bin"), split, ranges, tokenizer_spec,
                             cfg.val_fraction))
                keys.append(name)
        runner.run("tokenize", tokenize_task, jobs, keys=keys)
        for name in keys:
            split = name.split("_")[0]
            n = read_header(out / f"{name}.bin")["num_tokens"]
            counts[split]["tokens"] += n
            counts[split]["shards"].append({"file": f"{name}.bin", "tokens": n})
    return JobResult(counts, pipeline, errors, runner.log)
