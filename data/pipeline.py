"""The cleaning pipeline: an ordered list of stages run over a stream of documents.

Two kinds of stage:
- a document stage (`Stage`): `stage(text, doc, counts) -> str | None`, a pure function of one
  document (normalize, quality, pii, decontaminate). It returns the possibly changed text, or
  None to drop the document, and adds per-type events to `counts` (e.g. {"email": 2}).
- a global stage (`GlobalStage`): whether a document is kept depends on the documents before it
  (exact and near deduplication). `signature(text)` is pure and runs in a worker; `admit(sig,
  counts)` keeps the state and runs in the parent, in document order.

`Pipeline.run` streams documents in chunks to worker processes (or runs them in-process with
workers=0: same code, same output). A worker runs every document stage and computes every
global stage's signature; the parent walks each document's record in stage order, asks the
global stages, and counts a stage's work only if the document reached that stage, so the
counters are exactly those of running the stages one after the other on one core. Chunks come
back in order, so the output does not depend on the number of workers or on timing; with a
bounded number of chunks in flight, memory is bounded by the chunk size, not the corpus.

Every stage has a `StageStats` (documents in / out / removed / changed, characters in / out,
worker CPU seconds, per-type counts); `Pipeline.stats_dict()` is what data.prepare writes into
manifest.json under "stages" (the seconds go to prepare_log.json: the manifest holds only what
the output depends on).

data.prepare does not merge in one process: it runs the same stages as a sharded job of
tasks (data/job.py) on local processes or Ray, with the dedup decisions taken by partition
(data/dedup_sharded.py), and gets the output of `run`. For that it uses `record` (a document's
trip through some of the stages, in a worker) and `apply(..., admit)` (the counters, with the global
stages' decisions given by `admit`). `map` / `merge` below are the same two halves over whole
lists, for a custom engine that maps files remotely and merges in one place, in file order.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class DocumentLike(Protocol):
    """What the stages read: data.sources.Document satisfies this."""

    text: str
    source: str
    line: int | None


@runtime_checkable
class Stage(Protocol):
    """A document stage: pure, returns the (possibly changed) text or None to drop it."""

    name: str

    def __call__(self, text: str, doc: Any, counts: dict[str, int]) -> str | None: ...


class GlobalStage(Protocol):
    """A stage whose decision depends on earlier documents (deduplication)."""

    name: str

    def signature(self, text: str) -> Any:
        """Pure and picklable; computed in a worker."""
        ...

    def admit(self, sig: Any, counts: dict[str, int]) -> bool:
        """True to keep the document; updates the stage's state. Called in document order."""
        ...


class FunctionStage:
    """Wraps a plain function `fn(text) -> str | None` as a document stage."""

    def __init__(self, name: str, fn: Callable[[str], str | None]):
        self.name = name
        self.fn = fn

    def __call__(self, text: str, doc: Any, counts: dict[str, int]) -> str | None:
        return self.fn(text)


