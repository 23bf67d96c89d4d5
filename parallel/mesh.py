"""The device mesh: how the world of processes splits into pipeline, data, tensor and expert
parallelism.

    world = pp x dp_replicate x dp_shard x tp

One 5-D mesh, outermost first (tp innermost so its heavy traffic stays inside a node; pp
outermost so only the light stage-to-stage traffic crosses nodes):

    ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "tp")

with dp_shard = dp_shard_mod_ep x dp_shard_in_ep, and flattened views:

    dp_shard  FSDP of the dense weights          dp     data loader, DDP (all data-parallel dims)
    ep        the experts' shards: dp_shard_in_ep x tp
    stage     every rank of one pipeline stage (dp_replicate x dp_shard x tp): MoE loads

Expert parallelism borrows its ranks, as torchtitan does, instead of owning a mesh dimension:
from dp_shard (ep / tp of them) and, under tensor parallelism, from the whole TP group. A
dimension of its own would multiply the world size for a part of the model that holds a few
percent of the FLOPs; borrowed, the ep ranks keep doing data parallelism for the dense weights
(each reads its own batch), and the experts are FSDP-sharded over the ranks left over
(dp_shard_mod_ep, plus dp_replicate for HSDP). Under TP each rank routes its own sequence
shard (parallel/tensor_parallel.py): experts stay whole and the TP group is part of the EP group.

`check_parallel` validates a config against the world size and the model before anything is
started, so a bad mesh fails in a second with a message naming the fields instead of hanging
in a collective. The combinations still refused, each with its reason, are the `fail` calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from common.errors import PretrainError
from job_config import JobConfig

NAMES = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "tp")
SINGLE_STAGE_SCHEDULES = ("1F1B", "GPipe")
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "InterleavedZeroBubble")


class ParallelConfigError(PretrainError, ValueError):
    pass


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int = 1
    pp: int = 1
    stages_per_rank: int = 1  # pipeline stages (model chunks) per pp rank: > 1 interleaves

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def ep_dp(self) -> int:
        """Data-parallel ranks inside one expert-parallel group (ep / tp under TP)."""
        return self.ep // self.tp if self.ep > 1 else 1

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard // self.ep_dp, self.ep_dp, self.tp)


def check_parallel(cfg: JobConfig, world_size: int) -> ParallelDims:
    """Resolve dp_shard = -1 and check every divisibility the run relies on; raise
    ParallelConfigError naming the fields otherwise. Touches no process group."""
    p, m, t = cfg.parallel, cfg.model, cfg.train

    def fail(msg: str) -> None:
        raise ParallelConfigError(f"parallel config for world size {world_size}: {msg}")

    rest = p.pp * p.dp_replicate * p.tp
    if world_size % rest:
        fail(f"parallel.pp ({p.pp}) x dp_replicate ({p.dp_replicate}) x tp ({p.tp}) = {rest} "
             f"does not divide the world size {world_size}")
    dp_shard = world_size // rest if p.dp_shard == -1 else p.dp_shard
    if rest * dp_shard != world_size:
        fail(f"parallel.pp ({p.pp}) x dp_replicate ({p.dp_replicate}) x dp_shard ({dp_shard}) "
             f"x tp ({p.tp}) = {rest * dp_shard}, not the world size {world_size} "
             f"(set parallel.dp_shard = -1 to fill the rest)")
    dp = p.dp_replicate * dp_shard
    model_parallel = p.tp > 1 or p.ep > 1 or p.pp > 1
    if p.engine == "deepspeed" and (model_parallel or p.dp_replicate > 1):
        fail("parallel.engine = 'deepspeed' runs ZeRO over one flat data-parallel group; set "
             "parallel.tp, ep, pp and dp_replicate to 1 (or use the native engine)")
    if p.data_parallel == "ddp" and model_parallel and dp > 1:
        fail("parallel.data_parallel = 'ddp' replicates plain tensors only; with tp, ep or pp "
             "use 'fsdp' (FSDP2 shards DTensor parameters; parallel.dp_shard = 1 with "
             "dp_replicate = N replicates them like DDP)")
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
        if m.is_moe and (p.ep < p.tp or p.ep % p.tp):
            fail(f"MoE layers under parallel.tp = {p.tp} keep each expert whole and shard the "
                 f"experts over the tensor-parallel group: set parallel.ep to a multiple of "
                 f"{p.tp} (now {p.ep})")
        if m.is_moe and (m.n_shared_experts * m.expert_hidden) % p.tp:
            fail(f"parallel.tp = {p.tp} does not divide the shared experts' hidden size "
                 f"model.n_shared_experts x expert_hidden = {m.n_shared_experts * m.expert_hidden}")
    if p.ep > 1:
        if not m.is_moe:
            fail(f"parallel.ep = {p.ep} but the model has no experts (model.n_experts = 0)")
        if p.ep % p.tp:
            fail(f"parallel.ep = {p.ep} is not a multiple of parallel.tp = {p.tp} (expert "
                 f"parallelism spans whole tensor-parallel groups)")
        if dp_shard % (p.ep // p.tp):
            fail(f"parallel.ep = {p.ep} borrows ep / tp = {p.ep // p.tp} ranks from dp_shard = "
                 f"{dp_shard}, which it does not divide")
        if m.n_experts % p.ep:
            fail(f"parallel.ep = {p.ep} does not divide model.n_experts = {m.n_experts}")
    stages_per_rank = 1
    if p.pp > 1:
        multi = p.pp_schedule in MULTI_STAGE_SCHEDULES
        if not multi and p.pp_schedule not in SINGLE_STAGE_SCHEDULES:
            fail(f"parallel.pp_schedule = {p.pp_schedule!r}: expected one of "
                 f"{SINGLE_STAGE_SCHEDULES + MULTI_STAGE_SCHEDULES}")
        stages_per_rank = (p.pp_stages_per_rank or 2) if multi else 1
        if not multi and p.pp_stages_per_rank > 1:
            fail(f"parallel.pp_schedule = {p.pp_schedule!r} runs one stage per rank; "
                 f"parallel.pp_stages_per_rank = {p.pp_stages_per_rank} needs an interleaved one")
        n_stages = p.pp * stages_per_rank
        if m.n_layers < n_stages:
            fail(f"{n_stages} pipeline stages (parallel.pp = {p.pp} x {stages_per_rank} per "
                 f"rank) for model.n_layers = {m.n_layers}: each stage needs a layer")
        if t.batch_size % (t.micro_batch_size * dp) == 0:
            n_micro = t.batch_size // (t.micro_batch_size * dp)
            if p.pp_schedule == "1F1B" and n_micro < p.pp:
                fail(f"1F1B needs at least parallel.pp = {p.pp} micro-batches per step, got "
                     f"{n_micro} (train.batch_size / (micro_batch_size x data-parallel ranks))")
            rounds = max(1, n_micro // p.pp)
            if multi and n_micro % rounds:
                fail(f"{p.pp_schedule} needs the micro-batches per step ({n_micro}) to be a "
                     f"multiple of {rounds} (micro-batches // parallel.pp)")
        if t.eval_tasks and t.eval_every:
            fail("train.eval_tasks with parallel.pp > 1: no rank holds the whole model; score "
                 "the checkpoints with python -m eval")
    if t.batch_size % (t.micro_batch_size * dp):
        fail(f"train.batch_size = {t.batch_size} is not a multiple of train.micro_batch_size "
             f"({t.micro_batch_size}) x data-parallel ranks ({dp})")
    return ParallelDims(world_size, p.dp_replicate, dp_shard, p.tp, p.ep, p.pp, stages_per_rank)


@dataclass
class MeshInfo:
    """The mesh and this rank's place in it. mesh is None in a one-process run."""

    dims: ParallelDims
    mesh: DeviceMesh | None
    dp_rank: int
    dp_size: int
    # Flattened dims are kept here (slicing them from the root mesh is deprecated).
    flat: dict[str, DeviceMesh] = field(default_factory=dict)

    def _dim(self, name: str, size: int) -> DeviceMesh | None:
        return self.mesh[name] if self.mesh is not None and size > 1 else None

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        return self._dim("tp", self.dims.tp)

    @property
    def pp_mesh(self) -> DeviceMesh | None:
        return self._dim("pp", self.dims.pp)

    @property
    def pp_rank(self) -> int:
        return self.pp_mesh.get_local_rank() if self.pp_mesh is not None else 0

    @property
    def ep_mesh(self) -> DeviceMesh | None:
        return self.flat["ep"] if self.mesh is not None and self.dims.ep > 1 else None

    @property
    def fsdp_mesh(self) -> DeviceMesh | None:
        """1-D ("dp_shard") or 2-D ("dp_replicate", "dp_shard") for HSDP."""
        if self.mesh is None or self.dims.dp == 1:
            return None
        if self.dims.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.flat["dp_shard"]

    @property
    def expert_fsdp_mesh(self) -> DeviceMesh | None:
        """What FSDP shards the expert shards over: the data-parallel ranks outside the ep group
        (the ranks holding the same experts), 2-D for HSDP. Size 1 is kept: the experts must
        stay out of the dense weights' FSDP unit either way."""
        if self.mesh is None or self.dims.dp == 1:
            return None
        if self.dims.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard_mod_ep"]
        return self.mesh["dp_shard_mod_ep"]

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        """All data-parallel ranks as one dimension (DDP, the data loader)."""
        return self.flat["dp"] if self.mesh is not None and self.dims.dp > 1 else None

    @property
    def stage_mesh(self) -> DeviceMesh | None:
        """Every rank of this pipeline stage (all of them without pipelining)."""
        return self.flat["stage"] if self.mesh is not None else None

    @property
    def stage_group(self):
        """The process group of `stage_mesh` (None: the world, in a one-process run)."""
        return self.flat["stage"].get_group() if self.mesh is not None else None

    def describe(self) -> str:
        d = self.dims
        text = (f"world {d.world_size} = pp {d.pp} x dp_replicate {d.dp_replicate} x dp_shard "
                f"{d.dp_shard} x tp {d.tp}")
        if d.ep > 1:
            text += f" (ep {d.ep} = {d.ep_dp} of dp_shard x tp {d.tp})"
        if d.pp > 1:
            text += f" ({d.pp * d.stages_per_rank} pipeline stages)"
        return text + f"; data-parallel rank {self.dp_rank}/{self.dp_size}"


_MESHES: dict[tuple, tuple[object, MeshInfo]] = {}


def build_mesh(dims: ParallelDims, device: torch.device) -> MeshInfo:
    """The DeviceMesh for `dims` (the process group must already be initialized when the world
    has more than one rank). Built once per layout and process group: runs that follow each
    other in one process group (tests) share its subgroups."""
    if dims.world_size == 1:
        return MeshInfo(dims, None, 0, 1)
    key = (dims, device.type)
    cached = _MESHES.get(key)
    if cached is None or cached[0] is not dist.group.WORLD:
        mesh = init_device_mesh(device.type, dims.shape, mesh_dim_names=NAMES)
        flat = {
            "dp_shard": mesh["dp_shard_mod_ep", "dp_shard_in_ep"]._flatten("dp_shard"),
            "dp": mesh["dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep"]._flatten("dp"),
            "ep": mesh["dp_shard_in_ep", "tp"]._flatten("ep"),
            "stage": mesh[NAMES[1:]]._flatten("stage"),
        }
        dp = flat["dp"]
        _MESHES[key] = (dist.group.WORLD, MeshInfo(dims, mesh, dp.get_local_rank(), dp.size(), flat))
    return _MESHES[key][1]
