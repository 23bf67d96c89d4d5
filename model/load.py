"""A trained model back from a run: the checkpoint's config, the network built from it, the
weights loaded (model/checkpoint.py moves the files; this module builds the model).

    model, cfg, ckpt = load_model("runs/tiny")              # the newest checkpoint
    model, cfg, ckpt = load_model("runs/tiny", step=400)    # a given one

A checkpoint holds the parameters its run trained: a LoRA run's holds only the adapters, and
its config names the base (checkpoint.init_from), itself any checkpoint load_model reads (a
pretrained or imported model, or a fine-tuned one, adapters merged). The base is loaded, the
adapters applied and merged: the result is a plain model either way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from common.device import resolve_device
from job_config import JobConfig
from model.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    find_checkpoint,
    load_config_dict,
    load_model_state,
    resolve_checkpoint,
)
from model.lora import apply_lora, merge_lora
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
    device = resolve_device(device)
    model = build_model(cfg.model, device)
    state = load_model_state(ckpt)
    base_needed = set(model.state_dict()) - set(state)
    if base_needed:  # the frozen parameters of the run are its base's
        if not cfg.checkpoint.init_from:
            raise ValueError(f"{ckpt / 'model.safetensors'}: missing {sorted(base_needed)[:4]}"
                             " and the run names no base (checkpoint.init_from)")
        load_base_weights(model, cfg.checkpoint.init_from, f"{ckpt / CONFIG_FILE}")
    apply_lora(model, cfg.lora)  # nothing without adapters
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - base_needed:
        raise ValueError(f"{ckpt / 'model.safetensors'}: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}")
    merge_lora(model)
    model.requires_grad_(True)
    model.eval()
    return model, cfg, ckpt


def load_base_weights(model: Transformer, base: str | Path, origin: str = "config") -> None:
    """Load into `model` the weights of checkpoint or run directory `base` (any checkpoint
    `load_model` reads; a LoRA one merged). The tensors' names and shapes must agree."""
    if not Path(base).exists():
        raise FileNotFoundError(f"{origin}: checkpoint.init_from = {str(base)!r} does not exist "
                                "(the base model)")
    ckpt = resolve_checkpoint(base)
    if load_job_config(ckpt).lora.rank:  # adapters on a base of its own: merged in a copy
        weights, _, _ = load_model(ckpt, model.embed.weight.device)
        model.load_state_dict(weights.state_dict())
        return
    # One tensor at a time: no second copy of the model in memory.
    expected = model.state_dict()
    with safe_open(str(ckpt / MODEL_FILE), framework="pt") as f:
        names = set(f.keys())
        if names != set(expected):
            raise ValueError(f"{ckpt / MODEL_FILE}: missing {sorted(set(expected) - names)[:4]}, "
                             f"unexpected {sorted(names - set(expected))[:4]}")
        with torch.no_grad():
            for name in names:
                t = f.get_tensor(name)
                if t.shape != expected[name].shape:
                    raise ValueError(f"{ckpt / MODEL_FILE}: {name} has shape {tuple(t.shape)}, "
                                     f"the model {tuple(expected[name].shape)}")
                expected[name].copy_(t)