@dataclass
class StageStats:
    """Counters of one stage. `counts` holds per-type events (rule names, PII types, ...)."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    removed: int = 0
    changed: int = 0
    chars_in: int = 0
    chars_out: int = 0
    seconds: float = 0.0  # CPU seconds in the stage, summed over workers
    counts: dict[str, int] = field(default_factory=dict)

    def add_counts(self, counts: dict[str, int]) -> None:
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0) + value

    def add(self, other: dict[str, Any]) -> None:
        """Add another part's counters (`dataclasses.asdict` of a StageStats of this stage)."""
        for key in ("docs_in", "docs_out", "removed", "changed", "chars_in", "chars_out",
                    "seconds"):
            setattr(self, key, getattr(self, key) + other[key])
        self.add_counts(other["counts"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "removed": self.removed,
            "changed": self.changed,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "seconds": round(self.seconds, 3),
            "counts": dict(sorted(self.counts.items())),
        }


# One document's trip through the stages, computed in a worker:
# (final text or None, [per stage reached: step]) where a document stage's step is
# (chars out or -1 if dropped, changed, counts or None, seconds) and a global stage's step is
# (signature, seconds).
Record = tuple[str | None, list[tuple]]

_WORKER_STAGES: list[tuple[Any, bool]] | None = None


def _init_worker(stages: list[Any]) -> None:
    global _WORKER_STAGES
    _WORKER_STAGES = [(stage, _is_global(stage)) for stage in stages]


def _is_global(stage: Any) -> bool:
    return callable(getattr(stage, "signature", None)) and callable(getattr(stage, "admit", None))


def _process_doc(stages: list[tuple[Any, bool]], doc: Any) -> Record:
    text: str | None = doc.text
    steps: list[tuple] = []
    for stage, is_global in stages:
        assert text is not None
        t0 = time.process_time()
        if is_global:
            steps.append((stage.signature(text), time.process_time() - t0))
            continue
        counts: dict[str, int] = {}
        out = stage(text, doc, counts)
        dt = time.process_time() - t0
        if out is None:
            steps.append((-1, False, counts or None, dt))
            return None, steps
        steps.append((len(out), out != text, counts or None, dt))
        text = out
    return text, steps


def _process_chunk(docs: list[Any]) -> list[Record]:
    assert _WORKER_STAGES is not None, "worker not initialized"
    return [_process_doc(_WORKER_STAGES, doc) for doc in docs]


class Pipeline:
    """An ordered list of stages with their counters."""

    def __init__(self, stages: Iterable[Any]):
        self.stages: list[Any] = []
        for stage in stages:
            if not _is_global(stage) and not isinstance(stage, Stage):
                if not callable(stage):
                    raise TypeError(f"a stage must be callable, got {stage!r}")
                stage = FunctionStage(getattr(stage, "__name__", "function"), stage)
            self.stages.append(stage)
        self._global = [_is_global(s) for s in self.stages]
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        self.stats = [StageStats(s.name) for s in self.stages]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def apply(self, chars: int, record: Record, admit: Callable | None = None) -> str | None:
        """Walk the record of one document of `chars` characters in stage order; update the
        counters; return the kept text or None. `admit(stage, step signature, counts) -> keep`
        replaces the global stages' own `admit` when given (decisions taken elsewhere)."""
        final, steps = record
        for stage, is_global, stats, step in zip(self.stages, self._global, self.stats, steps):
            stats.docs_in += 1
            stats.chars_in += chars
            if is_global:
                sig, dt = step
                t0 = time.process_time()
                keep = admit(stage, sig, stats.counts) if admit else stage.admit(sig, stats.counts)
                stats.seconds += dt + time.process_time() - t0
                if not keep:
                    stats.removed += 1
                    return None
            else:
                out_chars, changed, counts, dt = step
                stats.seconds += dt
                if counts:
                    stats.add_counts(counts)
                if out_chars < 0:
                    stats.removed += 1
                    return None
                stats.changed += bool(changed)
                chars = out_chars
            stats.docs_out += 1
            stats.chars_out += chars
        return final

    def run(
        self,
        docs: Iterable[Any],
        workers: int = 0,
        chunk_chars: int = 1 << 20,
        progress: bool = False,
        mp_context: str = "spawn",
    ) -> Iterator[tuple[str, Any]]:
        """Yield (clean text, document) for every kept document, in input order.

        workers=0 runs in this process; workers>0 uses a process pool with at most
        2*workers+2 chunks of about `chunk_chars` characters in flight. "spawn" by default: the
        parent may hold threads (tokenizer training), which fork does not copy safely.
        """
        bars = _progress_bars(self.names) if progress else None
        try:
            if workers <= 0:
                _init_worker(self.stages)
                for chunk in _chunks(docs, chunk_chars):
                    yield from self._emit(chunk, _process_chunk(chunk), bars)
                return
            # The stages go to each worker once (initargs), not with every chunk.
            ctx = mp.get_context(mp_context)
            with ctx.Pool(workers, initializer=_init_worker, initargs=(self.stages,)) as pool:
                pending: deque = deque()
                for chunk in _chunks(docs, chunk_chars):
                    pending.append((chunk, pool.apply_async(_process_chunk, (chunk,))))
                    if len(pending) > 2 * workers + 1:
                        chunk0, res = pending.popleft()
                        yield from self._emit(chunk0, res.get(), bars)
                while pending:
                    chunk0, res = pending.popleft()
                    yield from self._emit(chunk0, res.get(), bars)
        finally:
            if bars:
                for bar in bars:
                    bar.close()

    def is_global(self, i: int) -> bool:
        return self._global[i]

    def record(self, doc: Any, start: int = 0, stop: int | None = None) -> Record:
        """Stages [start, stop) on one document (the worker half): (text out or None, steps);
        a global stage's step is (signature, seconds)."""
        stop = len(self.stages) if stop is None else stop
        return _process_doc(list(zip(self.stages[start:stop], self._global[start:stop])), doc)

    def _emit(self, chunk: list[Any], records: list[Record], bars: list | None):
        for doc, record in zip(chunk, records):
            text = self.apply(len(doc.text), record)
            if text is not None:
                yield text, doc
        if bars:
            for bar, stats in zip(bars, self.stats):
                bar.total = stats.docs_in
                bar.n = stats.docs_out
                bar.set_postfix(removed=stats.removed, changed=stats.changed, refresh=False)
                bar.refresh()

    # --- map over files, merge in one place (for cluster engines; see the module docstring) ---

    def map(self, docs: Iterable[Any]) -> list[tuple[Any, Record]]:
        """The worker half: every document stage and global-stage signature over `docs` (e.g.
        one input file). Pure: run it anywhere, on a copy of this pipeline; the result pickles."""
        stages = [(stage, _is_global(stage)) for stage in self.stages]
        return [(doc, _process_doc(stages, doc)) for doc in docs]

    def merge(self, mapped: Iterable[tuple[Any, Record]]) -> Iterator[tuple[str, Any]]:
        """The parent half: global stages and counters over mapped documents, in the order
        given (keep it fixed, e.g. sorted by input file, for reproducible output)."""
        for doc, record in mapped:
            text = self.apply(len(doc.text), record)
            if text is not None:
                yield text, doc

    def documents(self, docs: Iterable[Any], **run_kwargs: Any) -> Iterator[Any]:
        """`run` for dataclass documents: yields each kept document with its cleaned text."""
        for text, doc in self.run(docs, **run_kwargs):
            yield doc if text == doc.text else dataclasses.replace(doc, text=text)

    def stats_dict(self) -> dict[str, dict[str, Any]]:
        """{stage name: counters (+ "info" from a stage's describe())}, in stage order: the
        manifest's "stages" entry."""
        out = {}
        for stage, stats in zip(self.stages, self.stats):
            out[stage.name] = stats.to_dict()
            if callable(getattr(stage, "describe", None)):
                out[stage.name]["info"] = stage.describe()
        return out

    def summary(self) -> str:
        """A table of the counters, one stage a line."""
        lines = [f"{'stage':<14} {'in':>9} {'out':>9} {'removed':>9} {'changed':>9}  counts"]
        for s in self.stats:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(s.counts.items()))
            lines.append(
                f"{s.name:<14} {s.docs_in:>9} {s.docs_out:>9} {s.removed:>9} {s.changed:>9}  "
                f"{counts}"
            )
        return "\n".join(lines)


