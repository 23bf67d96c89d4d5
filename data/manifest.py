"""The manifest of a prepared data directory (written last by data.prepare: its presence
means the shards are complete), and the tokenizer it names.

    data/NAME/manifest.json   {"format", "settings", "tokenizer": {"spec", "sha256", ...},
                               "train": {"tokens", "shards": [...]}, "val": {...}, ...}

`load_manifest` checks every field the readers use (types, shard names that stay inside the
directory), so a corrupt or hand-edited manifest stops with the file and the field named.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import FileFormatError, MissingFileError, read_json
from data.tokenizer import TokenizerLike, TokenizerMismatchError, load_tokenizer

MANIFEST_FILE = "manifest.json"


def load_manifest(path: str | Path, splits: tuple[str, ...] = ("train", "val")) -> dict:
    """The manifest of prepared data directory `path`; a clear error when it is not prepared
    or its manifest is not one data.prepare wrote. splits: those that must be listed."""
    manifest_path = Path(path) / MANIFEST_FILE
    if not manifest_path.exists():
        raise MissingFileError(
            f"{manifest_path} not found: prepare the data first (python -m data.prepare --config ...)"
        )
    manifest = read_json(manifest_path, "a data manifest (a JSON object)")
    check_manifest(manifest, manifest_path, splits)
    return manifest


def check_manifest(manifest, where: str | Path, splits: tuple[str, ...] = ("train", "val")) -> None:
    """Raise FileFormatError naming the first field of `manifest` that readers cannot use."""

    def bad(field: str, expected: str, got) -> FileFormatError:
        return FileFormatError(where, f"{field} to be {expected}", f"got {_short(got)}")

    def integer(field: str, value, low: int = 0) -> None:
        if type(value) is not int or value < low:
            raise bad(field, f"an integer >= {low}", value)

    if not isinstance(manifest, dict):
        raise bad("the top level", "a JSON object", manifest)
    # Required: what training reads. data.prepare also writes the tokenizer's spec and sha256
    # (needed to load it back: manifest_tokenizer) and the counts; a hand-made manifest may not.
    tok = manifest.get("tokenizer")
    if not isinstance(tok, dict):
        raise bad("tokenizer", "an object", tok)
    if not isinstance(tok.get("name"), str):
        raise bad("tokenizer.name", "a string", tok.get("name"))
    for key in ("spec", "sha256"):
        if key in tok and not isinstance(tok[key], str):
            raise bad(f"tokenizer.{key}", "a string", tok[key])
    integer("tokenizer.n_vocab", tok.get("n_vocab"), 1)
    integer("tokenizer.eot_id", tok.get("eot_id"))
    for split in splits:
        part = manifest.get(split)
        if not isinstance(part, dict):
            raise bad(split, "an object", part)
        for key in ("tokens", "documents"):
            if key in part:
                integer(f"{split}.{key}", part[key])
        shards = part.get("shards")
        if not isinstance(shards, list):
            raise bad(f"{split}.shards", "a list", shards)
        for i, entry in enumerate(shards):
            if not isinstance(entry, dict):
                raise bad(f"{split}.shards[{i}]", "an object", entry)
            name = entry.get("file")
            # A plain file name: the manifest never points outside its own directory.
            if not isinstance(name, str) or not name or Path(name).name != name \
                    or name.startswith(".") or "\\" in name:
                raise bad(f"{split}.shards[{i}].file", "a shard file name", name)
            integer(f"{split}.shards[{i}].tokens", entry.get("tokens"))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def manifest_tokenizer(data_path: str | Path, manifest: dict | None = None) -> TokenizerLike:
    """The tokenizer a prepared data dir was made with, checked against the manifest."""
    manifest = manifest or load_manifest(data_path)
    info = manifest["tokenizer"]
    if "spec" not in info or "sha256" not in info:
        raise FileFormatError(Path(data_path) / MANIFEST_FILE,
                              "tokenizer.spec and tokenizer.sha256 (to load the tokenizer back)")
    local = Path(data_path) / info["spec"]
    tok = load_tokenizer(local if local.exists() else info["spec"])
    if tok.identity()["sha256"] != info["sha256"]:
        raise TokenizerMismatchError(
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
