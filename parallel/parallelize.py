"""parallelize(model, mesh, cfg): tensor parallel -> expert parallel -> activation
checkpointing -> compile -> FSDP2 (or DDP around the materialized model), applied in place to a
model.transformer.Transformer or one pipeline stage of it, usually still on the meta device
(parallel/build.py then materializes and initializes only this rank's shards).

Everything is applied without renaming parameters (no wrapper modules between the model and
its blocks), so state dicts keep our names: `blocks.0.attn.wq.weight` in every configuration.
The functions at the bottom are the few places where the training step differs by engine and
layout; train.py chooses them once at setup (`build_loss_fn`) and its loop never asks which.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from data.loader import Batch
from job_config import JobConfig
from model.loss import lm_loss
from model.moe import moe_aux_loss
from parallel.expert_parallel import apply_expert_parallel, expert_parallel_layers
from parallel.grads import GradSync
from parallel.mesh import MeshInfo
from parallel.tensor_parallel import (
    apply_tensor_parallel,
    blocks_of,
    replicated_parameter_names,
    vocab_parallel_loss,
)

# --- activation checkpointing -----------------------------------------------------------------

# Ops whose outputs selective checkpointing keeps: the matmuls and attention (costly to redo);
# norms, RoPE, SiLU and other elementwise ops are recomputed in backward.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute each block's activations in backward: "full" keeps only block inputs,
    "selective" keeps matmul and attention outputs as well."""
    if mode == "none":
        return
    context_fn = (
        functools.partial(create_selective_checkpoint_contexts, _selective_policy)
        if mode == "selective" else None
    )
    for block in blocks_of(model):
        kwargs = {"use_reentrant": False}
        if context_fn is not None:
            kwargs["context_fn"] = context_fn
        # An instance attribute shadows Block.forward; the parameters keep their names.
        block.forward = functools.partial(checkpoint, block.forward, **kwargs)


# --- data parallel ----------------------------------------------------------------------------


def fsdp_mixed_precision(cfg: JobConfig, device: torch.device):
    """bf16 parameters for compute (train.dtype / parallel.param_dtype) with fp32 gradient
    reduction on GPU; plain fp32 on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    name = cfg.parallel.param_dtype
    if name == "auto":
        name = cfg.train.dtype
        if name == "auto":
            name = "bfloat16" if device.type == "cuda" else "float32"
    param = getattr(torch, name)
    reduce = getattr(torch, cfg.parallel.reduce_dtype)
    if param == torch.float32 and reduce == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def apply_fsdp(model: nn.Module, mesh, mp, expert_mesh=None) -> None:
    """FSDP2 over `mesh` (1-D, or 2-D for HSDP) with MixedPrecisionPolicy `mp`: each block is
    one all-gather / reduce-scatter unit; the root holds the embedding, final norm and output
    matrix (not resharded after forward: the loss reads the output matrix next). `model` is a
    Transformer or a pipeline stage of one (then each stage is a root).

    Under expert parallelism the experts of a MoE layer are a unit of their own over
    `expert_mesh` (the ranks holding the same experts), which also averages their gradients
    there; the router and shared experts, replicated like the dense weights, form one unit
    over `mesh`."""
    from torch.distributed.fsdp import fully_shard

    blocks = blocks_of(model)
    for i, block in enumerate(blocks):
        for moe in expert_parallel_layers(block):
            dense = [m for m in (moe.router, moe.shared) if m is not None]
            fully_shard(dense, mesh=mesh, mp_policy=mp)
            fully_shard(moe, mesh=expert_mesh, mp_policy=mp)
        # The last block's parameters are all-gathered again right away for backward.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def parallelize(model: nn.Module, mesh_info: MeshInfo, cfg: JobConfig, device: torch.device) -> list[str]:
    """Apply the parallel plan in place, on the meta device or not: tensor parallel -> expert
    parallel -> activation checkpointing -> compile -> FSDP2 (DDP wraps the materialized model
    afterwards: `wrap_ddp`). Returns the names of the parameters replicated over the tp group
    whose gradients parallel/grads.py sums there (norms, routers; empty without TP)."""
    p, dims = cfg.parallel, mesh_info.dims
    replicated: list[str] = []
    if mesh_info.tp_mesh is not None:
        apply_tensor_parallel(model, mesh_info.tp_mesh)
    if mesh_info.ep_mesh is not None:
        apply_expert_parallel(model, mesh_info.ep_mesh, grad_scale=1.0 / dims.ep_dp)
    if mesh_info.tp_mesh is not None:
        replicated = replicated_parameter_names(model)
    apply_activation_checkpointing(model, p.activation_checkpointing)
    if cfg.train.compile:
        # Per block: one graph reused n_layers times compiles fast; compile() keeps the names.
        for block in blocks_of(model):
            block.compile()
    if p.engine == "native" and p.data_parallel == "fsdp" and dims.dp > 1:
        apply_fsdp(model, mesh_info.fsdp_mesh, fsdp_mixed_precision(cfg, device),
                   mesh_info.expert_fsdp_mesh)
    return replicated


def wrap_ddp(model: nn.Module, mesh_info: MeshInfo, cfg: JobConfig, device: torch.device) -> nn.Module:
    """The module the training loop calls: DistributedDataParallel around the materialized
    model when parallel.data_parallel = "ddp" (pure data parallelism), else the model."""
    if cfg.parallel.engine != "native" or cfg.parallel.data_parallel != "ddp" or mesh_info.dims.dp == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=mesh_info.dp_mesh.get_group(),
    )


# --- the places where the training step differs by engine ------------------------------------


def autocast_context(cfg: JobConfig, device: torch.device) -> AbstractContextManager:
    """train.dtype: bf16 autocast on GPU by default ("auto"), plain fp32 on the CPU."""
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext()
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"train.dtype = {dtype!r}: expected auto, float32 or bfloat16")


LossFn = Callable[[Batch], torch.Tensor]
HiddenLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def hidden_loss(cfg: JobConfig) -> HiddenLoss:
    """(final hidden states (B, T, dim), output matrix (V, dim), targets (B, T)) -> mean
    next-token loss, the way this layout needs it: under tensor parallelism the logits stay
    split by vocabulary across the TP ranks (vocab_parallel_loss; chunked when
    train.fused_loss); otherwise model/loss.py's plain or fused (chunked Triton linear +
    cross-entropy) loss."""
    z_loss, fused = cfg.train.z_loss, cfg.train.fused_loss
    if cfg.parallel.tp > 1:
        return functools.partial(vocab_parallel_loss, z_loss=z_loss, fused=fused)
    return functools.partial(lm_loss, fused=fused, z_loss=z_loss)


def batch_to(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, doc_ids) of a micro-batch on `device`."""
    inputs = batch.inputs.to(device, non_blocking=True)
    targets = batch.targets.to(device, non_blocking=True)
    doc_ids = batch.doc_ids.to(device) if batch.doc_ids is not None else None
    return inputs, targets, doc_ids


