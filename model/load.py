"""A trained model back from a run: the checkpoint's config, the network built from it, the
weights loaded (model/checkpoint.py moves the files; this module builds the model).

    model, cfg, ckpt = load_model("runs/tiny")              # the newest checkpoint
    model, cfg, ckpt = load_model("runs/tiny", step=400)    # a given one
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.device import resolve_device
from job_config import JobConfig
from model.checkpoint import (
    CONFIG_FILE,
    find_checkpoint,
    load_config_dict,
    load_model_state,
    resolve_checkpoint,
)
from model.transformer import Transformer, build_model


def load_job_config(ckpt: Path) -> JobConfig:
    """The resolved job config a checkpoint was saved with."""
    return JobConfig.from_dict(load_config_dict(ckpt), str(ckpt / CONFIG_FILE))


def load_model(
    ckpt_or_run: str | Path, device: str | torch.device = "cpu", step: int | None = None
) -> tuple[Transformer, JobConfig, Path]:
    """(model in eval mode, JobConfig, checkpoint dir) of a checkpoint directory, or of a run
    directory's checkpoint `step` (default: its newest)."""
    ckpt = resolve_checkpoint(ckpt_or_run) if step is None else find_checkpoint(ckpt_or_run, step)
    cfg = load_job_config(ckpt)
    model = build_model(cfg.model, resolve_device(device), seed=None)  # the checkpoint fills it
    missing, unexpected = model.load_state_dict(load_model_state(ckpt), strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt / 'model.safetensors'}: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model, cfg, ckpt
