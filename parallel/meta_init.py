"""Meta-device initialization: the model is built and parallelized on the meta device (no memory),
then each rank allocates and initializes only its own shards, with exactly the values an
unsharded `Transformer.init_weights(seed)` gives them.

That works because model/init.py defines every parameter's values by (seed, name, row block):
for a DTensor (FSDP, TP, EP shards, any mix) this rank's piece is a box of the full tensor,
[offset, offset + local shape) as DTensor computes it for checkpoints, and only the row blocks
it overlaps are drawn. A rank never holds more than its shards plus one block (4 MiB), so a model
that does not fit one host's memory in full starts on many (bench/meta_init.py measures it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from model.config import ModelConfig
from model.init import init_buffers_, init_std, init_tensor_


def local_piece(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(this rank's tensor, the full shape, the piece's offset in the full tensor)."""
    if not isinstance(p, DTensor):
        return p, tuple(p.shape), (0,) * p.dim()
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    piece = p.to_local()
    if tuple(piece.shape) != tuple(shape):
        raise RuntimeError(f"local shard {tuple(piece.shape)} vs {tuple(shape)} from the placements "
                           f"{p.placements}: not a box of the full tensor")
    return piece, tuple(p.shape), tuple(offset)


@torch.no_grad()
def materialize(modules: list[nn.Module], cfg: ModelConfig, device: torch.device, seed: int) -> None:
    """Allocate the meta `modules` on `device` (FSDP keeps only the shards) and initialize them.
    modules[0] holds every parameter (our names); the others may share its submodules and
    add buffers of their own (pipeline stages)."""
    for module in modules:
        module.to_empty(device=device)
    for name, p in modules[0].named_parameters():
        piece, shape, offset = local_piece(p)
        init_tensor_(piece, name, seed, init_std(cfg, name), shape, offset)
    for module in modules:
        init_buffers_(module, cfg)
