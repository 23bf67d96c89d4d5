"""The device mesh: how the world of processes splits into data, tensor and expert parallelism.

    world = dp_replicate x dp_shard x tp          (ep, for MoE, is carved out of dp_shard)

Mesh dimensions, outermost first (tp innermost so its heavy traffic stays inside a node):

    ("dp_replicate", "dp_shard", "tp")                   ep = 1
    ("dp_replicate", "dp_shard_mod_ep", "ep", "tp")      ep > 1; "dp_shard" is their flattening

plus "dp" = all data-parallel dims flattened (the rank the data loader uses: ranks of one
tensor-parallel group read the same batch). `check_parallel` validates a config against the
world size and the model before anything is started, so a bad mesh fails in a second with a
message naming the fields instead of hanging in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from common.errors import PretrainError
from job_config import JobConfig


class ParallelConfigError(PretrainError, ValueError):
    pass


@dataclass
class ParallelDims:
    world_size: int
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


def check_parallel(cfg: JobConfig, world_size: int) -> ParallelDims:
    """Resolve dp_shard = -1 and check every divisibility the run relies on; raise
    ParallelConfigError naming the fields otherwise. Touches no process group."""
    p, m, t = cfg.parallel, cfg.model, cfg.train

    def fail(msg: str) -> None:
        raise ParallelConfigError(f"parallel config for world size {world_size}: {msg}")

    rest = p.dp_replicate * p.tp
    if world_size % rest:
        fail(f"parallel.dp_replicate ({p.dp_replicate}) x parallel.tp ({p.tp}) = {rest} "
             f"does not divide the world size {world_size}")
    dp_shard = world_size // rest if p.dp_shard == -1 else p.dp_shard
    if p.dp_replicate * dp_shard * p.tp != world_size:
        fail(f"parallel.dp_replicate ({p.dp_replicate}) x dp_shard ({dp_shard}) x tp ({p.tp}) = "
             f"{p.dp_replicate * dp_shard * p.tp}, not the world size {world_size} "
             f"(set parallel.dp_shard = -1 to fill the rest)")
    if p.tp > 1:
        if p.tp > m.n_kv_heads:
            fail(f"parallel.tp = {p.tp} is larger than model.n_kv_heads = {m.n_kv_heads}: each "
                 f"tensor-parallel rank needs at least one key/value head")
        for name in ("n_heads", "n_kv_heads", "ffn_hidden", "vocab_size"):
            if getattr(m, name) % p.tp:
                fail(f"parallel.tp = {p.tp} does not divide model.{name} = {getattr(m, name)}")
        if t.seq_len % p.tp:
            fail(f"parallel.tp = {p.tp} does not divide train.seq_len = {t.seq_len} "
                 f"(sequence parallelism splits the sequence)")
        if m.is_moe:
            fail("parallel.tp > 1 with MoE layers is not supported; use parallel.ep")
        if m.fused_kernels or t.fused_loss:
            fail("parallel.tp > 1 works on DTensors; set model.fused_kernels = false and "
                 "train.fused_loss = false")
        if p.engine == "deepspeed":
            fail("parallel.engine = 'deepspeed' runs ZeRO data parallelism only; set parallel.tp = 1")
        if p.data_parallel == "ddp" and p.dp_replicate * dp_shard > 1:
            fail("parallel.tp > 1 with data parallelism needs parallel.data_parallel = 'fsdp'")
    if p.ep > 1:
        # parallel/expert_parallel.py shards the experts, but composing it here still needs:
        # expert parameters left out of FSDP / DDP, their gradients averaged over the replica
        # ranks, its EP-aware clipping, and checkpoints of gathered experts. Until then a run
        # would silently treat different expert shards as replicas, so it stops here.
        fail(f"parallel.ep = {p.ep}: expert parallelism is not yet composed with parallelize() "
             f"(FSDP/DDP, clipping, checkpoints); use parallel.ep = 1")
        if not m.is_moe:
            fail(f"parallel.ep = {p.ep} but the model has no experts (model.n_experts = 0)")
        if dp_shard % p.ep:
            fail(f"parallel.ep = {p.ep} does not divide dp_shard = {dp_shard}")
        if m.n_experts % p.ep:
            fail(f"parallel.ep = {p.ep} does not divide model.n_experts = {m.n_experts}")
    dp = p.dp_replicate * dp_shard
    if t.batch_size % (t.micro_batch_size * dp):
        fail(f"train.batch_size = {t.batch_size} is not a multiple of train.micro_batch_size "
             f"({t.micro_batch_size}) x data-parallel ranks ({dp})")
    if p.engine == "deepspeed" and p.dp_replicate > 1:
        fail("parallel.engine = 'deepspeed' uses one flat data-parallel group; "
             "set parallel.dp_replicate = 1")
    return ParallelDims(world_size, p.dp_replicate, dp_shard, p.tp, p.ep)


@dataclass
class MeshInfo:
    """The mesh and this rank's place in it. mesh is None in a one-process run."""

    dims: ParallelDims
    mesh: DeviceMesh | None
    dp_rank: int
    dp_size: int
    # Flattened dims are kept here (slicing them from the root mesh is deprecated).
    flat: dict[str, DeviceMesh] = field(default_factory=dict)

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        return self.mesh["tp"] if self.mesh is not None and self.dims.tp > 1 else None

    @property
    def fsdp_mesh(self) -> DeviceMesh | None:
        """1-D ("dp_shard") or 2-D ("dp_replicate", "dp_shard") for HSDP."""
        if self.mesh is None or self.dims.dp == 1:
            return None
        if self.dims.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.flat.get("dp_shard") or self.mesh["dp_shard"]

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        """All data-parallel ranks as one dimension (DDP, the data loader)."""
        return self.flat["dp"] if self.mesh is not None and self.dims.dp > 1 else None

    @property
    def ep_mesh(self) -> DeviceMesh | None:
        return self.mesh["ep"] if self.mesh is not None and self.dims.ep > 1 else None

    def describe(self) -> str:
        d = self.dims
        return (f"world {d.world_size} = dp_replicate {d.dp_replicate} x dp_shard {d.dp_shard} "
                f"x tp {d.tp} (ep {d.ep}); data-parallel rank {self.dp_rank}/{self.dp_size}")


def build_mesh(dims: ParallelDims, device: torch.device) -> MeshInfo:
    """The DeviceMesh for `dims` (the process group must already be initialized when the world
    has more than one rank)."""
    if dims.world_size == 1:
        return MeshInfo(dims, None, 0, 1)
    if dims.ep > 1:
        shape = (dims.dp_replicate, dims.dp_shard // dims.ep, dims.ep, dims.tp)
        names = ("dp_replicate", "dp_shard_mod_ep", "ep", "tp")
    else:
        shape = (dims.dp_replicate, dims.dp_shard, dims.tp)
        names = ("dp_replicate", "dp_shard", "tp")
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    # Flattened views: "dp_shard" (FSDP) when ep splits it, and "dp" (loader, DDP).
    if dims.ep > 1:
        flat = {"dp_shard": mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard"),
                "dp": mesh["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp")}
    else:
        flat = {"dp": mesh["dp_replicate", "dp_shard"]._flatten("dp")}
    dp = flat["dp"]
    return MeshInfo(dims, mesh, dp.get_local_rank(), dp.size(), flat)
