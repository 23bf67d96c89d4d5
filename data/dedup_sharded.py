"""Exact and near dedup as partitioned computations: the same decisions as data/dedup.py's
streaming stages (which admit documents one by one in a single process), computed by tasks
that each hold one partition of the state.

Each map task of data/job.py stores the signatures of its documents (`map_arrays`); a scatter
task per map task routes them to P partitions (data/shuffle.py), leaving out documents an
earlier stage removed; a reduce task per partition decides; each map task then reads back the
decisions about its own documents (`decider`). Documents carry global ids that sort in corpus
order, so "the first" is the same whatever the partitioning and the number of workers.

exact_dedup: partition by digest. Within a partition, sort by (digest, gid); all but the first
of each digest are dropped. Memory per reduce task: 16 bytes x documents / P.

near_dedup: partition by LSH band key. The streaming stage drops document d iff, for some band
key of d, the first document with that key (the bucket's first) agrees with d on at least
`verify_threshold` of the MinHash values. So a reduce task groups its (key, gid) entries by key,
forms the pairs (bucket's first, member), fetches the two signatures of each pair from the map
tasks' files and verifies them: a member with a verified pair is dropped; one with candidates
but none verified is a "rejected_candidates". Memory per reduce task: 16 bytes x 14 bands x
documents / P, plus the signatures of the candidate pairs. The verified pairs are the edges of
the duplicate graph; its connected components (data/components.py, across partitions) give
the counters "clusters", "largest_cluster" and "bridged_clusters" of the streaming stage:
every union there joins two components, so the unions are nodes - components, and a dropped
document that bridges k clusters makes k unions, so bridged = nodes - components - dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from data.components import EDGES
from data.dedup import ExactDedup, NearDedup
from data.shuffle import (
    gids,
    local_ids,
    read_partition,
    save_array,
    task_slices,
    write_partitioned,
)

ENTRIES = "entries"  # a scatter task's partitioned file

# A decider answers, for a document that reached the stage: (kept, counters to add one to).
Decider = Callable[[int, bool], tuple[bool, tuple[str, ...]]]


class ShardedExact:
    def __init__(self, stage: ExactDedup):
        self.name = stage.name

    def map_arrays(self, sigs: list[int]) -> dict[str, np.ndarray]:
        return {"digest": np.array(sigs, np.uint64)}

    def scatter(self, tmp: Path, task: int, base: Path, keep: np.ndarray, partitions: int):
        """Route the digests of map task `task` (files in `base`) whose row is kept."""
        rows = np.load(base / f"{self.name}.rows.npy")[keep]
        digest = np.load(base / f"{self.name}.digest.npy")[keep]
        write_partitioned(tmp / ENTRIES, np.stack([digest, gids(task, rows)], axis=1),
                          digest, partitions)

    def reduce(self, tmp: Path, p: int, inputs: list[str], map_dirs: list[str],
               partitions: int) -> dict:
        entries = read_partition([Path(d) / ENTRIES for d in inputs], p, 2)
        digest, gid = entries[:, 0], entries[:, 1]
        order = np.lexsort((gid, digest))
        digest, gid = digest[order], gid[order]
        later = np.zeros(len(gid), bool)
        later[1:] = digest[1:] == digest[:-1]  # not the first with its digest
        save_array(tmp / "dropped.npy", np.sort(gid[later]))
        return {"entries": len(gid), "dropped": int(later.sum())}

    def decider(self, reduce_dirs: list[str], task: int) -> Decider:
        dropped = set(task_slices([Path(d) / "dropped" for d in reduce_dirs], task).tolist())
        return lambda local, has_sig: (local not in dropped, ())

    def finish_counts(self, counts: dict, removed: int, components: dict | None) -> None:
        pass


class ShardedNear:
    def __init__(self, stage: NearDedup):
        self.name = stage.name
        self.threshold = stage.cfg.verify_threshold

    def map_arrays(self, sigs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        if not sigs:
            return {"sig": np.zeros((0, 0), np.uint32), "keys": np.zeros((0, 0), np.uint64)}
        return {"sig": np.stack([s for s, _ in sigs]), "keys": np.stack([k for _, k in sigs])}

    def scatter(self, tmp: Path, task: int, base: Path, keep: np.ndarray, partitions: int):
        """Route one (band key, gid) entry per band of each kept document of map task `task`."""
        rows = np.load(base / f"{self.name}.rows.npy")[keep]
        keys = np.load(base / f"{self.name}.keys.npy")
        keys = keys[keep] if len(keys) else keys  # (docs, bands)
        key = keys.reshape(-1)
        gid = np.repeat(gids(task, rows), keys.shape[1] if keys.ndim == 2 else 0)
        write_partitioned(tmp / ENTRIES, np.stack([key, gid], axis=1), key, partitions)

    def reduce(self, tmp: Path, p: int, inputs: list[str], map_dirs: list[str],
               partitions: int) -> dict:
        entries = np.unique(read_partition([Path(d) / ENTRIES for d in inputs], p, 2), axis=0)
        key, gid = entries[:, 0], entries[:, 1]  # sorted by key, then gid
        first = np.ones(len(key), bool)
        first[1:] = key[1:] != key[:-1]
        bucket_first = gid[np.flatnonzero(first)[np.cumsum(first) - 1]]
        pairs = np.unique(np.stack([bucket_first[~first], gid[~first]], axis=1), axis=0)
        if self.threshold <= 0 or not len(pairs):
            match = np.ones(len(pairs), bool)
        else:
            sig_a = _signatures(map_dirs, self.name, pairs[:, 0])
            sig_b = _signatures(map_dirs, self.name, pairs[:, 1])
            # The streaming stage's test, value for value: np.mean(a == b) >= threshold.
            match = (sig_a == sig_b).mean(axis=1) >= self.threshold
        save_array(tmp / "candidates.npy", np.unique(pairs[:, 1]))
        save_array(tmp / "verified.npy", np.unique(pairs[match, 1]))
        edges = pairs[match]
        both = np.concatenate([edges, edges[:, ::-1]])  # routed for Large-Star
        write_partitioned(tmp / EDGES, both, both[:, 0], partitions)
        return {"entries": len(gid), "pairs": len(pairs), "edges": len(edges)}

    def decider(self, reduce_dirs: list[str], task: int) -> Decider:
        dirs = [Path(d) for d in reduce_dirs]
        verified = set(task_slices([d / "verified" for d in dirs], task).tolist())
        candidates = set(task_slices([d / "candidates" for d in dirs], task).tolist())

        def decide(local: int, has_sig: bool) -> tuple[bool, tuple[str, ...]]:
            if not has_sig:
                return True, ("no_words",)
            if local in verified:
                return False, ()
            return True, ("rejected_candidates",) if local in candidates else ()

        return decide

    def finish_counts(self, counts: dict, removed: int, components: dict | None) -> None:
        """The streaming stage's cluster counters, from the components of the duplicate graph
        (present only when it dropped a document / bridged clusters, as there)."""
        if not removed or components is None:
            return
        counts["clusters"] = components["components"]
        counts["largest_cluster"] = components["largest"]
        bridged = components["nodes"] - components["components"] - removed
        if bridged:
            counts["bridged_clusters"] = bridged


def _signatures(map_dirs: list[str], name: str, gid: np.ndarray) -> np.ndarray:
    """MinHash signatures (len(gid), num_perm) of documents by gid, read from their map tasks'
    files (memory-mapped: only the rows asked for are read)."""
    out = None
    task_of = (gid >> np.uint64(32)).astype(np.int64)
    local = local_ids(gid)
    for task in np.unique(task_of).tolist():
        where = np.flatnonzero(task_of == task)
        base = Path(map_dirs[task])
        rows = np.load(base / f"{name}.rows.npy")
        sig = np.load(base / f"{name}.sig.npy", mmap_mode="r")
        values = np.asarray(sig[np.searchsorted(rows, local[where])])
        if out is None:
            out = np.zeros((len(gid), values.shape[1]), values.dtype)
        out[where] = values
    return out if out is not None else np.zeros((0, 0), np.uint32)


def sharded(stage: Any) -> ShardedExact | ShardedNear:
    """The partitioned version of a global stage."""
    if isinstance(stage, ExactDedup):
        return ShardedExact(stage)
    if isinstance(stage, NearDedup):
        return ShardedNear(stage)
    raise TypeError(
        f"stage {getattr(stage, 'name', stage)!r} decides in document order but has no "
        f"partitioned version (data/dedup_sharded.py); data.prepare runs exact_dedup and "
        f"near_dedup only"
    )
