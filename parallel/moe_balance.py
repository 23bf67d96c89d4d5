"""Aux-loss-free MoE balancing across ranks: the expert-bias update as an optimizer step hook.

Every rank must keep identical expert biases, so the per-expert loads of all data-parallel
ranks are summed (one all-reduce of an (L, E) tensor per step) before model.moe updates them.
Registered once at setup, as torchtitan does; a dense model or another balancing method makes
the hook a no-op (no collective either, on every rank alike).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.moe import moe_after_step


def sum_over_ranks(loads: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The (L, E) expert loads summed over the ranks of `group` (default: the world); this
    process's own when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads, group=group)
    return loads


def update_expert_bias(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """model.moe's bias update with the loads of every rank of `group`."""
    moe_after_step(model, lambda loads: sum_over_ranks(loads, group))


def register_expert_bias_update(
    optimizer: torch.optim.Optimizer, model: nn.Module, group: dist.ProcessGroup | None = None
):
    """After every optimizer step, update the expert biases of `model` from the loads of all
    ranks of `group` (default: the world). Returns the hook handle."""
    return optimizer.register_step_post_hook(
        lambda _optimizer, _args, _kwargs: update_expert_bias(model, group)
    )
