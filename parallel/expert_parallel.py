"""Expert parallelism: the experts of each MoE layer are split over the ranks of an `ep` process
group and tokens travel to their experts and back with all-to-all.

Each rank routes its own tokens (the router is replicated), sorts the token slots by expert as in
the single-device path, sends each slot to the rank that holds its expert, runs its local experts
on everything it received, and sends the results back, where they are weighted and summed as
usual. Nothing else changes, so EP composes with data parallelism: the ep ranks hold different
data, and the non-expert parameters are data-parallel replicas as before.

Gradients. With DP the loss of rank r is the mean over its own tokens and the global loss is the
mean over ranks, L = (1/W) sum_r L_r; replicated parameters average their gradients over ranks.
A local expert's gradient, however, already sums contributions from the tokens of *every* rank of
its ep group (the all-to-all's backward brings them home): it is sum_{r in ep} dL_r/dtheta. The
right value is 1/ep of that when the ep group is the whole DP world, which the dispatch applies
to the expert weights' gradient. When the world is larger than ep (ep groups replicated over an
outer dp dimension), `sync_expert_grads` then averages the expert shards over that replica group.

What the training loop must do differently (see the functions below):
  - exclude `expert_parameters(model)` from DDP / FSDP (their shards differ per rank),
  - clip with `clip_grad_norm_` here (the norm needs the sum over expert shards of all ranks),
  - save checkpoints from `full_state_dict(model)` and load with `local_state_dict(model, sd)`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.moe import MoE, moe_layers


def check_expert_parallel(n_experts: int, ep_size: int) -> None:
    """Raise a clear error when the experts cannot be split evenly over the ep ranks."""
    if ep_size < 1 or n_experts % ep_size:
        raise ValueError(
            f"model.n_experts = {n_experts} is not divisible by the expert-parallel size "
            f"(parallel.ep) = {ep_size}: every ep rank must hold the same number of experts"
        )


def expert_parallel_groups(
    ep: int, device_type: str = "cpu"
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(ep group, replica group) of this rank from a (dp, ep) device mesh over the world: the ep
    ranks are consecutive (rank // ep shares a group: keep them on one node for fast all-to-all)
    and the replica group joins the ranks holding the same expert shard."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if ep < 1 or world % ep:
        raise ValueError(f"parallel.ep = {ep}: expected a divisor of the world size {world}")
    mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return mesh.get_group("ep"), mesh.get_group("dp")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward is the reverse exchange of the gradients.

    x: (sum(in_splits), ...) rows, in_splits[r] of them for rank r -> (sum(out_splits), ...)."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_in = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(
            grad_in, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group
        )
        return grad_in, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class AllToAllDispatch:
    """Replaces MoE's local expert call: (moe, xs (M, dim) sorted by global expert, counts (E,))
    -> (M, dim) expert outputs in the same order, computed on the ranks owning the experts."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.size = dist.get_world_size(group)

    def __call__(self, moe: MoE, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        P, n_local = self.size, moe.n_local_experts
        # counts (E,) viewed as (P, n_local): row p holds the counts for rank p's experts.
        # Exchange them so each rank learns how many rows it gets from each source, per expert.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(P, n_local)  # row s: from source rank s, per local expert
        send_splits = counts.view(P, n_local).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()

        xr = _AllToAll.apply(xs, recv_splits, send_splits, self.group)  # (M_recv, dim)
        # Received rows are ordered (source rank, local expert); regroup them by local expert.
        local_ids = torch.arange(n_local, device=xs.device).repeat(P)  # (P * n_local,)
        row_expert = local_ids.repeat_interleave(recv_counts.flatten())  # (M_recv,)
        perm = torch.argsort(row_expert, stable=True)
        # Each local expert's gradient sums over the tokens of the whole ep group; scale it to
        # the data-parallel mean (see the module doc). Done on the weights as used, not with a
        # hook on the parameters, so it survives to_empty() and parameter re-wrapping.
        weights = tuple(
            _ScaleGrad.apply(w, 1.0 / P) for w in (moe.w_gate, moe.w_up, moe.w_down)
        )
        yr = moe.experts_forward(xr[perm], recv_counts.sum(0), weights)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return _AllToAll.apply(yr[inverse], send_splits, recv_splits, self.group)


def apply_expert_parallel(
    model: nn.Module, ep_group: dist.ProcessGroup | None
) -> list[nn.Parameter]:
    """Shard the experts of every MoE layer over `ep_group` (rank r keeps experts
    [r * E/ep, (r + 1) * E/ep)) and switch dispatch to all-to-all. Works on a materialized model
    (keeps the slice) or on the meta device before `init_weights` (which then draws the same
    values as the unsharded model). Returns the expert parameters, which must be left out of
    DDP / FSDP. Call before wrapping the model for data parallelism."""
    size, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    experts: list[nn.Parameter] = []
    for name, moe in moe_layers(model):
        if moe.dispatcher is not None:
            raise RuntimeError(f"{name}: expert parallelism is already applied")
        check_expert_parallel(moe.n_experts, size)
        n_local = moe.n_experts // size
        start = rank * n_local
        for attr in ("w_gate", "w_up", "w_down"):
            full = getattr(moe, attr)
            shard = nn.Parameter(full.detach()[start : start + n_local].clone())
            setattr(moe, attr, shard)
            experts.append(shard)
        moe.expert_offset, moe.n_local_experts = start, n_local
        moe.dispatcher = AllToAllDispatch(ep_group)
    return experts


def _ep_layers(model: nn.Module) -> list[MoE]:
    return [m for _, m in moe_layers(model) if isinstance(m.dispatcher, AllToAllDispatch)]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters (empty without expert parallelism)."""
    return [getattr(m, a) for m in _ep_layers(model) for a in ("w_gate", "w_up", "w_down")]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of the sharded expert parameters, e.g. for
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)."""
    ids = {id(p) for p in expert_parameters(model)}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def sync_expert_grads(model: nn.Module, replica_group: dist.ProcessGroup | None) -> None:
    """Average expert gradients over the ranks holding the same shard (the dp ranks outside the
    ep group). Not needed when the ep group spans all data-parallel ranks."""
    if replica_group is None or dist.get_world_size(replica_group) == 1:
        return
    for p in expert_parameters(model):
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, group=replica_group)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip all gradients to a global norm of `max_norm` and return the norm before clipping.

    The replicated parameters have the same (already averaged) gradient on every rank; the expert
    shards differ, so their squared norms are summed over the ep group. Every rank then computes
    the same norm and scales identically. Without expert parallelism this is
    torch.nn.utils.clip_grad_norm_."""
    layers = _ep_layers(model)
    params = [p for p in model.parameters() if p.grad is not None]
    if not layers:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    expert_ids = {id(p) for p in expert_parameters(model)}
    device = params[0].grad.device

    def squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
        return sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=device))

    dense_sq = squared_norm([p.grad for p in params if id(p) not in expert_ids])
    expert_sq = squared_norm([p.grad for p in params if id(p) in expert_ids])
    dist.all_reduce(expert_sq, group=layers[0].dispatcher.group)
    total = (dense_sq + expert_sq).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.to(p.grad.dtype))
    return total


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert tensor gathered to its full (E, ...) shape, the
    same on every rank: what a checkpoint or export should hold. Collective over the ep groups."""
    sd = model.state_dict()
    by_id = {id(p): n for n, p in model.named_parameters()}
    for moe in _ep_layers(model):
        for attr in ("w_gate", "w_up", "w_down"):
            shard = getattr(moe, attr)
            parts = [torch.empty_like(shard) for _ in range(moe.dispatcher.size)]
            dist.all_gather(parts, shard.detach().contiguous(), group=moe.dispatcher.group)
            sd[by_id[id(shard)]] = torch.cat(parts)
    return sd


def local_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Slice a full state dict (e.g. a checkpoint) down to this rank's expert shards, ready for
    model.load_state_dict."""
    local = dict(full)
    by_id = {id(p): n for n, p in model.named_parameters()}
    for moe in _ep_layers(model):
        for attr in ("w_gate", "w_up", "w_down"):
            name = by_id[id(getattr(moe, attr))]
            if full[name].shape[0] != moe.n_experts:
                raise ValueError(
                    f"{name}: expected {moe.n_experts} experts in the checkpoint, "
                    f"found {full[name].shape[0]}"
                )
            local[name] = full[name][moe.expert_offset : moe.expert_offset + moe.n_local_experts]
    return local
