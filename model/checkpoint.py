"""The files of a run's checkpoints: writing them atomically, finding them, reading them back.

    runs/NAME/checkpoints/step_000100/
        model.safetensors   the model's state dict (our parameter names, unsharded)
        train_state.pt      optimizer, scheduler, data-loader position, RNG, step
                            (plain tensors and containers: torch.load(weights_only=True))
        config.json         the resolved job config
        tokenizer_identity.json   the tokenizer the model was trained with (sha256, name, ...)
    runs/NAME/checkpoints/latest   text file naming the newest complete step directory

A checkpoint is written into a temporary directory that is renamed into place only when every
file is on disk (common/atomic.py), so a run killed mid-save never leaves a checkpoint that looks
complete; re-saving an existing step swaps the directories in one exchange, so `latest` never
names a missing directory; old checkpoints are renamed away before they are deleted. Readers
raise CheckpointError / MissingFileError naming the file for anything missing or damaged.
Building a model from a checkpoint is model/load.py's job; this module only moves files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.atomic import atomic_dir, fault_point, naming, remove_dir, write_text
from common.errors import MissingFileError, PretrainError, read_json

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer_identity.json"
STEP_NAME = re.compile(r"step_\d{6,}")


class CheckpointError(PretrainError, ValueError):
    """A checkpoint file that is missing, truncated or corrupt; the message names it."""


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
    tokenizer: dict | None = None,
) -> Path:
    """Write a checkpoint atomically; keep only the newest `keep` (0: all).

    keep_temp_contents: the temporary directory already holds files written by all ranks
    (parallel/checkpoint_dcp.py: a sharded `dcp/` or `deepspeed/` subdirectory); keep them.
    tokenizer: the identity of the tokenizer the model was trained with (Tokenizer.identity()
    + its spec), recorded so that sampling and evaluation can refuse another one.
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    # The temporary is common.atomic.temp_path(final); other ranks' shards may already be in it.
    with atomic_dir(final, keep_contents=keep_temp_contents) as tmp:
        with naming(final / MODEL_FILE):  # a full disk names the file, not the temporary
            save_model_state(model_state, tmp / MODEL_FILE)
        fault_point(f"wrote {tmp / MODEL_FILE}")
        with naming(final / STATE_FILE):
            torch.save(train_state, tmp / STATE_FILE)
        fault_point(f"wrote {tmp / STATE_FILE}")
        with naming(final / CONFIG_FILE):
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
            if tokenizer is not None:
                (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer, indent=1) + "\n")
    write_text(root / "latest", final.name + "\n")
    if keep > 0:
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            remove_dir(old)  # renamed away first: never a half-deleted step_* directory
    return final


def save_model_state(model_state: dict[str, torch.Tensor], path: Path) -> None:
    """The model's tensors as one safetensors file (detached, contiguous, on the CPU)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    save_file(tensors, path, metadata={"format": "pt"})


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory of `step`, or the newest one; clear errors when missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"run directory {run_dir} does not exist")
    root = run_dir / "checkpoints"
    if step is not None:
        path = checkpoint_dir(run_dir, step)
        if not path.is_dir():
            have = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
            raise MissingFileError(f"{path} does not exist; checkpoints in {root}: {have}")
        return path
    latest = root / "latest"
    if not latest.exists():
        raise MissingFileError(f"{run_dir} has no checkpoint ({latest} is missing)")
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{latest}: unreadable ({e})") from None
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{latest}: expected the name of a step_NNNNNN directory, got "
                              f"{name[:80]!r}")
    path = root / name
    if not path.is_dir():
        raise MissingFileError(f"{latest} names {path.name}, which does not exist")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (it holds the model or the train state), or a run directory
    (its newest checkpoint)."""
    path = Path(path)
    if (path / MODEL_FILE).exists() or (path / STATE_FILE).exists():
        return path
    return find_checkpoint(path)


def load_train_state(ckpt: Path) -> dict:
    """train_state.pt: plain tensors and containers only (weights_only); a truncated or
    corrupt file raises CheckpointError naming it."""
    path = ckpt / STATE_FILE
    if not path.exists():
        raise MissingFileError(f"{path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip / pickle / EOF errors: any of them means a damaged file
        raise CheckpointError(f"{path}: not a readable train state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict) or type(state.get("step")) is not int:
        raise CheckpointError(f"{path}: expected a dict with an integer 'step', got "
                              f"{type(state).__name__}")
    return state


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return read_safetensors_file(ckpt / MODEL_FILE)


def read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or corrupt file raises a
    PretrainError naming it (safetensors' own errors name no file)."""
    if not path.exists():
        raise MissingFileError(f"{path} is missing")
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError, OSError: a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None


def load_config_dict(ckpt: Path) -> dict:
    path = ckpt / CONFIG_FILE
    config = read_json(path, "the job config the checkpoint was saved with (a JSON object)")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_tokenizer_identity(ckpt: Path) -> dict | None:
    """The identity of the tokenizer the checkpoint's model was trained with ({"sha256",
    "name", "n_vocab", "eot_id", "spec"}; "sha256" None when the model came without one, e.g.
    imported from a directory with no convertible tokenizer), or None when the checkpoint
    records none (saved before identities were recorded)."""
    path = ckpt / TOKENIZER_FILE
    if not path.exists():
        return None
    identity = read_json(path, "a tokenizer identity (a JSON object)")
    if not isinstance(identity, dict) or not isinstance(identity.get("sha256"), str | None):
        raise CheckpointError(f"{path}: expected an object with a 'sha256' string")
    return identity
