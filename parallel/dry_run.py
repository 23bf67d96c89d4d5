"""`train.py --config C --dry-run --world-size N`: the mesh and every rank's parameter, gradient
and optimizer memory for a world of N ranks, in seconds, on any machine, allocating nothing.

The real setup runs (check_parallel, the mesh, build_parallel_model: pipeline split, TP, EP,
FSDP) with the model on the meta device and a fake process group (PyTorch's "fake" backend:
collectives return at once), once per pipeline stage, as that stage's first rank. Every rank's
share then follows from each parameter's global shape and placements on the mesh (the way
DTensor computes local shards). Counted: fp32 parameters, fp32 gradients and AdamW's two fp32
moments, per rank; not counted: activations, FSDP's all-gathered units, communication buffers.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from job_config import JobConfig
from parallel.mesh import NAMES, ParallelDims, build_mesh, check_parallel

GIB = 2**30


@functools.cache
def _shard_numel(shape: tuple, mesh_shape: tuple, coordinate: tuple, placements: tuple) -> int:
    """Elements of a tensor of global `shape` held at `coordinate` of a mesh (cached: the
    layers' parameters repeat a few shapes, and this is most of a dry run's time)."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    local, _ = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coordinate), placements)
    return int(torch.Size(local).numel())


def _local_numels(p: torch.Tensor, ranks: list[int]) -> dict[int, int]:
    """rank -> elements of p it holds (ranks outside p's mesh hold none; a plain tensor is held
    whole by every rank of `ranks`)."""
    if not isinstance(p, DTensor):
        return {r: p.numel() for r in ranks}
    mesh = p.device_mesh
    coordinates = {int(r): tuple(c) for *c, r in _rank_coordinates(mesh.mesh)}
    return {r: _shard_numel(tuple(p.shape), tuple(mesh.shape), coordinates[r], tuple(p.placements))
            for r in ranks if r in coordinates}


def _rank_coordinates(layout: torch.Tensor) -> list[list[int]]:
    """[*coordinate, rank] of every entry of a mesh's rank layout."""
    index = torch.stack(torch.meshgrid(*[torch.arange(n) for n in layout.shape], indexing="ij"), -1)
    return torch.cat([index.reshape(-1, layout.dim()), layout.reshape(-1, 1)], 1).tolist()


def _stage_report(cfg: JobConfig, dims: ParallelDims, stage: int) -> dict[int, int]:
    """rank -> parameters it holds, for the ranks of pipeline stage `stage` (built as its
    first rank in a fake process group)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from parallel.build import build_parallel_model

    per_stage = dims.world_size // dims.pp
    ranks = list(range(stage * per_stage, (stage + 1) * per_stage))  # pp is the outer dim
    dist.init_process_group("fake", store=FakeStore(), rank=ranks[0], world_size=dims.world_size)
    try:
        mesh = build_mesh(dims, torch.device("cpu"))
        pm = build_parallel_model(cfg, mesh, torch.device("cpu"), materialize_weights=False)
        counts = dict.fromkeys(ranks, 0)
        for _, p in pm.raw.named_parameters():
            for r, n in _local_numels(p, ranks).items():
                counts[r] += n
        return counts
    finally:
        dist.destroy_process_group()


def dry_run(cfg: JobConfig, world_size: int) -> str:
    """The report (mesh, per-rank memory) as text. Raises ParallelConfigError on a bad mesh."""
    t0 = time.perf_counter()
    if dist.is_initialized():
        raise RuntimeError("--dry-run starts its own (fake) process group: run it without torchrun")
    dims = check_parallel(cfg, world_size)
    cfg.train.compile = False  # no memory of its own; skipping it skips importing the compiler
    m = cfg.model
    lines = [
        f"dry run: {m.num_params() / 1e9:.3f}B parameters "
        f"({m.num_params(active=True) / 1e9:.3f}B active per token), world size {world_size}",
        "mesh " + " x ".join(f"{n} {s}" for n, s in zip(NAMES, dims.shape))
        + f" | ep {dims.ep} | {dims.pp * dims.stages_per_rank} pipeline stage(s) | data "
        f"parallel {cfg.parallel.data_parallel} over {dims.dp} ranks",
        "per rank (GiB): parameters fp32 | gradients fp32 | AdamW moments | total",
    ]
    counts: dict[int, int] = {}
    for stage in range(dims.pp):
        counts.update(_stage_report(cfg, dims, stage))
    total = sum(counts.values()) / dims.world_size  # mean parameters per rank
    # Consecutive ranks holding about the same amount (FSDP's uneven last rows differ by a few
    # elements) share a line showing the largest of them.
    groups: list[list[int]] = []
    for r in sorted(counts):
        if groups and abs(counts[groups[-1][0]] - counts[r]) <= 1e-3 * counts[r]:
            groups[-1].append(r)
        else:
            groups.append([r])
    for g in groups:
        n = max(counts[r] for r in g)
        name = f"rank {g[0]}" if len(g) == 1 else f"ranks {g[0]}-{g[-1]}"
        lines.append(f"  {name:>13}: {n * 4 / GIB:8.2f} | {n * 4 / GIB:8.2f} | {n * 8 / GIB:8.2f} "
                     f"| {n * 16 / GIB:8.2f}   ({n / 1e6:.1f}M parameters)")
    lines.append(f"mean {total / 1e6:.1f}M parameters per rank, {total * 16 / GIB:.2f} GiB of "
                 f"states; activations not counted; {time.perf_counter() - t0:.1f} s")
    return "\n".join(lines)
