"""Tensor parallelism (Megatron-style) with DTensor, plus sequence parallelism and a
vocabulary-parallel loss that never gathers the full logits.

Per block, on a tp mesh of size P (shapes are per rank):

    x (B, T/P, dim) --attn_norm (sequence parallel)--> all-gather --> (B, T, dim)
      --wq/wk/wv column-parallel--> local heads (B, T, H/P * hd) --attention-->
      --wo row-parallel--> reduce-scatter --> (B, T/P, dim) + residual
    and the same for the MLP (w_gate, w_up column-parallel; w_down row-parallel).

The residual stream stays sequence-sharded between blocks. The embedding is vocabulary
parallel (rows V/P per rank, reduce-scattered into sequence shards) and the output matrix is
split by vocabulary rows too; `vocab_parallel_loss` computes cross-entropy from the local logit
slice (N, V/P) with three all-reduces of (N,) vectors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from model.loss import IGNORE_INDEX


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `model` (a model.transformer.Transformer) in place over `tp_mesh`."""
    parallelize_module(
        model,
        tp_mesh,
        {
            # tokens (B, T) replicated -> rows of the embedding per rank -> (B, T/P, dim)
            "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            # the final norm returns a DTensor sharded on the sequence, read by the loss
            "norm": SequenceParallel(),
        },
    )
    if model.lm_head is not None:
        # Never called as a module (the loss reads model.output_weight): only its (V, dim)
        # weight is split by vocabulary rows, like the embedding's.
        parallelize_module(model.lm_head, tp_mesh, ColwiseParallel())
    for block in model.blocks:
        # Attention.forward(x, cos, sin, doc_ids, cache): only x is a distributed tensor.
        no_layouts = (None, None, None, None)
        plan = {
            "attn_norm": SequenceParallel(),
            "attn": PrepareModuleInput(
                input_layouts=(Shard(1), *no_layouts),
                desired_input_layouts=(Replicate(), *no_layouts),
            ),
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.w_gate": ColwiseParallel(),
            "mlp.w_up": ColwiseParallel(),
            "mlp.w_down": RowwiseParallel(output_layouts=Shard(1)),
        }
        if block.attn.q_norm is not None:
            # q, k are (B, H/P, T, hd) local heads: dim 1 is sharded, the norm weight is
            # replicated, so its gradient is summed over the tp ranks.
            plan["attn.q_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
            plan["attn.k_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
        parallelize_module(block, tp_mesh, plan)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy and log-sum-exp from vocabulary-sharded logits.

    logits: (N, V/P) this rank's slice [start, start + V/P); targets: (N,) global ids.
    Returns loss (N,) and lse (N,), identical on every rank of `group`.
    """

    @staticmethod
    def forward(ctx, logits, targets, start, group):
        n_local = logits.shape[-1]
        # Stable softmax: subtract the global max of each row (no gradient flows through it).
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max[:, None]
        # The target logit lives on exactly one rank; the others contribute 0.
        local_t = targets - start
        mine = (local_t >= 0) & (local_t < n_local)
        local_t = torch.where(mine, local_t, torch.zeros_like(local_t))
        target_logit = shifted.gather(1, local_t[:, None]).squeeze(1) * mine
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        both = torch.stack([target_logit, sum_exp])  # (2, N): one all-reduce for both
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        target_logit, sum_exp = both[0], both[1]
        lse = sum_exp.log() + row_max
        ctx.save_for_backward(exp / sum_exp[:, None], local_t, mine)
        return lse - (target_logit + row_max), lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        softmax, local_t, mine = ctx.saved_tensors
        # d loss_i / d logits = softmax - onehot(target); d lse_i / d logits = softmax.
        grad = softmax * (grad_loss + grad_lse)[:, None]
        grad.scatter_add_(1, local_t[:, None], -(grad_loss * mine)[:, None])
        return grad, None, None, None


def vocab_parallel_loss(
    hidden: DTensor, output_weight: DTensor, targets: torch.Tensor, z_loss: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy (+ z-loss) like model.loss.lm_loss, under tensor parallelism.

    hidden: (B, T, dim) DTensor sharded on the sequence (the final norm's output);
    output_weight: (V, dim) DTensor sharded on the vocabulary; targets: (B, T) plain tensor,
    the same on every tp rank. Returns a plain scalar, the same on every tp rank.
    """
    mesh = output_weight.device_mesh
    # All-gather the sequence; in backward each rank's gradient is partial (its vocabulary
    # slice only), so it is summed and scattered back to the sequence shards.
    full = hidden.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    weight = output_weight.to_local()  # (V/P, dim)
    start = mesh.get_local_rank() * weight.shape[0]
    logits = F.linear(full, weight).flatten(0, 1).float()  # (B*T, V/P), fp32 for the softmax
    targets = targets.flatten()
    loss, lse = _VocabParallelCrossEntropy.apply(logits, targets, start, mesh.get_group())
    valid = (targets != IGNORE_INDEX).float()
    count = valid.sum().clamp(min=1)
    out = (loss * valid).sum() / count
    if z_loss:
        out = out + z_loss * (lse.pow(2) * valid).sum() / count
    return out
