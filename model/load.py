"""A trained model back from a run: the checkpoint's config, the network built from it, the
weights loaded (model/checkpoint.py moves the files; this module builds the model).

    model, cfg, ckpt = load_model("runs/tiny")              # the newest checkpoint
    model, cfg, ckpt = load_model("runs/tiny", step=400)    # a given one
    model, cfg, ckpt = load_model("runs/tiny", quantize="int4")   # weight-only int4 (model/quant.py)

A quantized checkpoint (written by `python -m inference.quantize`) holds quantization.json and
the packed weights; it loads into a quantized model of the same shape.
"""

from __future__ import annotations

import json
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
from model.quant import GROUP_SIZES, MODES, QUANT_FILE, quantize_model
from model.transformer import Transformer, build_model


def load_job_config(ckpt: Path) -> JobConfig:
    """The resolved job config a checkpoint was saved with."""
    return JobConfig.from_dict(load_config_dict(ckpt), str(ckpt / CONFIG_FILE))


def checkpoint_quantization(ckpt: Path) -> dict | None:
    """{"mode", "group_size"} of a quantized checkpoint, None for a floating-point one."""
    path = ckpt / QUANT_FILE
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    if info.get("mode") not in MODES or (info["mode"] == "int4" and info.get("group_size") not in GROUP_SIZES):
        raise ValueError(f"{path}: expected mode in {MODES} (int4 with group_size in {GROUP_SIZES}), got {info}")
    return info


def load_model(
    ckpt_or_run: str | Path,
    device: str | torch.device = "cpu",
    step: int | None = None,
    quantize: str | None = None,
    group_size: int = 64,
) -> tuple[Transformer, JobConfig, Path]:
    """(model in eval mode, JobConfig, checkpoint dir) of a checkpoint directory, or of a run
    directory's checkpoint `step` (default: its newest). quantize: "int8" / "int4" quantizes the
    weights after loading (a quantized checkpoint loads as it was saved)."""
    ckpt = resolve_checkpoint(ckpt_or_run) if step is None else find_checkpoint(ckpt_or_run, step)
    cfg = load_job_config(ckpt)
    device = resolve_device(device)
    saved = checkpoint_quantization(ckpt)
    if saved is not None:
        if quantize not in (None, saved["mode"]) or (quantize == "int4" and group_size != saved.get("group_size")):
            raise ValueError(f"{ckpt} is quantized {saved}; it cannot be loaded as {quantize} (group {group_size})")
        with torch.device("meta"):
            model = Transformer(cfg.model)
        quantize_model(model, saved["mode"], saved.get("group_size", 64), weights=False)
        model.to_empty(device=device)
        model.init_weights()  # the RoPE tables and norms; every weight is overwritten below
    else:
        model = build_model(cfg.model, device)
    missing, unexpected = model.load_state_dict(load_model_state(ckpt), strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt / 'model.safetensors'}: missing {missing}, unexpected {unexpected}")
    if saved is None and quantize is not None:
        quantize_model(model, quantize, group_size)
    model.eval()
    return model, cfg, ckpt
