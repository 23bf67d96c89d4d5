"""Throughput of the data cleaning stages, next to tokenization alone, on one machine in one run.

    python -m bench.data                       # the Python standard library (~31 MB of .py)
    python -m bench.data --max-mb 8 --workers 2 --source path/to/corpus.jsonl --out data.json

Prints MB/s (UTF-8 input bytes per second) of: each stage alone, the whole pipeline, tokenization
alone, and cleaning + tokenization end to end; first in this process on one core (wall clock and
CPU time: CPU time is the stable number on a shared machine), then with `--workers` processes
(wall clock). The target of issue 6: end to end >= half of tokenization alone.

The corpus is read into memory first, so reading files is not timed. Tokenization uses
`--tokenizer` (a prepared data dir's tokenizer.tiktoken, a tiktoken name, or "train": a BPE of
`--vocab-size` trained on the first 10 MB, as data.prepare does by default).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from common.atomic import write_json
from data.pipeline import DEFAULT_STAGES, Pipeline, build_pipeline
from data.sources import SourceErrors, iter_documents
from data.tokenizer import load_tokenizer, train_bpe


class Tokenize:
    """A pass-through stage that tokenizes: lets tokenization run in the pipeline's workers,
    so "tokenization alone" and "end to end" use the same process machinery."""

    name = "tokenize"

    def __init__(self, spec: str):
        self.spec = spec
        self._tok: Any = None

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "_tok": None}  # each worker loads its own tokenizer

    def __call__(self, text: str, doc: Any, counts: dict[str, int]) -> str:
        if self._tok is None:
            self._tok = load_tokenizer(self.spec)
        counts["tokens"] = counts.get("tokens", 0) + len(self._tok.encode(text))
        return text


def timed(pipe: Pipeline, docs: list, workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to run `pipe` over `docs`."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in pipe.run(docs, workers=workers):
        pass
    return time.perf_counter() - w0, time.process_time() - c0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="stdlib", help="a data.sources spec")
    parser.add_argument("--max-mb", type=float, default=0, help="use the first N MB (0: all)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the parallel runs")
    parser.add_argument("--tokenizer", default="train")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="also write the results as JSON to FILE (default: print only)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)

    docs, size = [], 0
    for doc in iter_documents(args.source, SourceErrors()):
        if args.max_mb and size >= args.max_mb * 1e6:
            break
        docs.append(doc)
        size += len(doc.text.encode("utf-8", "surrogatepass"))
    mb = size / 1e6

    tmp = tempfile.TemporaryDirectory()
    spec = args.tokenizer
    if spec == "train":
        sample, taken = [], 0
        for doc in docs:
            if taken > 10e6:
                break
            sample.append(doc.text)
            taken += len(doc.text)
        spec = str(Path(tmp.name) / "bench.tiktoken")
        train_bpe(sample, args.vocab_size, spec, name="bench")
    load_tokenizer(spec)  # fail early on a bad spec

    load0 = os.getloadavg()[0]
    rows: list[tuple[str, float, float | None]] = []  # (name, MB/s wall, MB/s CPU)

    def run(name: str, pipe: Pipeline, workers: int = 0) -> Pipeline:
        wall, cpu = timed(pipe, docs, workers)
        rows.append((name, mb / wall, mb / cpu if workers == 0 else None))
        print(f"  {name:<40} {mb / wall:8.2f} MB/s", flush=True)
        return pipe

    print(f"{len(docs)} documents, {mb:.1f} MB from {args.source!r}; {os.cpu_count()} CPUs, "
          f"load average {load0:.1f}")
    print("one process:")
    for name in DEFAULT_STAGES:
        run(f"stage {name} alone", build_pipeline(stages=[name]))
    full = run("pipeline, all stages", build_pipeline())
    tokenized = run("tokenization alone", Pipeline([Tokenize(spec)]))
    run("end to end (all stages + tokenization)",
        Pipeline([*build_pipeline().stages, Tokenize(spec)]))
    if args.workers > 0:
        print(f"{args.workers} worker processes:")
        run(f"pipeline, all stages, {args.workers} workers", build_pipeline(), args.workers)
        run(f"tokenization alone, {args.workers} workers", Pipeline([Tokenize(spec)]),
            args.workers)
        run(f"end to end, {args.workers} workers",
            Pipeline([*build_pipeline().stages, Tokenize(spec)]), args.workers)
    load1 = os.getloadavg()[0]

    by_name = {name: (wall, cpu) for name, wall, cpu in rows}
    tok_wall, tok_cpu = by_name["tokenization alone"]
    e2e_wall, e2e_cpu = by_name["end to end (all stages + tokenization)"]
    print()
    print(f"| {'measurement':<42} | {'MB/s (wall)':>11} | {'MB/s (CPU)':>10} |")
    print(f"|{'-' * 44}|{'-' * 13}|{'-' * 12}|")
    for name, wall, cpu in rows:
        cpu_text = f"{cpu:10.2f}" if cpu is not None else f"{'-':>10}"
        print(f"| {name:<42} | {wall:11.2f} | {cpu_text} |")
    print()
    ratio_cpu = e2e_cpu / tok_cpu
    ratio_wall = e2e_wall / tok_wall
    print(f"end to end / tokenization alone, one process: {ratio_cpu:.2f} (CPU), "
          f"{ratio_wall:.2f} (wall); target >= 0.5")
    if args.workers > 0:
        par = by_name[f"end to end, {args.workers} workers"][0]
        par_tok = by_name[f"tokenization alone, {args.workers} workers"][0]
        print(f"end to end / tokenization alone, {args.workers} workers: {par / par_tok:.2f} "
              f"(wall)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU "
          f"used; load average {load0:.1f} -> {load1:.1f} (other jobs make wall times noisy)")
    print(full.summary())
    result = {
        "source": args.source, "documents": len(docs), "mb": mb, "cpus": os.cpu_count(),
        "load_average": [load0, load1], "rows": rows,
        "ratio_cpu": ratio_cpu, "ratio_wall": ratio_wall, "stages": full.stats_dict(),
        "tokens": tokenized.stats[0].counts.get("tokens", 0),
    }
    if args.out:
        write_json(args.out, result)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
