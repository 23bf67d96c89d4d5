"""The files of a run's checkpoints: writing them atomically, finding them, reading them back.

    runs/NAME/checkpoints/step_000100/
        model.safetensors   the model's state dict (our parameter names, unsharded)
        train_state.pt      optimizer, scheduler, data-loader position, RNG, step
                            (plain tensors and containers: torch.load(weights_only=True))
        config.json         the resolved job config
    runs/NAME/checkpoints/latest   text file naming the newest complete step directory

A checkpoint is written into a temporary directory that is renamed into place only when every
file is on disk (common/atomic.py), so a run killed mid-save never leaves a checkpoint that looks
complete; re-saving an existing step swaps the directories in one exchange, so `latest` never
names a missing directory.
Building a model from a checkpoint is model/load.py's job; this module only moves files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.atomic import atomic_dir, write_text

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.json"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict,
    config: dict,
    keep: int = 0,
    keep_temp_contents: bool = False,
) -> Path:
    """Write a checkpoint atomically; keep only the newest `keep` (0: all).

    keep_temp_contents: the temporary directory already holds files written by all ranks
    (parallel/checkpoint_dcp.py: a sharded `dcp/` or `deepspeed/` subdirectory); keep them.
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    # The temporary is common.atomic.temp_path(final); other ranks' shards may already be in it.
    with atomic_dir(final, keep_contents=keep_temp_contents) as tmp:
        save_model_state(model_state, tmp / MODEL_FILE)
        torch.save(train_state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    write_text(root / "latest", final.name + "\n")
    if keep > 0:
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_model_state(model_state: dict[str, torch.Tensor], path: Path) -> None:
    """The model's tensors as one safetensors file (detached, contiguous, on the CPU)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    save_file(tensors, path, metadata={"format": "pt"})


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory of `step`, or the newest one; clear errors when missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    root = run_dir / "checkpoints"
    if step is not None:
        path = checkpoint_dir(run_dir, step)
        if not path.is_dir():
            have = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
            raise FileNotFoundError(f"{path} does not exist; checkpoints in {root}: {have}")
        return path
    latest = root / "latest"
    if not latest.exists():
        raise FileNotFoundError(f"{run_dir} has no checkpoint ({latest} is missing)")
    path = root / latest.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{latest} names {path.name}, which does not exist")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (it holds the model or the train state), or a run directory
    (its newest checkpoint)."""
    path = Path(path)
    if (path / MODEL_FILE).exists() or (path / STATE_FILE).exists():
        return path
    return find_checkpoint(path)


def load_train_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    return load_file(path)


def load_config_dict(ckpt: Path) -> dict:
    path = ckpt / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    return json.loads(path.read_text())
