"""After the backward, before the optimizer: the gradient reductions that FSDP / DDP do not do,
and the global gradient norm for clipping, in any layout.

Reductions (`GradSync`), chosen at setup from the layout:
  - parameters replicated over the tensor-parallel group but computed from each rank's own
    tokens or heads (norm weights, MoE routers: parallel/tensor_parallel.py): summed over tp;
  - the tied embedding of a pipeline's first and last stages (the input embedding and the
    output matrix, on two ranks): summed over the two.

The norm. Every rank holds pieces of the gradient: FSDP, TP and EP shards (DTensors), and
copies (replicas over data-parallel ranks, tp ranks for the plain parameters above, the two tied
embeddings). With c(p) the number of ranks that hold the very same piece of p, the squared
global norm is  sum over ranks, over their pieces, of |piece|^2 / c(p)  — one all-reduce over
the world, whatever mix of FSDP, TP, EP and PP made the pieces. Every rank then scales its
pieces by the same factor. Expert shards count once each (EP-aware clipping), pipeline stages
add up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class GradSync:
    """`sync()` applies the reductions; `clip(max_norm)` returns the global norm (and clips)."""

    model: nn.Module  # the parameter container with our names (raw)
    stage_size: int = 1  # ranks of one pipeline stage (the world without pipelining)
    # (parameter names, process group): gradients summed over the group
    sums: list[tuple[list[str], dist.ProcessGroup]] = field(default_factory=list)
    # extra copies of a parameter outside its stage (the tied embedding: 2)
    copies: dict[str, int] = field(default_factory=dict)

    def sync(self) -> None:
        if not self.sums:
            return
        params = dict(self.model.named_parameters())
        for names, group in self.sums:
            grads = []
            for n in names:
                p = params[n]
                if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                    # e.g. a vocabulary-parallel embedding's gradient comes back replicated:
                    # the copies on other ranks hold it sharded like the parameter
                    p.grad = p.grad.redistribute(p.grad.device_mesh, p.placements)
                if p.grad is not None:
                    grads.append(local(p.grad))
            if not grads:
                continue
            # One all-reduce per group: flatten, reduce, copy back.
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    def holders(self, name: str, grad: torch.Tensor) -> int:
        """c(p): ranks holding the same piece of parameter `name`'s gradient."""
        n = self.stage_size * self.copies.get(name, 1)
        if isinstance(grad, DTensor):
            mesh = grad.device_mesh
            n //= mesh.size()  # ranks of the stage outside the gradient's mesh hold copies
            for dim, placement in enumerate(grad.placements):
                if isinstance(placement, Replicate):
                    n *= mesh.size(dim)
        return n

    @torch.no_grad()
    def clip(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm over all ranks and pieces; scales the gradients to at most
        max_norm (max_norm <= 0: only measure)."""
        pieces = [(name, p) for name, p in self.model.named_parameters() if p.grad is not None]
        device = local(pieces[0][1].grad).device if pieces else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float32, device=device)
        for name, p in pieces:
            total += local(p.grad).float().pow(2).sum() / self.holders(name, p.grad)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        norm = total.sqrt()
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for _, p in pieces:
                g = local(p.grad)
                g.mul_(scale.to(g.dtype))
        return norm
