"""python -m data.prepare --config configs/tiny.toml [--data.key=value ...]

Raw text -> documents -> (cleaning stages) -> tokens (end-of-text after every document) ->
train / validation shards + manifest.json, in `data.path`.

- Tokenizer: `data.tokenizer = "train"` trains a byte-level BPE on a sample of the corpus and
  saves it beside the shards; otherwise a tiktoken encoding name or a `.tiktoken` file.
- The work is a job of tasks (data/job.py) on `data.executor`: "local" worker processes
  (`data.workers` of them) or "ray" (a Ray cluster, `data.ray_address`). The output is the same
  on both and for any number of workers: shards byte for byte, and the manifest.
- Every finished task leaves its directory under `data.path/tasks/`; a rerun (after a crash or a
  kill) runs only the unfinished tasks, so it finishes with exactly the files of an
  uninterrupted run. manifest.json is written last: its presence means done; tasks/ is then
  removed. Timings, memory and the machine go to prepare_log.json (the manifest holds only what
  the data depends on, so that equal settings give an equal manifest).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from common.atomic import write_json
from data.executor import make_executor
from data.job import TASKS_DIR, PrepareError, output_settings, run_job
from data.manifest import MANIFEST_FILE, load_manifest
from data.sources import Document, SourceErrors, iter_documents
from data.tasks import peak_rss, reset_peak_rss
from data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from job_config import DataConfig, load_config

TOKENIZER_FILE = "tokenizer.tiktoken"
LOG_FILE = "prepare_log.json"
__all__ = ["PrepareError", "prepare", "iter_corpus", "resolve_tokenizer"]


def iter_corpus(cfg: DataConfig, errors: SourceErrors) -> Iterator[Document]:
    """Every document of every source, in order, up to `max_bytes`."""
    seen = 0
    for spec in cfg.sources:
        for doc in iter_documents(spec, errors, cfg.text_field):
            if cfg.max_bytes and seen >= cfg.max_bytes:
                return
            seen += len(doc.text)
            yield doc


def resolve_tokenizer(cfg: DataConfig, out: Path) -> Tokenizer:
    if cfg.tokenizer != "train":
        return load_tokenizer(cfg.tokenizer)
    path = out / TOKENIZER_FILE
    if path.exists() and path.with_name(path.name + ".json").exists():
        return load_tokenizer(path)  # trained by an earlier (interrupted) run: same corpus

    def sample() -> Iterator[str]:
        taken = 0
        # Source errors are reported by the main pass below, not twice.
        for doc in iter_corpus(cfg, SourceErrors()):
            if taken >= cfg.tokenizer_train_bytes:
                return
            taken += len(doc.text)
            yield doc.text

    t0 = time.time()
    tok = train_bpe(sample(), cfg.vocab_size, path, name=out.name or "bpe")
    print(f"trained a {tok.n_vocab}-token byte-level BPE in {time.time() - t0:.1f}s -> {path}")
    return tok


def prepare(cfg: DataConfig, dry_run: bool = False, progress: bool = True) -> dict:
    """Prepare `cfg.path`; returns the manifest."""
    out = Path(cfg.path)
    manifest_path = out / MANIFEST_FILE
    settings = output_settings(cfg)
    if manifest_path.exists():
        manifest = load_manifest(out)
        if manifest.get("settings") == settings:
            print(f"{out} is already prepared ({manifest['train']['tokens']:,} train tokens)")
            return manifest
        raise PrepareError(
            f"{manifest_path} was prepared with other settings; choose another data.path "
            f"or delete {out}"
        )
    if next(iter_corpus(cfg, SourceErrors()), None) is None:
        raise PrepareError(f"no documents found in data.sources = {cfg.sources}")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = resolve_tokenizer(cfg, out)
    tokenizer_spec = str((out / TOKENIZER_FILE).resolve()) if cfg.tokenizer == "train" else (
        str(Path(cfg.tokenizer).resolve()) if Path(cfg.tokenizer).exists() else cfg.tokenizer)
    # The manifest names a trained tokenizer relative to the data dir, so the dir can move.
    manifest_spec = TOKENIZER_FILE if cfg.tokenizer == "train" else cfg.tokenizer

    t0 = time.time()
    executor = make_executor(cfg.executor, cfg.workers, cfg.ray_address, cfg.task_retries)
    startup, t0 = time.time() - t0, time.time()
    rss = reset_peak_rss()  # this process with the executor started: the driver's baseline
    try:
        result = run_job(cfg, out, tokenizer_spec, executor, dry_run, progress)
    finally:
        executor.close()
    counts, errors, pipeline = result.counts, result.errors, result.pipeline
    if counts["train"]["documents"] == 0:
        if pipeline.stats and pipeline.stats[0].docs_in:
            raise PrepareError(
                f"the cleaning stages (data.stages) removed all {pipeline.stats[0].docs_in} "
                f"documents:\n{pipeline.summary()}"
            )
        raise PrepareError(f"no documents found in data.sources = {cfg.sources}")
    if counts["val"]["documents"] == 0:
        raise PrepareError(
            f"no validation documents: {counts['train']['documents']} documents with "
            f"data.val_fraction = {cfg.val_fraction}; raise it or add data"
        )
    elapsed = time.time() - t0
    stages = pipeline.stats_dict()
    manifest = {
        "format": "token-shards-v1",
        "settings": settings,
        "tokenizer": {**tokenizer.identity(), "spec": manifest_spec},
        "train": counts["train"],
        "val": counts["val"],
        "source_errors": {"count": errors.count, "first": errors.summary()[:100]},
        "stages": {name: {k: v for k, v in st.items() if k != "seconds"}
                   for name, st in stages.items()},
    }
    print(pipeline.summary())
    for line in errors.summary()[:20]:
        print(f"warning: {line}")
    total = counts["train"]["tokens"] + counts["val"]["tokens"]
    print(
        f"{counts['train']['documents']:,} train / {counts['val']['documents']:,} val documents, "
        f"{total:,} tokens in {elapsed:.1f}s ({total / max(elapsed, 1e-9):,.0f} tokens/s) on "
        f"{executor.name} x {executor.workers}"
        + (f"; {errors.count} source errors" if errors.count else "")
    )
    log = {
        "seconds": round(elapsed, 2), "executor_start_seconds": round(startup, 2),
        "executor": executor.name, "workers": executor.workers,
        "docs_per_task": cfg.docs_per_task, "dedup_partitions": cfg.dedup_partitions,
        "driver": {"rss_start_mb": round(rss, 1), "peak_rss_mb": round(peak_rss(), 1)},
        "stage_seconds": {name: st["seconds"] for name, st in stages.items()},
        "tasks": result.log, "machine": _machine(),
    }
    if dry_run:
        print(json.dumps({k: manifest[k] for k in ("train", "val", "stages")}, indent=1))
        return manifest
    write_json(out / LOG_FILE, log)
    write_json(manifest_path, manifest)
    shutil.rmtree(out / TASKS_DIR, ignore_errors=True)  # intermediate files: done with them
    return manifest


def _machine() -> dict:
    import numpy

    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "numpy": numpy.__version__}
    if "ray" in sys.modules:
        info["ray"] = sys.modules["ray"].__version__
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare", description=__doc__.split("\n\n")[0],
        epilog="Any other --data.key=value overrides a field of the config's [data] section.",
    )
    parser.add_argument("--config", help="TOML job config (its [data] section is used)")
    parser.add_argument("--dry-run", action="store_true", help="statistics only, no shards")
    return parser


def main(argv: list[str] | None = None) -> None:
    args, overrides = build_parser().parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    prepare(cfg.data, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
