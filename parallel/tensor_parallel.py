"""Tensor parallelism (Megatron-style) with DTensor, plus sequence parallelism, MoE layers that
route their own sequence shard, and a vocabulary-parallel loss that never gathers the logits.

Per block, on a tp mesh of size P (shapes are per rank):

    x (B, T/P, dim) --attn_norm--> all-gather --> (B, T, dim)
      --wq/wk/wv column-parallel--> local heads (B, T, H/P * hd) --attention-->
      --wo row-parallel--> reduce-scatter --> (B, T/P, dim) + residual
    and the same for a dense MLP (w_gate, w_up column-parallel; w_down row-parallel).

The residual stream is a plain local tensor (B, T/P, dim) between modules, so the norms (RMSNorm
on every token of the shard, Triton kernel or not) run on local tensors with their weights
replicated as plain tensors, and so do the q/k norms on local heads. Each rank's norm-weight
gradient then covers only its tokens (its heads): `replicated_parameter_names` lists them and
parallel/grads.py sums their gradients over the tp group once per step.

MoE layers under TP keep every expert whole: each rank routes its own T/P tokens (the router
is replicated like the norms) and expert parallelism spans the TP group (parallel/mesh.py,
parallel/expert_parallel.py), so tokens reach their experts with one all-to-all and no
all-gather; the shared experts are split like a dense MLP over the flattened tokens. We chose
this over splitting each expert's hidden size across the TP ranks: that would all-gather
every token to every rank, compute a slice of each expert and reduce-scatter the results, for
experts that are already small matrices, and it would leave the routed tokens' traffic
unchanged.

The embedding is vocabulary parallel (rows V/P per rank, reduce-scattered into sequence shards)
and the output matrix is split by vocabulary rows too; `vocab_parallel_loss` computes
cross-entropy from the local logit slice with all-reduces of (N,) vectors, in chunks of rows
when train.fused_loss is on (the chunk's gradients computed at once, as the fused kernel does,
so no (N, V/P) tensor is ever held).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from model.loss import IGNORE_INDEX
from model.moe import MoE


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks of a model or a pipeline stage (ModuleList or ModuleDict)."""
    blocks = model.blocks
    return list(blocks.values()) if isinstance(blocks, nn.ModuleDict) else list(blocks)


