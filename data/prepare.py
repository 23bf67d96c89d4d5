"""python -m data.prepare --config configs/tiny.toml [--data.key=value ...]

Raw text -> documents -> (cleaning stages) -> tokens (end-of-text after every document) ->
train / validation shards + manifest.json, in `data.path`.

- Tokenizer: `data.tokenizer = "train"` trains a byte-level BPE on a sample of the corpus and
  saves it beside the shards; otherwise a tiktoken encoding name, a `.tiktoken` file, or
  "hf:DIR", a Hugging Face tokenizer (e.g. an imported model's, for continued pretraining).
- The work is a job of tasks (data/job.py) on `data.executor`: "local" worker processes
  (`data.workers` of them) or "ray" (a Ray cluster, `data.ray_address`). The output is the same
  on both and for any number of workers: shards byte for byte, and the manifest.
- Every finished task leaves its directory under `data.path/tasks/`; a rerun (after a crash or a
  kill) runs only the unfinished tasks, so it finishes with exactly the files of an
  uninterrupted run. manifest.json is written last: its presence means done; tasks/ is then
  removed. Timings, memory and the machine go to prepare_log.json (the manifest holds only what
  the data depends on, so that equal settings give an equal manifest).
- Before its first output file, prepare records the settings that decide the output
  (prepare.json: sources, stages and their settings, tokenizer, vocabulary size, split, shard
  size). A rerun with other settings stops and names the fields that differ instead of mixing
  old files (or an old tokenizer) with new settings; `--overwrite` deletes the old output first.
  The finished tasks under tasks/ are checked against the same fingerprint (and against
  docs_per_task / dedup_partitions, which decide how the work was cut).
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
from dataclasses import asdict
from pathlib import Path

from common.atomic import write_json
from common.errors import read_json, run_cli
from data.executor import ExecutorError, make_executor
from data.job import TASKS_DIR, PrepareError, output_settings, run_job
from data.manifest import MANIFEST_FILE, load_manifest
from data.scripts import balance_weights, group_shares, script_of
from data.sources import Document, SourceErrors, iter_documents
from data.tasks import peak_rss, reset_peak_rss
from data.tokenizer import TokenizerLike, load_tokenizer, train_bpe
from job_config import ConfigError, DataConfig, JobConfig, config_diff, flat_dict, load_config

TOKENIZER_FILE = "tokenizer.tiktoken"
LOG_FILE = "prepare_log.json"
FINGERPRINT_FILE = "prepare.json"
# The [data] sub-tables holding each cleaning stage's settings (stages without one have none).
STAGE_SETTINGS = {"quality": "quality", "near_dedup": "near_dedup", "pii": "pii",
                  "decontaminate": "decontaminate"}
__all__ = ["PrepareError", "prepare", "iter_corpus", "resolve_tokenizer", "fingerprint"]


def iter_corpus(cfg: DataConfig, errors: SourceErrors) -> Iterator[Document]:
    """Every document of every source, in order, up to `max_bytes`."""
    seen = 0
    for spec in cfg.sources:
        for doc in iter_documents(spec, errors, cfg.text_field):
            if cfg.max_bytes and seen >= cfg.max_bytes:
                return
            seen += len(doc.text)
            yield doc


def resolve_tokenizer(cfg: DataConfig, out: Path) -> TokenizerLike:
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
    texts, weights = sample(), None
    if cfg.tokenizer_script_balance != 1.0:
        texts = list(texts)
        groups = [script_of(t) for t in texts]
        sizes = [len(t.encode("utf-8")) for t in texts]
        weights = balance_weights(groups, sizes, cfg.tokenizer_script_balance)
        shares = group_shares(groups, sizes, weights)
        print("BPE sample by script, balanced: " + ", ".join(
            f"{g} {s:.1%}" for g, s in list(shares.items())[:6]))
    tok = train_bpe(texts, cfg.vocab_size, path, name=out.name or "bpe", weights=weights)
    print(f"trained a {tok.n_vocab}-token byte-level BPE in {time.time() - t0:.1f}s -> {path}")
    if tok.n_vocab < cfg.vocab_size:
        print(f"note: data.vocab_size = {cfg.vocab_size}, but the sampled corpus yields only "
              f"{tok.n_vocab} ids (every pair of tokens it holds is merged)")
    return tok


def fingerprint(cfg: DataConfig) -> dict:
    """The settings that decide what prepare writes, as flat `data.` keys (not where it
    writes, nor how many workers it uses): a rerun must have exactly these to reuse files."""
    keys = ["sources", "text_field", "max_bytes", "stages", "tokenizer", "val_fraction",
            "shard_tokens"]
    if cfg.tokenizer == "train":
        keys += ["vocab_size", "tokenizer_train_bytes", "tokenizer_script_balance"]
    settings = {key: getattr(cfg, key) for key in keys}
    for stage in cfg.stages:
        if stage in STAGE_SETTINGS:
            settings[STAGE_SETTINGS[stage]] = asdict(getattr(cfg, STAGE_SETTINGS[stage]))
    return flat_dict(settings, "data.")


def _output_files(out: Path, temporaries: bool = True) -> list[Path]:
    """What prepare (and the contamination index beside the shards) writes into `out`, and
    optionally the temporaries of writes that a kill interrupted."""
    names = ["train_*.bin", "val_*.bin", f"{TOKENIZER_FILE}*", MANIFEST_FILE, FINGERPRINT_FILE,
             LOG_FILE, TASKS_DIR, "ngrams_*"] + ([".*.tmp"] if temporaries else [])
    return sorted({p for name in names for p in out.glob(name)})


def check_fingerprint(cfg: DataConfig, out: Path, overwrite: bool = False) -> None:
    """Record cfg's fingerprint in `out` before any other output file, or check that the one
    recorded there is the same (else stop, naming the fields that differ)."""
    path = out / FINGERPRINT_FILE
    ours = fingerprint(cfg)
    if overwrite:
        for old in _output_files(out):
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
    elif path.exists() or (out / MANIFEST_FILE).exists():
        recorded = _recorded_fingerprint(out)
        changed = config_diff(recorded, ours)
        if changed:
            lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise PrepareError(
                f"{out} was prepared (or partly prepared) with other settings:\n{lines}\n"
                f"rerun with --overwrite to start clean, or choose another data.path"
            )
        return
    elif _output_files(out, temporaries=False):
        raise PrepareError(
            f"{out} holds prepared files but no {FINGERPRINT_FILE} (written by another version, "
            f"or by hand): rerun with --overwrite to start clean, or choose another data.path"
        )
    write_json(path, {"format": "prepare-settings-v1", "settings": ours})


def _recorded_fingerprint(out: Path) -> dict:
    path = out / FINGERPRINT_FILE
    if path.exists():
        recorded = read_json(path, "data.prepare's settings (a JSON object)")
        if not isinstance(recorded, dict) or not isinstance(recorded.get("settings"), dict):
            raise PrepareError(f"{path}: no 'settings' object; rerun with --overwrite")
        return recorded["settings"]
    # Prepared by a version without prepare.json: the manifest holds the whole [data] section.
    settings = load_manifest(out).get("settings")
    try:
        return fingerprint(JobConfig.from_dict({"data": settings}, str(out / MANIFEST_FILE)).data)
    except (ConfigError, TypeError) as e:
        raise PrepareError(f"{out / MANIFEST_FILE}: unreadable settings ({e}); rerun with "
                           f"--overwrite") from None


def prepare(cfg: DataConfig, dry_run: bool = False, progress: bool = True,
            overwrite: bool = False) -> dict:
    """Prepare `cfg.path`; returns the manifest. overwrite: delete an earlier preparation's
    files first (needed when the settings changed)."""
    out = Path(cfg.path)
    manifest_path = out / MANIFEST_FILE
    settings = output_settings(cfg)
    if out.is_dir():
        check_fingerprint(cfg, out, overwrite)  # stops when the settings changed
    if manifest_path.exists():
        manifest = load_manifest(out)
        print(f"{out} is already prepared ({manifest['train']['tokens']:,} train tokens)")
        return manifest
    if next(iter_corpus(cfg, SourceErrors()), None) is None:
        raise PrepareError(f"no documents found in data.sources = {cfg.sources}")
    out.mkdir(parents=True, exist_ok=True)
    check_fingerprint(cfg, out)  # records it, before the first output file
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
        result = run_job(cfg, out, tokenizer_spec, executor, fingerprint(cfg), dry_run, progress)
        elapsed = time.time() - t0
    except ExecutorError as e:
        raise PrepareError(f"data.prepare stopped: {e}") from e
    finally:
        t1 = time.time()
        executor.close()  # timed apart, as its start: a cluster's lifetime, not the job's
        stopping = time.time() - t1
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
    stages = pipeline.stats_dict()
    manifest = {
        "format": "token-shards-v1",
        "settings": settings,
        "fingerprint": fingerprint(cfg),
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
        "executor_stop_seconds": round(stopping, 2),
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
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an earlier preparation of data.path first (other settings)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args, overrides = build_parser().parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    prepare(cfg.data, dry_run=args.dry_run, overwrite=args.overwrite)


if __name__ == "__main__":
    run_cli(main)
