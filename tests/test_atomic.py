"""common/atomic.py: a file or directory is complete at its final name or not there at all,
failures leave nothing behind and name the file, a checkpoint re-save never leaves `latest`
naming a missing directory, and no other module renames files by hand."""

import ast
import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import common.atomic as atomic
from common.atomic import (
    AtomicWriteError,
    atomic_dir,
    atomic_path,
    temp_path,
    write_bytes,
    write_json,
    write_text,
)
from data.shards import read_shard, write_shard
from model.checkpoint import (
    MODEL_FILE,
    checkpoint_dir,
    find_checkpoint,
    load_model_state,
    load_train_state,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def tree(path: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `path` (hidden ones included)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcé€\n 🙂") for _ in range(n))


# --- files ------------------------------------------------------------------------------------


def test_files_round_trip_and_leave_only_the_final_name(tmp_path, seed):
    rng = random.Random(seed)
    data, text = rng.randbytes(rng.randint(0, 5000)), random_text(rng, rng.randint(0, 500))
    obj = {"a": [rng.random() for _ in range(5)], "b": {"c": text}}
    write_bytes(tmp_path / "f.bin", b"old contents")  # replaced below
    write_bytes(tmp_path / "f.bin", data)
    write_text(tmp_path / "sub" / "f.txt", text)  # parent directories are made
    write_json(tmp_path / "f.json", obj)
    with atomic_path(tmp_path / "f.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.arange(rng.randint(1, 99)))
    assert (tmp_path / "f.bin").read_bytes() == data
    assert (tmp_path / "sub" / "f.txt").read_text(encoding="utf-8") == text
    assert json.loads((tmp_path / "f.json").read_text()) == obj
    assert len(np.load(tmp_path / "f.npy")) >= 1
    assert sorted(tree(tmp_path)) == ["f.bin", "f.json", "f.npy", "sub/f.txt"]  # no temporaries


def test_disk_full_inside_the_writer_keeps_the_old_file(tmp_path, seed):
    path = tmp_path / "results.json"
    write_text(path, "old\n")
    with pytest.raises(AtomicWriteError, match="results.json") as e:
        with atomic_path(path) as tmp:
            tmp.write_bytes(random.Random(seed).randbytes(1000))  # half written, then:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.errno == errno.ENOSPC and "No space left" in str(e.value)
    assert path.read_text() == "old\n"
    assert sorted(tree(tmp_path)) == ["results.json"]


def test_a_write_failing_halfway_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    write_text(path, "old\n")

    def half_then_full(self, text, encoding=None, errors=None, newline=None):
        with open(self, "w", encoding=encoding) as f:
            f.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(AtomicWriteError, match=r"manifest\.json.*No space left"):
        write_json(path, {"x": list(range(100))})
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert sorted(tree(tmp_path)) == ["manifest.json"]


def test_fsync_failing_keeps_the_old_shard(tmp_path, monkeypatch, seed):
    # Delayed allocation: a full disk often surfaces only at fsync. The real shard writer.
    rng = np.random.default_rng(seed)
    path = tmp_path / "train_000000.bin"
    old = rng.integers(0, 512, size=100)
    write_shard(path, old, 512)

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(AtomicWriteError, match="train_000000.bin"):
        write_shard(path, rng.integers(0, 512, size=1000), 512)
    monkeypatch.undo()
    assert np.array_equal(read_shard(path), old)
    assert sorted(tree(tmp_path)) == ["train_000000.bin"]


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(AtomicWriteError, match="out.txt.*wrote nothing"):
        with atomic_path(tmp_path / "out.txt"):
            pass
    assert not list(tmp_path.iterdir())


def test_a_killed_writers_temporary_is_replaced(tmp_path):
    path = tmp_path / "f.txt"
    temp_path(path).write_text("left by a killed writer")
    write_text(path, "new")
    assert tree(tmp_path) == {"f.txt": b"new"}


# --- directories ------------------------------------------------------------------------------


@pytest.fixture(params=["exchange", "rename-aside"])
def exchange(request, monkeypatch):
    """Run a test with renameat2(RENAME_EXCHANGE), and with the fallback of a filesystem
    (or OS) without it; yields the list of exchanges that happened."""
    calls = []
    real = atomic._exchange

    def recorded(a, b):
        done = request.param == "exchange" and real(a, b)
        calls.append(done)
        return done

    monkeypatch.setattr(atomic, "_exchange", recorded)
    yield request.param, calls


def test_atomic_dir_replaces_a_directory_and_leaves_nothing_behind(tmp_path, exchange, seed):
    mode, calls = exchange
    rng = random.Random(seed)
    out = tmp_path / "export"
    (out / "old_sub").mkdir(parents=True)
    (out / "a.txt").write_text("old a")
    (out / "old_sub" / "b.bin").write_bytes(b"old b")
    new = {"a.txt": rng.randbytes(100), "sub/c.bin": rng.randbytes(3000)}
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")  # hidden, same filesystem
        for name, data in new.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        assert tree(out) == {"a.txt": b"old a", "old_sub/b.bin": b"old b"}  # untouched so far
    assert tree(out) == new
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary, no old copy
    assert calls == [mode == "exchange"]


def test_atomic_dir_failing_keeps_the_old_directory(tmp_path, exchange):
    out = tmp_path / "export"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("new, half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert tree(out) == {"a.txt": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


# --- checkpoints ------------------------------------------------------------------------------


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g)}


def test_checkpoint_resave_never_leaves_latest_naming_a_missing_directory(
    tmp_path, exchange, monkeypatch, seed
):
    """Save step 7 twice (a resumed run re-saving the step it resumed from) and check, before
    and after every rename, exchange and delete the save makes, that `latest` names a
    directory holding a complete model."""
    mode, calls = exchange
    run = tmp_path / "run"
    first, second = _state(seed), _state(seed + 1)
    save_checkpoint(run, 5, _state(seed + 2), {"step": 5}, {"c": 5})
    save_checkpoint(run, 7, first, {"step": 7}, {"c": 7})
    states = []  # (primitive, what `latest` names, does it hold a complete model)

    def check(what: str) -> None:
        latest = run / "checkpoints" / "latest"
        name = latest.read_text().strip()
        ckpt = run / "checkpoints" / name
        ok = (ckpt / MODEL_FILE).is_file() and set(load_model_state(ckpt)) == {"w", "b"}
        states.append((what, name, ok))

    def watched(name: str, fn):
        def call(*args, **kwargs):
            check(f"before {name}")
            out = fn(*args, **kwargs)
            check(f"after {name}")
            return out

        return call

    monkeypatch.setattr(atomic, "_exchange", watched("exchange", atomic._exchange))
    for mod, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree")):
        monkeypatch.setattr(mod, name, watched(name, getattr(mod, name)))
    save_checkpoint(run, 7, second, {"step": 7, "again": True}, {"c": 7}, keep=1)
    monkeypatch.undo()

    if mode == "exchange":  # renaming aside leaves a window: only the end state is promised
        bad = [s for s in states if not s[2]]
        assert not bad, f"`latest` named an incomplete checkpoint at {bad}"
    assert calls == [mode == "exchange"]  # the re-save swapped directories (once)
    ckpt = find_checkpoint(run)
    assert ckpt == checkpoint_dir(run, 7)
    assert all(torch.equal(load_model_state(ckpt)[k], second[k]) for k in second)
    assert load_train_state(ckpt) == {"step": 7, "again": True}
    # keep=1 pruned step 5; no temporary or old copy is left beside the checkpoints.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000007"]


def test_checkpoint_keeps_what_other_ranks_wrote_into_its_temporary(tmp_path):
    # parallel/checkpoint_dcp.py: every rank writes its shards into temp_path(final) first.
    run = tmp_path / "run"
    tmp = temp_path(checkpoint_dir(run, 3))
    (tmp / "dcp").mkdir(parents=True)
    (tmp / "dcp" / "__0_0.distcp").write_bytes(b"rank 0 shard")
    save_checkpoint(run, 3, _state(0), {"step": 3}, {}, keep_temp_contents=True)
    assert (checkpoint_dir(run, 3) / "dcp" / "__0_0.distcp").read_bytes() == b"rank 0 shard"
    # Without keep_temp_contents a stale temporary (a killed save) is discarded.
    (tmp / "dcp").mkdir(parents=True)
    (tmp / "dcp" / "stale").write_bytes(b"from a killed save")
    save_checkpoint(run, 3, _state(1), {"step": 3}, {})
    assert not (checkpoint_dir(run, 3) / "dcp").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000003"]


# --- no hand-written renames ------------------------------------------------------------------

RENAMES = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move")}


def hand_written_renames(source: str) -> list[str]:
    """`os.replace` / `os.rename` / `os.renames` / `shutil.move` calls or imports, and
    `Path.rename` / `Path.replace` calls (one positional argument: str.replace takes two)."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "shutil"):
            hits += [f"line {node.lineno}: from {node.module} import {a.name}"
                     for a in node.names if (node.module, a.name) in RENAMES]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        f = node.func
        if isinstance(f.value, ast.Name) and (f.value.id, f.attr) in RENAMES:
            hits.append(f"line {node.lineno}: {f.value.id}.{f.attr}")
        elif f.attr == "rename" or (
            f.attr == "replace" and len(node.args) == 1 and not node.keywords
            and not (isinstance(f.value, ast.Name) and f.value.id == "dataclasses")
        ):
            hits.append(f"line {node.lineno}: .{f.attr}(...)")
    return hits


def test_the_rename_detector_finds_renames():
    assert hand_written_renames("import os\nos.replace(a, b)\n") == ["line 2: os.replace"]
    assert len(hand_written_renames("from shutil import move\nmove(a, b)")) == 1
    assert len(hand_written_renames("p.with_suffix('.tmp').rename(p)")) == 1
    assert len(hand_written_renames("tmp.replace(path)")) == 1
    assert hand_written_renames("s.replace('a', 'b'); dataclasses.replace(x)") == []


def test_no_module_renames_files_outside_common_atomic():
    """Every atomic write goes through common/atomic.py (torch.distributed.checkpoint and
    DeepSpeed keep their own writers, inside our temporary directory)."""
    files = [
        p for p in REPO.rglob("*.py")
        if not any(part.startswith(".") or part in ("build", "__pycache__")
                   for part in p.relative_to(REPO).parts)
    ]
    assert len(files) > 50, f"found only {len(files)} Python files under {REPO}"
    found = {
        str(p.relative_to(REPO)): hits
        for p in files
        if p != REPO / "common" / "atomic.py" and p != Path(__file__).resolve()
        and (hits := hand_written_renames(p.read_text(encoding="utf-8")))
    }
    assert not found, f"write through common/atomic.py instead: {found}"
