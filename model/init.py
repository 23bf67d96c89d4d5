"""Weight initialization that any shard can draw on its own, with the values of the whole.

Every parameter's initial values are a function of (seed, parameter name, position) alone:

    the tensor, viewed as rows along dim 0, is cut into blocks of whole rows of about
    INIT_BLOCK elements; block j ~ N(0, std) drawn by its own CPU generator seeded from
    hash(seed, name, j)

so a rank that holds rows [a, b) (FSDP, expert and vocabulary shards) or a column slice of
them (row-parallel tensor parallelism) draws only the blocks it overlaps and gets exactly the
values an unsharded init from the same seed has there: on any device, in any layout, pipeline
stage or world size (parallel/meta_init.py). Each block is drawn on the CPU in fp32, so the
values do not depend on the device's generator either.

What each parameter gets (by name, the same in every layout since nothing renames them):
RMSNorm weights ones; biases (q/k/v, Qwen2-style) zeros; the projections that write into the residual stream (attention `wo`,
`w_down` of dense MLPs, shared and routed experts) N(0, init_std / sqrt(2 n_layers)) as in
GPT-2; everything else (embedding, q/k/v, gate/up, routers, output matrix) N(0, init_std).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from model.config import ModelConfig
from model.layers import rope_tables

INIT_BLOCK = 1 << 20  # elements per independently seeded block of rows (4 MiB in fp32)


def init_std(cfg: ModelConfig, name: str) -> float | None:
    """The standard deviation parameter `name` is drawn with; None: ones (RMSNorm weights);
    0.0: zeros (the q/k/v biases)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(".bias"):
        return 0.0
    if name.endswith(("wo.weight", "w_down.weight", "mlp.w_down")):  # mlp.w_down: stacked experts
        return cfg.init_std / math.sqrt(2 * cfg.n_layers)
    return cfg.init_std


def block_seed(seed: int, name: str, block: int) -> int:
    """A 63-bit generator seed for block `block` of parameter `name` (stable across runs and
    Python versions, unlike hash())."""
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@torch.no_grad()
def init_tensor_(
    out: torch.Tensor,
    name: str,
    seed: int,
    std: float | None,
    full_shape: tuple[int, ...] | None = None,
    offset: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Fill `out` with the initial values of the piece [offset, offset + out.shape) of
    parameter `name`, whose whole shape is `full_shape` (default: out is the whole tensor)."""
    full_shape = tuple(out.shape) if full_shape is None else tuple(full_shape)
    offset = (0,) * out.dim() if offset is None else tuple(offset)
    if std is None:
        return out.fill_(1.0)
    if std == 0.0:
        return out.zero_()
    if out.numel() == 0:
        return out
    rows, rest = full_shape[0], full_shape[1:]
    per_block = max(1, INIT_BLOCK // max(1, math.prod(rest)))  # whole rows per block
    # The piece's slices of the dims after the first, applied to each drawn block of rows.
    cols = tuple(slice(o, o + n) for o, n in zip(offset[1:], out.shape[1:]))
    start, stop = offset[0], offset[0] + out.shape[0]
    for block in range(start // per_block, -(-stop // per_block)):
        lo, hi = block * per_block, min(rows, (block + 1) * per_block)
        gen = torch.Generator().manual_seed(block_seed(seed, name, block))
        values = torch.empty((hi - lo, *rest)).normal_(0.0, std, generator=gen)  # CPU, fp32
        a, b = max(lo, start), min(hi, stop)
        out[a - start : b - start].copy_(values[(slice(a - lo, b - lo), *cols)])
    return out


@torch.no_grad()
def init_buffers_(module: nn.Module, cfg: ModelConfig) -> None:
    """The buffers of a model (or of any part of one): the RoPE tables computed, the MoE
    balancing biases zeroed."""
    tables = None
    for name, buffer in module.named_buffers():
        if name.endswith(("rope_cos", "rope_sin")):
            if tables is None:
                tables = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, buffer.device,
                                     cfg.rope_scaling)
            buffer.copy_(tables[0] if name.endswith("rope_cos") else tables[1])
        elif name.endswith("expert_bias"):
            buffer.zero_()
