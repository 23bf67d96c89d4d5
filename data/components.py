"""Connected components of a graph whose edges are spread over partitions, with no process
holding all edges: the alternating Large-Star / Small-Star algorithm of Kiveris et al.,
"Connected Components in MapReduce and Beyond" (SoCC 2014), the one GraphFrames runs on Spark.

Nodes are uint64 ids. Each round is P tasks; task p reads the edges routed to the nodes of
partition p (data/shuffle.py), and routes its output edges to the next round's owners:

- Large-Star: node u with neighbors N(u) and m = min(N(u) + {u}) links every neighbor v > u to
  m instead of u. An edge (a < b) is seen by both ends and emitted once, by a, as (b, m(a)).
- Small-Star: node u with its smaller neighbors S(u) and m = min(S(u)) links S(u) + {u} to m.
  An edge is seen only by its larger end.

A round that changes nothing says so: Large-Star changes nothing iff every edge's smaller end
is smaller than all its neighbors; Small-Star iff every node has at most one smaller neighbor.
Both on the same graph mean every edge touches its component's minimum: the graph is a set of
stars, one per component, centered on the component's smallest node. O(log^2 n) rounds in the
worst case, a few in practice. A last pass counts each star: components, nodes, largest size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from data.shuffle import read_partition, write_partitioned

EDGES = "edges"  # the file every round's task writes (and the producers of round 0)


def _groups(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For (u, v) rows sorted by u: a mask of each u's first row, and each row's group start."""
    start = np.ones(len(rows), bool)
    start[1:] = rows[1:, 0] != rows[:-1, 0]
    return start, np.flatnonzero(start)[np.cumsum(start) - 1]


def large_star(rows: np.ndarray) -> tuple[np.ndarray, bool]:
    """rows: (owner u, neighbor v), every edge in both directions. -> edges (v, m(u)), changed."""
    rows = np.unique(rows, axis=0)  # sorted by u, then v: a group's first v is its minimum
    u, v = rows[:, 0], rows[:, 1]
    _, first = _groups(rows)
    m = np.minimum(u, v[first])
    larger = v > u
    return np.stack([v[larger], m[larger]], axis=1), bool(np.any(m[larger] != u[larger]))


def small_star(rows: np.ndarray) -> tuple[np.ndarray, bool]:
    """rows: (owner u, smaller neighbor v). -> edges (x, m(u)) for x in S(u) + {u}, changed."""
    rows = np.unique(rows, axis=0)
    u, v = rows[:, 0], rows[:, 1]
    start, first = _groups(rows)
    m = v[first]
    relink = v != m
    edges = np.concatenate([np.stack([v[relink], m[relink]], axis=1),
                            np.stack([u[start], m[start]], axis=1)])
    return edges, bool(len(rows) > start.sum())


def round_task(tmp: Path, kind: str, p: int, inputs: list[str], partitions: int) -> dict:
    """One round's task for partition p: read its edges, write the next round's."""
    rows = read_partition([Path(d) / EDGES for d in inputs], p, 2)
    if kind == "large":
        edges, changed = large_star(rows)  # (b, m) with b > m: Small-Star's owner is b
        write_partitioned(tmp / EDGES, edges, edges[:, 0], partitions)
    else:
        edges, changed = small_star(rows)
        both = np.concatenate([edges, edges[:, ::-1]])  # Large-Star sees both ends
        write_partitioned(tmp / EDGES, both, both[:, 0], partitions)
    return {"changed": changed, "edges": len(edges)}


def count_task(tmp: Path, p: int, inputs: list[str], partitions: int) -> dict:
    """Stars whose center falls in partition p: their number, nodes and the largest size."""
    rows = np.unique(read_partition([Path(d) / EDGES for d in inputs], p, 2), axis=0)
    if not len(rows):
        return {"components": 0, "nodes": 0, "largest": 0}
    start, first = _groups(rows)
    sizes = np.diff(np.append(np.flatnonzero(start), len(rows))) + 1  # neighbors + itself
    center = rows[start, 0] < rows[start, 1]  # smaller than its smallest neighbor
    return {"components": int(center.sum()), "nodes": int(sizes[center].sum()),
            "largest": int(sizes[center].max(initial=0))}


def connected_components(
    run_stage: Callable[[str, Callable, list[tuple]], list[dict]],
    task_dir: Callable[[str, int], str],
    inputs: list[str],
    partitions: int,
) -> dict:
    """Alternate rounds until neither changes the graph, then count the stars.

    `inputs`: the directories of the producers of the first round's edges, each holding an
    `edges` file routed for Large-Star (both directions). `run_stage(name, fn, jobs)` runs one
    task per job (fn(tmp, *job)) and returns their results; `task_dir(name, p)` is where task p
    of stage `name` left its files. -> {"components", "nodes", "largest", "rounds"}.
    """
    rounds = 0
    while True:
        changed = False
        for kind in ("large", "small"):
            name = f"components_{rounds:03d}_{kind}"
            results = run_stage(name, round_task,
                                [(kind, p, inputs, partitions) for p in range(partitions)])
            changed |= any(r["changed"] for r in results)
            inputs = [task_dir(name, p) for p in range(partitions)]
        rounds += 1
        if not changed:
            break
    counts = run_stage("components_count", count_task,
                       [(p, inputs, partitions) for p in range(partitions)])
    return {"components": sum(c["components"] for c in counts),
            "nodes": sum(c["nodes"] for c in counts),
            "largest": max((c["largest"] for c in counts), default=0), "rounds": rounds}
