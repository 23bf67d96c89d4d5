"""The on-disk token shard format (llm.c style, versioned).

A shard is a 1024-byte header of 256 little-endian int32 followed by the tokens:

    header[0] = MAGIC       identifies the format
    header[1] = VERSION
    header[2] = number of tokens
    header[3] = bytes per token (2: uint16, 4: uint32)
    header[4] = vocabulary size of the tokenizer that wrote it

Tokens are uint16 when every id fits (vocabulary <= 65536), uint32 otherwise. Readers check
the magic, version, dtype and that the file holds exactly the tokens the header announces, so a
wrong or truncated file is rejected with its name instead of being read as garbage.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.atomic import atomic_path
from common.errors import PretrainError

MAGIC = 20241123
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(PretrainError, ValueError):
    """A shard file that is not what its header (or the format) says."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write tokens to `path` atomically (temporary name, fsync, rename)."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"{path}: token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:5] = [MAGIC, VERSION, tokens.size, dtype.itemsize, vocab_size]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes())


def read_header(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"{path}: no such shard file (prepare the data again?)") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise ShardError(f"{path}: unreadable shard ({e.strerror or e})") from None
    if size < HEADER_BYTES or len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, count, itemsize, vocab_size = (int(v) for v in header[:5])
    if magic != MAGIC:
        raise ShardError(f"{path}: magic number {magic}, expected {MAGIC} (not a token shard)")
    if version != VERSION:
        raise ShardError(f"{path}: format version {version}, this code reads version {VERSION}")
    if itemsize not in (2, 4):
        raise ShardError(f"{path}: {itemsize} bytes per token, expected 2 or 4")
    if count < 0:
        raise ShardError(f"{path}: header says {count} tokens, expected a count >= 0")
    if vocab_size < 1 or (itemsize == 2) != (vocab_size <= 2**16):
        raise ShardError(
            f"{path}: vocabulary size {vocab_size} with {itemsize}-byte tokens, expected a "
            f"positive size that {'fits' if itemsize == 2 else 'exceeds'} 65536"
        )
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        raise ShardError(
            f"{path}: {size} bytes, expected {expected} for {count} tokens "
            f"(truncated or corrupt shard)"
        )
    return {"num_tokens": count, "itemsize": itemsize, "vocab_size": vocab_size}


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens after validating its header and size (token ids are checked
    against the header's vocabulary size where they are read: data/loader.py)."""
    header = read_header(path)
    dtype = np.dtype("<u2") if header["itemsize"] == 2 else np.dtype("<u4")
    if header["num_tokens"] == 0:
        return np.zeros(0, dtype=dtype)
    try:
        return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES,
                         shape=(header["num_tokens"],))
    except (OSError, ValueError) as e:  # replaced or truncated since the header was read
        raise ShardError(f"{path}: cannot map its tokens ({e})") from None


def check_token_ids(path: str | Path, tokens: np.ndarray, vocab_size: int, offset: int = 0) -> None:
    """Stop on a token id outside [0, vocab_size): a shard whose header is valid but whose ids
    would index past the embedding (corrupt bytes, or written for another tokenizer)."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        at = int(np.argmax(tokens >= vocab_size))
        raise ShardError(
            f"{path}: token {offset + at} has id {int(tokens[at])}, expected ids below the "
            f"vocabulary size {vocab_size} (corrupt shard, or one of another tokenizer)"
        )
