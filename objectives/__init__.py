"""What one training step optimizes, chosen once at setup by train.py (`train.objective`):

    pretrain   next-token prediction on prepared token shards          objectives/pretrain.py
    sft        chat conversations, loss on the assistant's tokens only  objectives/sft.py
    dpo        preference pairs against a frozen reference              objectives/dpo.py

Each objective gives train.py the same things, so the training loop never asks which it runs:

    objective.loader            next_step() -> micro-batches, state_dict / load_state_dict,
                                metrics(), num_tokens (the loader interface of data/loader.py)
    objective.tokenizer         the run's tokenizer
    objective.tokenizer_identity  what its checkpoints record (model.checkpoint.TOKENIZER_FILE)
    objective.tokens_per_step   token positions one step processes (for rates)
    objective.build_loss(model, raw) -> loss_fn(batch) -> mean loss of a micro-batch
    objective.validate(model, loss_fn) -> {"val_loss": ..., ...}   (every rank calls it)
    objective.metrics()         what the log line reports since the last one (every rank)
    objective.describe()        one line about the data, objective.info for run_info.json

Fine-tuning objectives start from a model (`checkpoint.init_from`): `resolve_config` takes the
architecture ([model]) and the tokenizer ([data]) from its checkpoint, so a fine-tuning config
names only the base, the data and the schedule, and the run's saved config is complete (eval,
export and sampling find the tokenizer the usual way).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from job_config import ConfigError, JobConfig
from model.checkpoint import resolve_checkpoint
from model.load import load_job_config

OBJECTIVES = ("pretrain", "sft", "dpo")


class Objective(Protocol):
    loader: object
    tokenizer: object
    tokenizer_identity: dict | None
    tokens_per_step: int
    info: dict

    def build_loss(self, model: nn.Module, raw: nn.Module): ...
    def validate(self, model: nn.Module, loss_fn) -> dict[str, float]: ...
    def metrics(self) -> dict[str, float]: ...
    def describe(self) -> str: ...


def resolve_config(cfg: JobConfig) -> JobConfig:
    """The job config with a fine-tuning run's [model] and [data] taken from its base
    (checkpoint.init_from); pretraining configs are returned as they are. The run's own
    attention backend and kernel choice are kept (they do not change the weights)."""
    if cfg.train.objective == "pretrain":
        return cfg
    if not cfg.checkpoint.init_from:
        raise ConfigError(f"train.objective = {cfg.train.objective!r} fine-tunes a model: set "
                          "checkpoint.init_from to its run or checkpoint directory")
    if not Path(cfg.checkpoint.init_from).exists():
        raise ConfigError(f"checkpoint.init_from = {cfg.checkpoint.init_from!r}: no such "
                          "directory (the model to fine-tune)")
    base = load_job_config(resolve_checkpoint(cfg.checkpoint.init_from))
    model = dataclasses.replace(base.model, attention=cfg.model.attention,
                                fused_kernels=cfg.model.fused_kernels)
    if cfg.train.seq_len > model.max_seq_len:
        raise ConfigError(f"train.seq_len = {cfg.train.seq_len} exceeds the base model's "
                          f"max_seq_len = {model.max_seq_len}")
    return dataclasses.replace(cfg, model=model, data=base.data)


def build_objective(cfg: JobConfig, mesh, device: torch.device) -> Objective:
    """The objective `train.objective` names, its data loaded for this data-parallel rank."""
    name = cfg.train.objective
    if name == "pretrain":
        from objectives.pretrain import Pretrain

        return Pretrain(cfg, mesh, device)
    if name == "sft":
        from objectives.sft import SFT

        return SFT(cfg, mesh, device)
    if name == "dpo":
        from objectives.dpo import DPO

        return DPO(cfg, mesh, device)
    raise ConfigError(f"train.objective = {name!r}: expected one of {OBJECTIVES}")