def build_loss_fn(model: nn.Module, raw: nn.Module, cfg: JobConfig, device: torch.device) -> LossFn:
    """The mean next-token loss of one micro-batch (targets == -100 carry no loss), computed the
    way this setup needs, chosen once: DeepSpeed's engine wraps model + loss
    (parallel/deepspeed_engine.py); otherwise `hidden_loss` on the model's final hidden states
    (pipelines have their own: parallel/pipeline.py). The forward runs under the config's
    autocast; the caller runs the backward."""
    if is_deepspeed(model):
        def forward_loss(inputs, targets, doc_ids):
            return model(inputs, targets, doc_ids)
    else:
        loss = hidden_loss(cfg)

        def forward_loss(inputs, targets, doc_ids):
            hidden = model(inputs, doc_ids=doc_ids, return_hidden=True)  # (B, T, dim)
            return loss(hidden, raw.output_weight, targets)

    def loss_fn(batch: Batch) -> torch.Tensor:
        with autocast_context(cfg, device):
            return forward_loss(*batch_to(batch, device))

    return loss_fn


def forward_backward(
    model: nn.Module, raw: nn.Module, loss_fn: LossFn, micro_batches: list[Batch],
    aux_scale: float = 1.0,
) -> torch.Tensor:
    """Forward and backward of one step's micro-batches (gradient accumulation); the MoE
    balancing loss (zero for a dense model) joins each micro-batch's loss, times `aux_scale`
    (1 / tp: under tensor parallelism each rank's balancing loss covers its sequence shard).
    Returns the mean loss over the micro-batches (detached, without the balancing term)."""
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=next(raw.parameters()).device)
    for i, batch in enumerate(micro_batches):
        with grad_sync(model, last_micro_batch=i == n - 1):
            loss = loss_fn(batch)
            backward(model, (loss + aux_scale * moe_aux_loss(raw)) / n)
        loss_sum += loss.detach()
    return loss_sum / n


def is_deepspeed(model: nn.Module) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def grad_sync(model: nn.Module, last_micro_batch: bool) -> AbstractContextManager:
    """DDP: skip the gradient all-reduce on all but the last micro-batch. FSDP2 reduce-scatters
    every micro-batch (keeping gradients sharded saves more memory than the skipped traffic);
    DeepSpeed accumulates on its own."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP) and not last_micro_batch:
        return model.no_sync()
    return nullcontext()


def backward(model: nn.Module, loss: torch.Tensor) -> None:
    """loss is already divided by the number of micro-batches."""
    if is_deepspeed(model):
        # DeepSpeed's own accumulation: step() after every micro-batch; it reduces gradients
        # and steps the optimizer (clip, AdamW, zero grads, schedule) at the last one only.
        model.backward(loss, scale_wrt_gas=False)
        model.step()
    else:
        loss.backward()


def optimizer_step(model, grads: GradSync, optimizer, scheduler, grad_clip: float) -> float:
    """The gradient reductions FSDP / DDP leave (parallel/grads.py), clip to the global norm,
    step, zero the gradients, advance the schedule; returns the gradient norm."""
    if is_deepspeed(model):  # already stepped at the last micro-batch's backward()
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0
    grads.sync()
    norm = grads.clip(grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(norm)
