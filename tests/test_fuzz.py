"""Fuzzing the readers of user files (issue 12): the shard reader, the manifest reader and the
config loader take random and mutated inputs; the only exception that may escape is the
project's own PretrainError (which names the file or the key), and what they accept is usable.

The suite runs a few hundred inputs per test (tests/conftest.py's "suite" profile); the full
run, 10,000 inputs per test:

    HYPOTHESIS_PROFILE=fuzz python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import PretrainError
from data.manifest import load_manifest
from data.shards import (
    HEADER_BYTES,
    MAGIC,
    VERSION,
    check_token_ids,
    read_header,
    read_shard,
    write_shard,
)
from job_config import JobConfig, flat_dict, load_config, to_toml, toml_value

COUNTER = itertools.count()


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# --- shards ----------------------------------------------------------------------------------


def valid_shard(tokens: list[int], vocab: int) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        write_shard(Path(d) / "s.bin", np.array(tokens, dtype=np.int64), vocab)
        return (Path(d) / "s.bin").read_bytes()


@st.composite
def shard_bytes(draw) -> bytes:
    """Random bytes, a random header over random tokens, or a valid shard mutated."""
    kind = draw(st.sampled_from(["random", "header", "mutated"]))
    if kind == "random":
        return draw(st.binary(max_size=3000))
    if kind == "header":
        fields = [draw(st.sampled_from([MAGIC, draw(st.integers(-2**31, 2**31 - 1))])),
                  draw(st.sampled_from([VERSION, draw(st.integers(-2**31, 2**31 - 1))])),
                  draw(st.integers(-5, 600)), draw(st.sampled_from([2, 4, 0, 3, -2, 8])),
                  draw(st.sampled_from([1, 300, 65536, 65537, 0, -1, 2**31 - 1]))]
        header = np.zeros(HEADER_BYTES // 4, "<i4")
        header[:5] = fields
        return header.tobytes() + draw(st.binary(max_size=1200))
    vocab = draw(st.sampled_from([2, 300, 70_000]))
    data = bytearray(valid_shard(draw(st.lists(st.integers(0, vocab - 1), max_size=200)), vocab))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "append"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        else:
            data += draw(st.binary(max_size=16))
    return bytes(data)


@given(data=shard_bytes())
def test_fuzz_shard_reader(scratch, data):
    """read_shard on random, random-header and mutated shards: ShardError or a token array
    exactly as long as the file holds; its ids checked against the header's vocabulary."""
    path = scratch / f"shard{next(COUNTER)}.bin"  # a new file: old memory maps stay valid
    path.write_bytes(data)
    try:
        tokens = np.array(read_shard(path))
        header = read_header(path)
        assert len(tokens) == header["num_tokens"]
        assert HEADER_BYTES + len(tokens) * tokens.dtype.itemsize == len(data)
        try:
            check_token_ids(path, tokens, header["vocab_size"])
            assert not len(tokens) or int(tokens.max()) < header["vocab_size"]
        except PretrainError:
            assert int(tokens.max()) >= header["vocab_size"]
    except PretrainError as e:
        assert path.name in str(e)
    path.unlink()


# --- manifests -------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
GOOD_MANIFEST = {
    "format": "token-shards-v1",
    "tokenizer": {"spec": "tokenizer.tiktoken", "sha256": "ab" * 32, "name": "bpe",
                  "n_vocab": 512, "eot_id": 511},
    "train": {"documents": 3, "chars": 100, "tokens": 40,
              "shards": [{"file": "train_000000.bin", "tokens": 40}]},
    "val": {"documents": 1, "chars": 10, "tokens": 4,
            "shards": [{"file": "val_000000.bin", "tokens": 4}]},
}


@st.composite
def manifest_bytes(draw) -> bytes:
    """Random bytes, random JSON, or the real manifest with random fields replaced."""
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    manifest = json.loads(json.dumps(GOOD_MANIFEST))
    for _ in range(draw(st.integers(1, 3))):
        node, keys = manifest, []
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else
                                       list(range(len(node)))))
            keys.append(key)
            node = node[key]
        if not keys:
            continue
        parent = manifest
        for key in keys[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            parent[keys[-1]] = draw(JSON)
        elif isinstance(parent, dict):
            del parent[keys[-1]]
    text = json.dumps(manifest)
    if draw(st.booleans()):  # and a few raw bytes changed
        raw = bytearray(text.encode())
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    return text.encode()


@given(data=manifest_bytes())
def test_fuzz_manifest_reader(scratch, data):
    """load_manifest on random bytes, random JSON and mutated manifests: FileFormatError naming
    manifest.json, or a manifest with every field the readers use of the right type."""
    (scratch / "manifest.json").write_bytes(data)
    try:
        manifest = load_manifest(scratch)
    except PretrainError as e:
        assert "manifest.json" in str(e)
        return
    tok = manifest["tokenizer"]
    assert isinstance(tok["name"], str)
    assert all(isinstance(tok[k], str) for k in ("spec", "sha256") if k in tok)
    assert type(tok["n_vocab"]) is int and tok["n_vocab"] > 0 and type(tok["eot_id"]) is int
    for split in ("train", "val"):
        for entry in manifest[split]["shards"]:
            assert (scratch / entry["file"]).parent == scratch and type(entry["tokens"]) is int


# --- configs ---------------------------------------------------------------------------------

KEYS = sorted(flat_dict(JobConfig().to_dict())) + ["model.size"]
SCALARS = (st.integers(-2**66, 2**66) | st.floats(allow_nan=True) | st.booleans()
           | st.text(max_size=12) | st.sampled_from(["tiny", "moe-tiny", "cosine", "fsdp"]))
VALUES = SCALARS | st.lists(SCALARS, max_size=3)


@st.composite
def override(draw) -> str:
    key = draw(st.sampled_from(KEYS) | st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){1,3}", fullmatch=True))
    if draw(st.integers(0, 4)) == 0:  # raw text: TOML or not
        value = draw(st.text(max_size=16))
    else:
        value = toml_value(draw(VALUES)) if draw(st.booleans()) else str(draw(VALUES))
    return f"--{key}={value}"


@st.composite
def config_file(draw) -> bytes:
    """A TOML file: random bytes, random text, or real sections and keys with random values."""
    kind = draw(st.sampled_from(["bytes", "text", "toml", "toml"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    tables: dict[str, list[str]] = {}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=6)):
        table, name = key.rsplit(".", 1)
        value = draw(VALUES)
        try:
            tables.setdefault(table, []).append(f"{name} = {toml_value(value)}")
        except PretrainError:  # a lone surrogate: not writable as TOML at all
            continue
    return "".join(f"[{t}]\n" + "\n".join(lines) + "\n" for t, lines in tables.items()).encode()


@given(data=config_file(), overrides=st.lists(override(), max_size=4))
def test_fuzz_config_loader(scratch, data, overrides):
    """load_config on random and half-valid TOML files with random --section.key=value
    overrides: ConfigError naming the file or key, or a config that saves to config.toml and
    loads back to the same config."""
    path = scratch / "job.toml"
    path.write_bytes(data)
    try:
        cfg = load_config(path, overrides)
    except PretrainError:
        return
    try:
        text = to_toml(cfg)
    except PretrainError as e:  # only a string that is not valid Unicode cannot be saved
        assert "not valid Unicode" in str(e)
        return
    (scratch / "saved.toml").write_text(text, encoding="utf-8")
    assert to_toml(load_config(scratch / "saved.toml")) == text
