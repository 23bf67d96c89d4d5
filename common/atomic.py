"""Atomic writes: a file or a directory is either complete on disk or absent, never half-written.

    with atomic_path(out / "model.safetensors") as tmp:   # any writer that takes a path
        save_file(tensors, tmp)
    write_text(out / "config.toml", text)                  # str / bytes / JSON in one call
    with atomic_dir(out_dir) as tmp:                        # a whole directory
        ...write files into tmp...

Every write goes to a temporary name in the same directory (`.NAME.tmp`, hidden, so no reader
globbing `*.bin` or `step_*` ever sees it), is fsynced, renamed over the final name, and the
parent directory is fsynced so the rename itself survives a power cut. A writer that fails
(an exception, e.g. a full disk) removes its temporary and re-raises with the file named; a
killed writer leaves only the hidden temporary, which the next write to the same name replaces.
One writer per final name at a time (the temporary's name is derived from it).

Directories are swapped in with one `renameat2(RENAME_EXCHANGE)` on Linux when the final name
already exists, so there is no moment at which the final name is missing (a `latest` pointer
naming it stays valid throughout); elsewhere the old directory is renamed aside first.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import PretrainError


class AtomicWriteError(PretrainError, OSError):
    """Writing a file failed; the message names the file. Nothing was left at the final name."""


# Libraries that do their own file I/O (safetensors in Rust, torch.save in C++) report a full
# disk as their own exception type; these words in the message mark it as an I/O failure.
_IO_FAILURE = ("I/O error", "os error", "write failed", "failed writing")


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Re-raise an I/O failure inside the block (an OSError, or a library's own exception
    about an I/O error) as AtomicWriteError naming `path`, the file the user knows."""
    try:
        yield
    except AtomicWriteError:
        raise
    except OSError as e:
        raise AtomicWriteError(e.errno, f"writing {path} failed: {e.strerror or e}") from e
    except Exception as e:
        if not any(word in str(e) for word in _IO_FAILURE):
            raise
        raise AtomicWriteError(errno.EIO, f"writing {path} failed: {e}") from e


def fault_point(label: str) -> None:
    """Fault-injection hook (tests/test_faults.py), a no-op unless PRETRAIN_FAULT_LOG is set:
    then each call appends "pid label" to that file, and with PRETRAIN_KILL_AT=N the process
    making the Nth call (over every process logging there; only calls whose label contains
    PRETRAIN_KILL_MATCH when that is set) kills itself with SIGKILL, as a crash would."""
    log = os.environ.get("PRETRAIN_FAULT_LOG")
    if not log:
        return
    with open(log, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one count across processes
        f.write(f"{os.getpid()} {label}\n")
        f.flush()
        kill_at, match = os.environ.get("PRETRAIN_KILL_AT"), os.environ.get("PRETRAIN_KILL_MATCH", "")
        if kill_at:
            f.seek(0)
            if sum(match in line for line in f) == int(kill_at) and match in label:
                os.kill(os.getpid(), signal.SIGKILL)


def temp_path(path: str | Path) -> Path:
    """The temporary name `path` is assembled under: `.NAME.tmp` in the same directory."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp"


def fsync_dir(path: str | Path) -> None:
    """Make renames / creations inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path` under; on success it is fsynced and renamed
    over `path`, on an exception it is removed and the error names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    _remove(tmp)
    fault_point(f"open {path}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer of {path} wrote nothing to {tmp}")
        fault_point(f"written {path}")
        _fsync_file(tmp)
        os.replace(tmp, path)
        fault_point(f"replaced {path}")
        fsync_dir(path.parent)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, AtomicWriteError):
            raise AtomicWriteError(e.errno, f"writing {path} failed: {e.strerror or e}") from e
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


# --- directories ------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this filesystem cannot
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def commit_dir(tmp: str | Path, final: str | Path) -> None:
    """Put the finished directory `tmp` in place at `final` (same parent directory): fsync
    every file under it, then rename (or atomically exchange with an existing `final`, whose
    old contents are then deleted)."""
    tmp, final = Path(tmp), Path(final)
    for root, _, files in os.walk(tmp):
        for name in files:
            _fsync_file(Path(root) / name)
        fsync_dir(root)
    fault_point(f"built {final}")
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        fault_point(f"exchanged {final}")
        shutil.rmtree(tmp)  # now holds the old contents
    else:
        old = final.parent / f".{final.name}.old"
        _remove(old)
        os.rename(final, old)
        fault_point(f"moved aside {final}")
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    fault_point(f"committed {final}")
    fsync_dir(final.parent)


@contextmanager
def atomic_dir(path: str | Path, keep_contents: bool = False) -> Iterator[Path]:
    """Yield a temporary directory to build `path` in; on success it replaces `path`
    (commit_dir), on an exception it is removed. keep_contents: reuse what an earlier stage
    already wrote into the temporary directory (e.g. every rank's checkpoint shards)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    if not keep_contents:
        _remove(tmp)
    tmp.mkdir(exist_ok=True)
    fault_point(f"open {path}")
    try:
        yield tmp
        commit_dir(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, AtomicWriteError):
            raise AtomicWriteError(e.errno, f"writing {path} failed: {e.strerror or e}") from e
        raise


def remove_dir(path: str | Path) -> None:
    """Delete directory `path` so that no reader ever sees it half-deleted: it is renamed to
    a hidden name first (one rename), then removed."""
    path = Path(path)
    gone = path.parent / f".{path.name}.old"
    _remove(gone)
    os.rename(path, gone)
    fault_point(f"removing {path}")
    fsync_dir(path.parent)
    shutil.rmtree(gone, ignore_errors=True)