def _wait(module: nn.Module, args, output):
    """Forward hook: a row-parallel output (reduce-scattered) arrives as an AsyncCollectiveTensor
    that waits on first use by a PyTorch op; Triton kernels (the fused norms) read its memory
    directly, so the wait happens here (wait_tensor, not .wait(): it keeps the autograd graph)."""
    if isinstance(output, AsyncCollectiveTensor):
        return torch.ops._c10d_functional.wait_tensor(output)
    return output


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `model` (a model.transformer.Transformer or a pipeline stage of one: embed, norm
    and lm_head may be None) in place over `tp_mesh`."""
    if getattr(model, "embed", None) is not None:
        # tokens (B, T) replicated -> rows of the embedding per rank -> local (B, T/P, dim)
        parallelize_module(
            model.embed, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
        )
        model.embed.register_forward_hook(_wait)
    if getattr(model, "lm_head", None) is not None:
        # Never called as a module (the loss reads model.output_weight): only its (V, dim)
        # weight is split by vocabulary rows, like the embedding's.
        parallelize_module(model.lm_head, tp_mesh, ColwiseParallel())
    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    for block in blocks_of(model):
        # Attention.forward(x, cos, sin, doc_ids, cache): only x is a distributed tensor.
        no_layouts = (None, None, None, None)
        plan = {
            "attn": PrepareModuleInput(
                input_layouts=(Shard(1), *no_layouts),
                desired_input_layouts=(Replicate(), *no_layouts),
            ),
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
        }
        if isinstance(block.mlp, MoE):
            if block.mlp.shared is not None:
                # MoE.forward hands the shared experts its flattened local tokens (B*T/P, dim):
                # all-gathered along dim 0 (any token order does for a per-token MLP) and
                # reduce-scattered back.
                plan["mlp.shared"] = PrepareModuleInput(
                    input_layouts=(Shard(0),), desired_input_layouts=(Replicate(),)
                )
                plan["mlp.shared.w_gate"] = ColwiseParallel()
                plan["mlp.shared.w_up"] = ColwiseParallel()
                plan["mlp.shared.w_down"] = RowwiseParallel(output_layouts=Shard(0))
        else:
            plan["mlp"] = gather
            plan["mlp.w_gate"] = ColwiseParallel()
            plan["mlp.w_up"] = ColwiseParallel()
            plan["mlp.w_down"] = RowwiseParallel(output_layouts=Shard(1))
        parallelize_module(block, tp_mesh, plan)
        for name, module in block.named_modules():
            if name.endswith("w_down") or name.endswith("wo"):  # the row-parallel ones
                module.register_forward_hook(_wait)


def replicated_parameter_names(model: nn.Module) -> list[str]:
    """Parameters left plain by `apply_tensor_parallel` (and by expert parallelism): norm
    weights and routers, whose gradients each tp rank computes from its own tokens or heads
    only. Call after both, before FSDP (which makes every parameter a DTensor)."""
    return [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy (+ z-loss) of logits = hidden @ weight.T whose vocabulary is split
    over `group`, in chunks of rows; the forward computes the gradients (when asked for) while
    each chunk's logits are in memory and the backward only scales them.

    hidden: (N, dim), the same rows on every rank; weight: (V/P, dim), this rank's rows
    [start, start + V/P); targets: (N,) global ids. Returns the scalar loss, the same on every
    rank; d hidden is this rank's vocabulary slice's part (the caller sums it over the group).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, start, group, z_loss, chunk, grad_enabled):
        N, n_local = hidden.shape[0], weight.shape[0]
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1).float()
        need = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        grad_h = torch.empty_like(hidden) if need else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for lo in range(0, N, chunk):
            hi = min(lo + chunk, N)
            h = hidden[lo:hi]
            logits = F.linear(h, weight).float()  # (C, V/P), fp32 for the softmax
            # Stable softmax: subtract the global max of each row.
            row_max = logits.max(dim=-1).values
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            exp = (logits - row_max[:, None]).exp_()  # (C, V/P)
            # The target logit lives on exactly one rank; the others contribute 0.
            local_t = targets[lo:hi] - start
            mine = (local_t >= 0) & (local_t < n_local)
            local_t = torch.where(mine, local_t, torch.zeros_like(local_t))
            target_logit = (logits.gather(1, local_t[:, None]).squeeze(1) - row_max) * mine
            both = torch.stack([target_logit, exp.sum(dim=-1)])  # (2, C): one all-reduce
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
            lse = both[1].log() + row_max  # (C,)
            ok = valid[lo:hi].float()
            total += ((lse - both[0] - row_max + z_loss * lse.pow(2)) * ok).sum()
            if need:
                # d mean loss / d logits = (softmax (1 + 2 z lse) - onehot(target)) / count
                scale = ok / count
                grad = exp.div_(both[1][:, None]).mul_((scale * (1 + 2 * z_loss * lse))[:, None])
                grad.scatter_add_(1, local_t[:, None], -(scale * mine)[:, None])
                grad_h[lo:hi] = grad.to(hidden.dtype) @ weight
                grad_w.add_(grad.t() @ h.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.weight_dtype),
                None, None, None, None, None, None)


def vocab_parallel_loss(
    hidden: torch.Tensor, output_weight: DTensor, targets: torch.Tensor, z_loss: float = 0.0,
    fused: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy (+ z-loss) like model.loss.lm_loss, under tensor parallelism.

    hidden: (B, T/P, dim), this rank's sequence shard (the final norm's output); output_weight:
    (V, dim) DTensor sharded on the vocabulary; targets: (B, T) plain tensor, the same on every
    tp rank. fused: in chunks of rows (never the whole (B*T, V/P) logits). Returns a plain
    scalar, the same on every tp rank.
    """
    from kernels.cross_entropy import default_chunk_size

    mesh = output_weight.device_mesh
    if isinstance(hidden, DTensor):
        hidden = hidden.to_local()
    # All-gather the sequence; in backward each rank's gradient is partial (its vocabulary
    # slice only), so it is summed and scattered back to the sequence shards.
    full = (
        DTensor.from_local(hidden, mesh, [Shard(1)])
        .redistribute(mesh, [Replicate()])
        .to_local(grad_placements=[Partial()])
    )
    weight = output_weight.to_local()  # (V/P, dim)
    start = mesh.get_local_rank() * weight.shape[0]
    full = full.flatten(0, 1)  # (B*T, dim)
    n = full.shape[0]
    chunk = default_chunk_size(n, weight.shape[0], full.shape[1]) if fused else n
    with torch.autocast(full.device.type, enabled=False):  # dtypes explicit inside
        dtype = torch.get_autocast_dtype(full.device.type) if torch.is_autocast_enabled(
            full.device.type) else full.dtype
        return _VocabParallelCrossEntropy.apply(
            full.to(dtype), weight.to(dtype), targets.flatten(), start, mesh.get_group(),
            float(z_loss), int(chunk), torch.is_grad_enabled(),
        )
