"""A trained model back from a run: the checkpoint's config, the network built from it, the
weights loaded (model/checkpoint.py moves the files; this module builds the model).

    model, cfg, ckpt = load_model("runs/tiny")              # the newest checkpoint
    model, cfg, ckpt = load_model("runs/tiny", step=400)    # a given one
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.device import resolve_device
from data.manifest import manifest_tokenizer, run_tokenizer
from data.tokenizer import TokenizerError, TokenizerLike, TokenizerMismatchError, load_tokenizer
from job_config import JobConfig
from model.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    find_checkpoint,
    load_config_dict,
    load_model_state,
    load_tokenizer_identity,
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
    state = load_model_state(ckpt)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    wrong = {n: (tuple(t.shape), shapes[n]) for n, t in state.items()
             if n in shapes and tuple(t.shape) != shapes[n]}
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{ckpt / 'model.safetensors'} does not fit the model of {ckpt / CONFIG_FILE}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes (file, config) "
            f"{dict(list(wrong.items())[:5])}")
    model.load_state_dict(state)
    model.eval()
    return model, cfg, ckpt


def checkpoint_tokenizer(ckpt: Path, cfg: JobConfig, spec: str | None = None) -> TokenizerLike:
    """The tokenizer to sample or score checkpoint `ckpt` with: `spec` when given (a tiktoken
    name or .tiktoken file), else the one the checkpoint records (its run's prepared data, or
    the file an import converted). Refused, naming both, when it is not the tokenizer the model
    was trained with; a model imported without a tokenizer needs `spec`."""
    recorded = load_tokenizer_identity(ckpt)
    where = ckpt / TOKENIZER_FILE
    if spec is not None:
        tok = load_tokenizer(spec)
    elif recorded is not None and recorded.get("sha256") is None:
        raise TokenizerError(
            f"{where}: the model came without a tokenizer "
            f"({recorded.get('reason', 'its data manifest names none')}); "
            f"pass the one it was trained with: --tokenizer SPEC"
        )
    elif recorded is not None and not recorded.get("data_path"):
        tok = load_tokenizer(recorded["spec"])  # e.g. converted by `python -m model.hf import`
    elif recorded is not None:  # the prepared data of the run
        tok = manifest_tokenizer(recorded["data_path"])
    else:  # checkpoints of older versions record nothing: the run's config says
        tok = run_tokenizer(cfg.data)
    here = tok.identity()
    if recorded is not None and recorded.get("sha256") and here["sha256"] != recorded["sha256"]:
        raise TokenizerMismatchError(
            f"{ckpt} was trained with tokenizer {recorded.get('name')!r} ({recorded.get('n_vocab')}"
            f" ids, sha256 {recorded['sha256'][:12]}, see {where}), but the tokenizer at hand "
            f"({tok.source}) is {here['name']!r} ({here['n_vocab']} ids, sha256 "
            f"{here['sha256'][:12]}); use the run's tokenizer"
        )
    if tok.n_vocab > cfg.model.vocab_size:
        raise TokenizerMismatchError(
            f"{ckpt}: tokenizer {here['name']!r} ({tok.source}) has {tok.n_vocab} ids but the model "
            f"only {cfg.model.vocab_size} (model.vocab_size): not the tokenizer it was trained with"
        )
    return tok
