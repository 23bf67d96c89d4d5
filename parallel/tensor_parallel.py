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

from model.loss import Reductions, chunked_cross_entropy, default_chunk_size
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


class _GroupReductions(Reductions):
    """ChunkedCrossEntropy's row reductions over the TP group (the vocabulary's slices)."""

    def __init__(self, group):
        self.max_ = lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        self.sum_ = lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


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
    return chunked_cross_entropy(full, weight, targets.flatten(), z_loss, chunk, start,
                                 _GroupReductions(mesh.get_group()))
