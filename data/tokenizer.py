"""Tokenizers: tiktoken encodings by name, or a byte-level BPE trained on your own corpus.

Either way the result is a `tiktoken.Encoding` (fast, thread-parallel encoding). Our own BPE is
trained with the Hugging Face `tokenizers` library (a fast, well-kept trainer) and saved in
tiktoken's format: `<name>.tiktoken` (one "base64(token bytes) rank" per line) plus a sidecar
`<name>.tiktoken.json` holding the split regex and the special tokens. Every document is
followed by the end-of-text token `<|endoftext|>`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Iterable
from pathlib import Path

import tiktoken
import tiktoken.load

from common.atomic import write_json, write_text

EOT = "<|endoftext|>"

# cl100k_base's split regex: letters, up to 3 digits, punctuation runs and whitespace runs kept
# apart, which suits code as well as prose.
DEFAULT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class Tokenizer:
    """A tiktoken Encoding with an end-of-text token and an identity for manifests."""

    def __init__(self, encoding: tiktoken.Encoding, source: str):
        if EOT not in encoding._special_tokens:
            raise ValueError(f"tokenizer {source}: no {EOT} special token")
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


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A tiktoken encoding name ("gpt2", "cl100k_base", "o200k_base") or a saved `.tiktoken` file.

    Encodings by name come from tiktoken's cache (TIKTOKEN_CACHE_DIR) or are downloaded once.
    """
    path = Path(spec)
    if path.suffix == ".tiktoken" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        meta_path = _meta_path(path)
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} is missing (it holds the regex and special tokens)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        for key in ("name", "pat_str", "special_tokens"):
            if key not in meta:
                raise ValueError(f"{meta_path}: missing field {key!r}")
        ranks = tiktoken.load.load_tiktoken_bpe(str(path))
        enc = tiktoken.Encoding(
            meta["name"],
            pat_str=meta["pat_str"],
            mergeable_ranks=ranks,
            special_tokens=meta["special_tokens"],
        )
        return Tokenizer(enc, str(path))
    try:
        enc = tiktoken.get_encoding(str(spec))
    except ValueError as e:
        raise ValueError(
            f"data.tokenizer = {spec!r}: neither a tokenizer file nor a tiktoken encoding "
            f"({', '.join(tiktoken.list_encoding_names())})"
        ) from e
    return Tokenizer(enc, str(spec))


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
        raise ValueError(f"vocab_size = {vocab_size}: a byte-level BPE needs at least 257 ids")
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
        raise ValueError("the corpus is empty or too small to learn any merge")
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