def _chunks(docs: Iterable[Any], chunk_chars: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc.text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _progress_bars(names: list[str]) -> list:
    from tqdm import tqdm

    return [
        tqdm(desc=f"{name:<14}", unit="doc", position=i + 1, leave=True, dynamic_ncols=True)
        for i, name in enumerate(names)
    ]


# ---------------------------------------------------------------------------------------------
# Building the configured pipeline
# ---------------------------------------------------------------------------------------------

DEFAULT_STAGES = ["normalize", "quality", "exact_dedup", "near_dedup", "pii", "decontaminate"]


def _build_stage(name: str, settings: Any) -> Any:
    # Imports here so that `import data.pipeline` stays light and free of cycles.
    if name == "normalize":
        from data.normalize import Normalize

        return Normalize()
    if name == "quality":
        from data.quality import QualityConfig, QualityFilter

        return QualityFilter(getattr(settings, "quality", None) or QualityConfig())
    if name == "exact_dedup":
        from data.dedup import ExactDedup

        return ExactDedup()
    if name == "near_dedup":
        from data.dedup import NearDedup, NearDedupConfig

        return NearDedup(getattr(settings, "near_dedup", None) or NearDedupConfig())
    if name == "pii":
        from data.pii import PIIConfig, PIIScrubber

        return PIIScrubber(getattr(settings, "pii", None) or PIIConfig())
    if name == "decontaminate":
        from data.decontaminate import DecontamConfig, Decontaminator

        return Decontaminator(getattr(settings, "decontaminate", None) or DecontamConfig())
    raise ValueError(f"unknown cleaning stage {name!r}; known stages: {DEFAULT_STAGES}")


def build_pipeline(settings: Any = None, stages: list[str] | None = None) -> Pipeline:
    """The pipeline named by `stages` (default: `settings.stages`, else DEFAULT_STAGES).

    `settings` is any object with optional attributes `stages`, `quality`, `near_dedup`, `pii`,
    `decontaminate` holding the stage configs (the data section of the job config, or a
    `CleaningConfig`); missing ones take their defaults.
    """
    if stages is None:
        configured = getattr(settings, "stages", None)
        stages = list(DEFAULT_STAGES if configured is None else configured)  # [] means none
    return Pipeline(_build_stage(name, settings) for name in stages)
