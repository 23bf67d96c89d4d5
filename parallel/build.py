"""From a config and a mesh to the model of this rank and the functions of one training step,
chosen once at setup so train.py's loop never asks which layout it runs:

    build_parallel_model: Transformer on the meta device -> this rank's pipeline stages (pp > 1)
        -> parallelize (TP -> EP -> activation checkpointing -> compile -> FSDP2) -> allocate and
        initialize only this rank's shards (parallel/meta_init.py) -> DDP around it if asked
    build_train_step: loss_fn (validation), forward_backward (the micro-batches of a step: the
        gradient-accumulation loop, or the pipeline schedule), optimizer_step (the reductions
        of parallel/grads.py, clipping to the global norm, AdamW, schedule)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from data.loader import Batch
from job_config import JobConfig
from model.transformer import Transformer
from parallel.grads import GradSync
from parallel.mesh import MeshInfo
from parallel.meta_init import materialize
from parallel.parallelize import (
    LossFn,
    autocast_context,
    build_loss_fn,
    forward_backward,
    fsdp_mixed_precision,
    hidden_loss,
    optimizer_step,
    parallelize,
    wrap_ddp,
)
from parallel.pipeline import Pipeline, split_stages, tied_embedding_group


@dataclass
class ParallelModel:
    model: nn.Module  # what the loop calls and sets train() / eval() on (DDP wrapper or raw)
    raw: nn.Module  # every parameter of this rank under our names: optimizer, checkpoints
    grads: GradSync
    pipeline: Pipeline | None = None
    aux_scale: float = 1.0  # weight of each rank's MoE balancing loss (1 / tp)


def build_parallel_model(
    cfg: JobConfig, mesh: MeshInfo, device: torch.device, materialize_weights: bool = True
) -> ParallelModel:
    """This rank's part of the model, parallelized and (unless materialize_weights is False:
    the dry run) initialized from cfg.train.seed with the values of an unsharded init."""
    d = mesh.dims
    aux_scale = 1.0 / d.tp
    with torch.device("meta"):
        full = Transformer(cfg.model)
    if d.pp > 1:
        raw, stages, ids = split_stages(full, mesh, hidden_loss(cfg), aux_scale)
    else:
        raw, stages, ids = full, [full], [0]
    replicated = []
    for stage in stages:
        replicated += parallelize(stage, mesh, cfg, device)
    grads = GradSync(raw, stage_size=d.world_size // d.pp)
    if replicated:
        grads.sums.append((sorted(set(replicated)), mesh.tp_mesh.get_group()))
    if d.pp > 1 and cfg.model.tie_embeddings:
        pair = tied_embedding_group(mesh)
        if any(name == "embed.weight" for name, _ in raw.named_parameters()):
            grads.sums.append((["embed.weight"], pair))
            grads.copies["embed.weight"] = 2
    if not materialize_weights:
        return ParallelModel(raw, raw, grads, None, aux_scale)
    materialize([raw, *[s for s in stages if s is not raw]], cfg.model, device, cfg.train.seed)
    if d.pp > 1:
        # FSDP's mixed precision makes the residual stream its parameter dtype; autocast alone
        # keeps it fp32 (bf16 outputs are added to fp32).
        dtype = (fsdp_mixed_precision(cfg, device).param_dtype if d.dp > 1 else None) or torch.float32
        pipeline = Pipeline(stages, ids, mesh, cfg, device, lambda: autocast_context(cfg, device), dtype)
        return ParallelModel(raw, raw, grads, pipeline, aux_scale)
    return ParallelModel(wrap_ddp(raw, mesh, cfg, device), raw, grads, None, aux_scale)


@dataclass
class TrainStep:
    loss_fn: LossFn  # one micro-batch -> its mean loss (validation)
    forward_backward: Callable[[list[Batch]], torch.Tensor]  # a step's micro-batches -> mean loss
    optimizer_step: Callable[..., float]  # (optimizer, scheduler, grad_clip) -> gradient norm


def build_train_step(model: nn.Module, pm: ParallelModel, cfg: JobConfig, device: torch.device) -> TrainStep:
    """`model`: what the loop calls (pm.model, or the DeepSpeed engine around pm.raw)."""
    step = functools.partial(optimizer_step, model, pm.grads)
    if pm.pipeline is not None:
        return TrainStep(pm.pipeline.loss_fn, pm.pipeline.forward_backward, step)
    loss_fn = build_loss_fn(model, pm.raw, cfg, device)
    fb = functools.partial(forward_backward, model, pm.raw, loss_fn, aux_scale=pm.aux_scale)
    return TrainStep(loss_fn, fb, step)
