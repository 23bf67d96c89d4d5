"""python -m data.prepare --config configs/tiny.toml [--data.key=value ...]

Raw text -> documents -> (cleaning stages) -> tokens (end-of-text after every document) ->
train / validation shards + manifest.json, in `data.path`.

- Tokenizer: `data.tokenizer = "train"` trains a byte-level BPE on a sample of the corpus and
  saves it beside the shards; otherwise a tiktoken encoding name, a `.tiktoken` file, or
  "hf:DIR", a Hugging Face tokenizer (e.g. an imported model's, for continued pretraining).
- Work is cut into units of about `data.shard_tokens` tokens, one shard file per unit, in a
  fixed order. Worker processes tokenize units and write their shards atomically. A rerun
  (after a crash or a kill) skips every shard already on disk, so it finishes with exactly the
  shards of an uninterrupted run. manifest.json is written last: its presence means done.
- Before its first output file, prepare records the settings that decide the output
  (prepare.json: sources, stages and their settings, tokenizer, vocabulary size, split, unit
  size). A rerun with other settings stops and names the fields that differ instead of mixing
  old shards (or an old tokenizer) with new settings; `--overwrite` deletes the old output first.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.atomic import write_json
from common.errors import PretrainError, read_json, run_cli
from data.manifest import MANIFEST_FILE, load_manifest
from data.pipeline import build_pipeline
from data.scripts import balance_weights, group_shares, script_of
from data.shards import read_header, token_dtype, write_shard
from data.sources import Document, SourceErrors, iter_documents
from data.tokenizer import TokenizerLike, load_tokenizer, train_bpe
from job_config import ConfigError, DataConfig, JobConfig, config_diff, flat_dict, load_config

BYTES_PER_TOKEN_GUESS = 4  # only sizes the work units; shards hold whatever a unit produced
TOKENIZER_FILE = "tokenizer.tiktoken"
FINGERPRINT_FILE = "prepare.json"
# The [data] sub-tables holding each cleaning stage's settings (stages without one have none).
STAGE_SETTINGS = {"quality": "quality", "near_dedup": "near_dedup", "pii": "pii",
                  "decontaminate": "decontaminate"}


class PrepareError(PretrainError, RuntimeError):
    """data.prepare cannot go on (no documents, settings that differ from the data dir's)."""


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


def iter_units(
    docs: Iterator[Document], cfg: DataConfig, counts: dict
) -> Iterator[tuple[str, int, list[str]]]:
    """(split, unit index, texts): documents split train / val by position, grouped into units.

    Document k goes to validation when floor((k+1) f) > floor(k f): exactly a fraction f, spread
    evenly, and the same on every rerun.
    """
    unit_bytes = cfg.shard_tokens * BYTES_PER_TOKEN_GUESS
    pending: dict[str, list[str]] = {"train": [], "val": []}
    size = {"train": 0, "val": 0}
    index = {"train": 0, "val": 0}
    f = cfg.val_fraction
    for k, doc in enumerate(docs):
        split = "val" if int((k + 1) * f) > int(k * f) else "train"
        pending[split].append(doc.text)
        size[split] += len(doc.text)
        counts[split]["documents"] += 1
        counts[split]["chars"] += len(doc.text)
        if size[split] >= unit_bytes:
            yield split, index[split], pending[split]
            index[split] += 1
            pending[split], size[split] = [], 0
    for split in ("train", "val"):
        if pending[split]:
            yield split, index[split], pending[split]


# --- worker side ----------------------------------------------------------------------------
_worker_tokenizer: TokenizerLike | None = None


def _init_worker(tokenizer_spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_spec)


def _tokenize_unit(job: tuple[str, list[str]]) -> int:
    """Tokenize one unit's documents into its shard file: each is the tokenizer's `bos_ids`
    (Llama 3's <|begin_of_text|>; none for ours, whose end-of-text already precedes every
    document but the first), its text, and end-of-text."""
    path, texts = job
    tok = _worker_tokenizer
    ids = tok.encode_batch(texts, num_threads=1)
    bos = [] if tok.bos_ids == [tok.eot_id] else list(tok.bos_ids)
    ids = [bos + doc + [tok.eot_id] for doc in ids]
    tokens = np.empty(sum(len(d) for d in ids), dtype=token_dtype(tok.n_vocab))
    pos = 0
    for doc in ids:
        tokens[pos : pos + len(doc)] = doc
        pos += len(doc)
    write_shard(path, tokens, tok.n_vocab)
    return len(tokens)


@contextmanager
def _tokenizer_pool(workers: int, tokenizer_spec: str) -> Iterator[Callable]:
    """A function jobs -> shard token counts, in order: `workers` spawned processes, or this
    process for workers = 0. A worker that dies (killed, out of memory) stops the run with a
    message instead of hanging it; the shards written so far are kept for the rerun."""
    if workers <= 0:
        _init_worker(tokenizer_spec)
        yield lambda jobs: map(_tokenize_unit, jobs)
        return
    # spawn, not fork: safe with torch / tiktoken threads in the parent
    with ProcessPoolExecutor(workers, mp.get_context("spawn"), _init_worker,
                             (tokenizer_spec,)) as pool:
        def tokenize_all(jobs):
            try:
                yield from pool.map(_tokenize_unit, jobs)
            except BrokenProcessPool as e:
                raise PrepareError(
                    f"a tokenizer worker process died ({e}; killed, or out of memory? lower "
                    f"data.workers or data.shard_tokens); rerun to continue from the shards "
                    f"already written"
                ) from None

        yield tokenize_all


# ---------------------------------------------------------------------------------------------


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
             "ngrams_*"] + ([".*.tmp"] if temporaries else [])
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


