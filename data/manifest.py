"""The manifest of a prepared data directory (written last by data.prepare: its presence
means the shards are complete), and the tokenizer it names.

    data/NAME/manifest.json   {"format", "settings", "tokenizer": {"spec", "sha256", ...},
                               "train": {"tokens", "shards": [...]}, "val": {...}, ...}
"""

from __future__ import annotations

import json
from pathlib import Path

from data.tokenizer import Tokenizer, load_tokenizer

TokenizerLike = Tokenizer  # until data/tokenizer.py defines the protocol

MANIFEST_FILE = "manifest.json"


def load_manifest(path: str | Path) -> dict:
    """The manifest of prepared data directory `path`; a clear error when it is not prepared."""
    manifest_path = Path(path) / MANIFEST_FILE
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{manifest_path} not found: prepare the data first (python -m data.prepare --config ...)"
        )
    return json.loads(manifest_path.read_text())


def manifest_tokenizer(data_path: str | Path, manifest: dict | None = None) -> Tokenizer:
    """The tokenizer a prepared data dir was made with, checked against the manifest."""
    manifest = manifest or load_manifest(data_path)
    info = manifest["tokenizer"]
    local = Path(data_path) / info["spec"]
    tok = load_tokenizer(local if local.exists() else info["spec"])
    if tok.identity()["sha256"] != info["sha256"]:
        raise ValueError(
            f"{data_path}/{MANIFEST_FILE}: tokenizer {info['spec']!r} differs from the one the "
            f"shards were made with (sha256 {info['sha256'][:12]}...)"
        )
    return tok


def run_tokenizer(data_cfg) -> TokenizerLike:
    """The tokenizer of a run (its config's [data] section): the prepared data's when data.path
    is prepared (checked against its manifest), otherwise the one data.tokenizer names, e.g. the
    Hugging Face tokenizer an imported run keeps (`python -m model.hf import`)."""
    if (Path(data_cfg.path) / MANIFEST_FILE).exists() or data_cfg.tokenizer == "train":
        return manifest_tokenizer(data_cfg.path)
    return load_tokenizer(data_cfg.tokenizer)
