"""A file-based shuffle for the sharded stages of data.prepare (dedup, connected components).

A task that produces rows for the next step writes ONE file: a uint64 array (rows, columns)
sorted by destination partition (then by row), and the partition boundaries beside it
(`NAME.npy`, `NAME.offsets.npy`, P + 1 entries), as Spark's sort-based shuffle does. Partition p
of the next step reads slice p of every producer's file (memory-mapped: only that slice is
read). M producers and P partitions make M files, not M x P.

Documents are named by a global id that sorts in corpus order: gid = map task << 32 | index of
the document in its task (uint64). Results that go back to the map tasks (which documents a
dedup partition dropped) are files of sorted gids; task t reads its range [t << 32, t+1 << 32).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from data.normalize import mix64

TASK_SHIFT = 32


def gids(task: int, local: np.ndarray) -> np.ndarray:
    """Global ids of documents `local` (indices in their map task) of map task `task`."""
    return (np.uint64(task) << np.uint64(TASK_SHIFT)) | local.astype(np.uint64)


def local_ids(gid: np.ndarray) -> np.ndarray:
    return (gid & np.uint64((1 << TASK_SHIFT) - 1)).astype(np.int64)


def partition_of(values: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of each uint64 value (hashed first: gids and keys alike spread evenly)."""
    return (mix64(values.astype(np.uint64)) % np.uint64(partitions)).astype(np.int64)


def save_array(path: Path, array: np.ndarray) -> None:
    """Written into a task's temporary directory, which data/tasks.py commits as a whole
    (fsync, rename): no file of it is ever seen half-written."""
    with open(path, "wb") as f:
        np.save(f, array)


def write_partitioned(path: Path, rows: np.ndarray, by: np.ndarray, partitions: int) -> None:
    """Write `rows` (n, k) uint64 to `path` grouped by partition_of(by) (n,), each partition's
    rows sorted, with the partition offsets in `path`.offsets.npy."""
    rows = np.asarray(rows, np.uint64)  # (n, k)
    part = partition_of(by, partitions)
    # Sort by partition, then by the row's columns (first column most significant).
    order = np.lexsort([rows[:, c] for c in range(rows.shape[1] - 1, -1, -1)] + [part])
    rows, part = rows[order], part[order]
    offsets = np.searchsorted(part, np.arange(partitions + 1), side="left").astype(np.int64)
    save_array(path.with_name(path.name + ".offsets.npy"), offsets)
    save_array(path.with_name(path.name + ".npy"), rows)


def read_partition(paths: Iterable[Path], p: int, columns: int) -> np.ndarray:
    """Slice p of every producer's partitioned file, concatenated: (rows, columns) uint64."""
    parts = []
    for path in paths:
        offsets = np.load(path.with_name(path.name + ".offsets.npy"))
        if offsets[p + 1] > offsets[p]:
            rows = np.load(path.with_name(path.name + ".npy"), mmap_mode="r")
            parts.append(np.asarray(rows[offsets[p] : offsets[p + 1]]))
    if not parts:
        return np.zeros((0, columns), np.uint64)
    return np.concatenate(parts)


def task_slice(path: Path, task: int) -> np.ndarray:
    """The local indices of map task `task` among the sorted gids in `path`.npy."""
    array = np.load(path.with_name(path.name + ".npy"), mmap_mode="r")
    bounds = np.array([task << TASK_SHIFT, (task + 1) << TASK_SHIFT], np.uint64)
    lo, hi = np.searchsorted(array, bounds)
    return local_ids(np.asarray(array[lo:hi]))


def task_slices(paths: Iterable[Path], task: int) -> np.ndarray:
    """Sorted unique local indices of map task `task` over several sorted-gid files."""
    parts = [task_slice(path, task) for path in paths]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
