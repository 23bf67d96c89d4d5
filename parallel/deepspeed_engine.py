"""DeepSpeed ZeRO as the alternative engine: the same model, data, optimizer and schedule.

`parallel.engine = "deepspeed"` hands the model and our AdamW (same weight-decay groups and
hyperparameters) and LambdaLR schedule to `deepspeed.initialize` with ZeRO stage 1, 2 or 3;
gradient clipping and accumulation are set in the DeepSpeed config built from ours. DeepSpeed
calls the scheduler at each optimizer step, exactly where the native loop does.

ZeRO-3 partitions every parameter and gathers it only inside the forward of the module that
owns it. The loss reads the output matrix outside any such forward (model.output_weight), so
the engine wraps model + loss in `ModelWithLoss` and registers that matrix as an external
parameter of the wrapper.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from job_config import JobConfig
from model.loss import lm_loss

TAG = "deepspeed"  # subdirectory of checkpoints/step_XXXXXX/ holding DeepSpeed's own files


class ModelWithLoss(nn.Module):
    """forward(inputs, targets, doc_ids) -> mean loss; state dict names prefixed "model."."""

    def __init__(self, model: nn.Module, fused: bool, z_loss: float):
        super().__init__()
        self.model = model
        self.fused, self.z_loss = fused, z_loss

    def forward(self, inputs, targets, doc_ids=None):
        hidden = self.model(inputs, doc_ids=doc_ids, return_hidden=True)  # (B, T, dim)
        return lm_loss(hidden, self.model.output_weight, targets, self.fused, self.z_loss)


def deepspeed_config(cfg: JobConfig, dp_size: int, device: torch.device) -> dict:
    t, p, o = cfg.train, cfg.parallel, cfg.optim
    dtype = t.dtype if t.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    zero: dict = {
        "stage": p.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": device.type == "cuda" and p.zero_stage > 1,
    }
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.batch_size // (t.micro_batch_size * dp_size),
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,  # our torch.optim.AdamW
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def initialize(raw: nn.Module, optimizer, scheduler, cfg: JobConfig, dp_size: int,
               device: torch.device):
    """The DeepSpeed engine around `raw` + loss. `optimizer` is our AdamW over raw's
    parameters (DeepSpeedCPUAdam with the same groups when offloading); `scheduler` our LambdaLR
    on it."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("parallel.engine = 'deepspeed' needs `pip install deepspeed`") from e
    if not dist.is_initialized():
        # One process: DeepSpeed still wants a process group; a world of one needs no rendezvous.
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=dist.HashStore(),
                                rank=0, world_size=1)
    wrapped = ModelWithLoss(raw, cfg.train.fused_loss, cfg.train.z_loss)
    if cfg.parallel.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        old = optimizer
        groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay")}
                  for g in old.param_groups]
        optimizer = DeepSpeedCPUAdam(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                     eps=cfg.optim.eps, adamw_mode=True)
        scheduler = type(scheduler)(optimizer, scheduler.lr_lambdas[0])
    if cfg.parallel.zero_stage == 3:
        deepspeed.zero.register_external_parameter(wrapped, raw.output_weight)
    engine, _, _, _ = deepspeed.initialize(
        model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, dp_size, device), dist_init_required=False,
    )
    return engine


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full model state dict (our names) on every rank; ZeRO-3 gathers the partitions."""
    import deepspeed

    raw = engine.module.model
    params = list(raw.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().cpu().clone() for k, v in raw.state_dict().items()}


def save(engine, tmp_dir: Path) -> None:
    """DeepSpeed's own (partitioned) checkpoint into tmp_dir/deepspeed/; all ranks call this."""
    engine.save_checkpoint(str(tmp_dir), tag=TAG, client_state={}, save_latest=False)


def load(engine, ckpt: Path) -> None:
    if not (ckpt / TAG).is_dir():
        raise FileNotFoundError(
            f"{ckpt} has no {TAG}/ directory: it was not saved by parallel.engine = 'deepspeed' "
            f"(resume it with the native engine)"
        )
    path, _ = engine.load_checkpoint(str(ckpt), tag=TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt / TAG}")
