"""Expert parallelism: the experts of each MoE layer are split over the ranks of the `ep` mesh and
tokens travel to their experts and back with all-to-all.

Each rank routes its own tokens (the router is replicated), sorts the token slots by expert as in
the single-device path, sends each slot to the rank that holds its expert, runs its local experts
on everything it received, and sends the results back, where they are weighted and summed as
usual. The stacked expert weights (E, ...) become DTensors sharded on dim 0 over the ep mesh, so
checkpoints (DCP) know their global shape and reshard them to any other ep size, FSDP shards
them further over the ranks holding the same experts (parallel/parallelize.py), and clipping
counts each shard once (parallel/grads.py).

Gradients. With data parallelism the loss of data-parallel rank d is the mean over its tokens and
the global loss is the mean over the DP ranks, L = (1/DP) sum_d L_d; replicated parameters average
their gradients over the DP ranks. A local expert's gradient, however, already sums the
contributions of the tokens of *every* rank of its ep group (the all-to-all's backward brings
them home). The ep group holds ep_dp = ep / tp data-parallel ranks (the tp ranks of one DP rank
route shards of the same sequences: their parts add up to that rank's gradient), so the dispatch
scales the expert weights' gradient by 1 / ep_dp; FSDP then averages it over the ranks holding
the same experts (DP / ep_dp of them), which makes the mean over all DP ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from model.moe import MoE, moe_layers

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def check_expert_parallel(n_experts: int, ep_size: int) -> None:
    """Raise a clear error when the experts cannot be split evenly over the ep ranks."""
    if ep_size < 1 or n_experts % ep_size:
        raise ValueError(
            f"model.n_experts = {n_experts} is not divisible by the expert-parallel size "
            f"(parallel.ep) = {ep_size}: every ep rank must hold the same number of experts"
        )


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

    def __init__(self, mesh: DeviceMesh, grad_scale: float):
        self.mesh, self.group = mesh, mesh.get_group()
        self.size = mesh.size()
        self.grad_scale = grad_scale

    def __call__(self, moe: MoE, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # This rank's experts as plain tensors (E/P, ...); the gradient is scaled to the
        # data-parallel mean (see the module doc) on the weights as used.
        weights = tuple(
            _ScaleGrad.apply(getattr(moe, name).to_local(), self.grad_scale)
            for name in EXPERT_WEIGHTS
        )
        P, n_local = self.size, weights[0].shape[0]
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
        yr = moe.experts_forward(xr[perm], recv_counts.sum(0), weights)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return _AllToAll.apply(yr[inverse], send_splits, recv_splits, self.group)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, grad_scale: float) -> None:
    """Shard the experts of every MoE layer over `ep_mesh` (rank r keeps experts
    [r * E/ep, (r + 1) * E/ep) as a DTensor Shard(0)) and switch dispatch to all-to-all.
    Works on the meta device (parallel/meta_init.py then draws each shard's values) or on a
    materialized model (keeps the slice). grad_scale: 1 / (data-parallel ranks in the ep
    group). Call before FSDP."""
    size, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    for name, moe in moe_layers(model):
        if moe.dispatcher is not None:
            raise RuntimeError(f"{name}: expert parallelism is already applied")
        check_expert_parallel(moe.n_experts, size)
        n_local = moe.n_experts // size
        for attr in EXPERT_WEIGHTS:
            full = getattr(moe, attr)
            local = full.detach()[rank * n_local : (rank + 1) * n_local]
            local = local if full.is_meta else local.clone()
            shard = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False,
                                       shape=full.shape, stride=full.stride())
            setattr(moe, attr, nn.Parameter(shard, requires_grad=full.requires_grad))
        moe.dispatcher = AllToAllDispatch(ep_mesh, grad_scale)


def expert_parallel_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers whose experts expert parallelism shards (empty without it)."""
    return [m for _, m in moe_layers(model) if isinstance(m.dispatcher, AllToAllDispatch)]