def prepare(cfg: DataConfig, dry_run: bool = False, overwrite: bool = False) -> dict:
    """Prepare `cfg.path`; returns the manifest. overwrite: delete an earlier preparation's
    files first (needed when the settings changed)."""
    out = Path(cfg.path)
    manifest_path = out / MANIFEST_FILE
    settings = asdict(cfg)
    if out.is_dir():
        check_fingerprint(cfg, out, overwrite)  # stops when the settings changed
    if manifest_path.exists():
        manifest = load_manifest(out)
        print(f"{out} is already prepared ({manifest['train']['tokens']:,} train tokens)")
        return manifest
    errors = SourceErrors()
    if next(iter_corpus(cfg, SourceErrors()), None) is None:
        raise PrepareError(f"no documents found in data.sources = {cfg.sources}")
    out.mkdir(parents=True, exist_ok=True)
    check_fingerprint(cfg, out)  # records it, before the first output file
    tokenizer = resolve_tokenizer(cfg, out)
    tokenizer_spec = str(out / TOKENIZER_FILE) if cfg.tokenizer == "train" else cfg.tokenizer
    # The manifest names a trained tokenizer relative to the data dir, so the dir can move.
    manifest_spec = TOKENIZER_FILE if cfg.tokenizer == "train" else cfg.tokenizer

    counts = {s: {"documents": 0, "chars": 0, "tokens": 0, "shards": []} for s in ("train", "val")}
    docs = iter_corpus(cfg, errors)
    # Cleaning stages (data/pipeline.py): deterministic, so a rerun yields the same shards.
    pipeline = build_pipeline(cfg)
    docs = pipeline.documents(docs, workers=cfg.workers, progress=sys.stdout.isatty())
    units = iter_units(docs, cfg, counts)
    t0 = time.time()
    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, file=sys.stdout, mininterval=2)
    with _tokenizer_pool(cfg.workers, tokenizer_spec) as tokenize_all:
        while True:
            # A bounded window of units in flight keeps memory flat on any corpus size.
            window = [u for _, u in zip(range(4 * max(1, cfg.workers)), units)]
            if not window:
                break
            jobs, names = [], []
            for split, index, texts in window:
                name = f"{split}_{index:06d}.bin"
                names.append((split, name))
                if not dry_run and not (out / name).exists():
                    jobs.append((str(out / name), texts))
            if dry_run:
                for _, _, texts in window:
                    bar.update(sum(len(t) for t in texts) // BYTES_PER_TOKEN_GUESS)
                continue
            for n_tokens in tokenize_all(jobs):
                bar.update(n_tokens)
            for split, name in names:
                n = read_header(out / name)["num_tokens"]
                counts[split]["tokens"] += n
                counts[split]["shards"].append({"file": name, "tokens": n})
    bar.close()
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
    manifest = {
        "format": "token-shards-v1",
        "settings": settings,
        "fingerprint": fingerprint(cfg),
        "tokenizer": {**tokenizer.identity(), "spec": manifest_spec},
        "train": counts["train"],
        "val": counts["val"],
        "source_errors": {"count": errors.count, "first": errors.summary()[:100]},
        "stages": pipeline.stats_dict(),
        "seconds": round(elapsed, 2),
    }
    print(pipeline.summary())
    for line in errors.summary()[:20]:
        print(f"warning: {line}")
    total = counts["train"]["tokens"] + counts["val"]["tokens"]
    print(
        f"{counts['train']['documents']:,} train / {counts['val']['documents']:,} val documents, "
        f"{total:,} tokens in {elapsed:.1f}s ({total / max(elapsed, 1e-9):,.0f} tokens/s)"
        + (f"; {errors.count} source errors" if errors.count else "")
    )
    if dry_run:
        print(json.dumps({k: manifest[k] for k in ("train", "val", "stages")}, indent=1))
        return manifest
    write_json(manifest_path, manifest)
    return manifest


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
