"""A trained model back from a run: the checkpoint's config, the network built from it, the
weights loaded (model/checkpoint.py moves the files; this module builds the model).

    model, cfg, ckpt = load_model("runs/tiny")              # the newest checkpoint
    model, cfg, ckpt = load_model("runs/tiny", step=400)    # a given one
    model, cfg, ckpt = load_model("runs/tiny", quantize="int4")   # weight-only int4 (model/quant.py)

A quantized checkpoint (written by `python -m inference.quantize`) holds quantization.json and
the packed weights; it loads into a quantized model of the same shape.

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
from common.errors import MissingFileError, read_json
from data.manifest import manifest_tokenizer, run_tokenizer
from data.tokenizer import TokenizerError, TokenizerLike, TokenizerMismatchError, load_tokenizer
from job_config import JobConfig
from model.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    find_checkpoint,
    load_config_dict,
    load_model_state,
    load_tokenizer_identity,
    resolve_checkpoint,
)
from model.init import init_buffers_
from model.lora import apply_lora, merge_lora
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
    expected = f'{{"mode": one of {MODES}, "group_size": one of {GROUP_SIZES} for int4}}'
    info = read_json(path, expected)
    mode = info.get("mode") if isinstance(info, dict) else None
    if mode not in MODES or (mode == "int4" and info.get("group_size") not in GROUP_SIZES):
        raise CheckpointError(f"{path}: expected {expected}, got {info!r:.200}")
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
            raise CheckpointError(f"{ckpt} is quantized {saved}; it cannot be loaded as {quantize} (group {group_size})")
        with torch.device("meta"):
            model = Transformer(cfg.model)
        quantize_model(model, saved["mode"], saved.get("group_size") or 64, weights=False)
        model.to_empty(device=device)
        init_buffers_(model, cfg.model)  # RoPE tables; every weight is overwritten below
    else:
        model = build_model(cfg.model, device, seed=None)  # the checkpoint fills it
    state = load_model_state(ckpt)
    base_needed = set(model.state_dict()) - set(state)
    if base_needed and cfg.checkpoint.init_from and cfg.lora.rank:
        # a LoRA run holds its adapters only: the frozen parameters are its base's
        load_base_weights(model, cfg.checkpoint.init_from, f"{ckpt / CONFIG_FILE}")
    else:
        base_needed = set()
    if saved is None:  # a quantized checkpoint was written from the merged model
        apply_lora(model, cfg.lora)  # nothing without adapters
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    wrong = {n: (tuple(t.shape), shapes[n]) for n, t in state.items()
             if n in shapes and tuple(t.shape) != shapes[n]}
    missing = sorted(set(shapes) - set(state) - base_needed)
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{ckpt / MODEL_FILE} does not fit the model of {ckpt / CONFIG_FILE}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes (file, config) "
            f"{dict(list(wrong.items())[:5])}")
    model.load_state_dict(state, strict=False)  # all but the base's, checked above
    merge_lora(model)
    model.requires_grad_(True)
    if saved is None and quantize is not None:
        quantize_model(model, quantize, group_size)
    model.eval()
    return model, cfg, ckpt


def load_base_weights(model: Transformer, base: str | Path, origin: str = "config") -> None:
    """Load into `model` the weights of checkpoint or run directory `base` (any checkpoint
    `load_model` reads; a LoRA one merged). The tensors' names and shapes must agree."""
    if not Path(base).exists():
        raise MissingFileError(f"{origin}: checkpoint.init_from = {str(base)!r} does not exist "
                               "(the base model)")
    ckpt = resolve_checkpoint(base)
    if load_job_config(ckpt).lora.rank:  # adapters on a base of its own: merged in a copy
        weights, _, _ = load_model(ckpt, model.embed.weight.device)
        model.load_state_dict(weights.state_dict())
        return
    # One tensor at a time: no second copy of the model in memory.
    expected = model.state_dict()
    path = ckpt / MODEL_FILE
    if not path.exists():
        raise MissingFileError(f"{path} is missing (the base model, checkpoint.init_from of "
                               f"{origin})")
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError: a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
    with f:
        names = set(f.keys())
        if names != set(expected):
            raise CheckpointError(f"{path}: missing {sorted(set(expected) - names)[:4]}, "
                                  f"unexpected {sorted(names - set(expected))[:4]} (the base "
                                  f"model, checkpoint.init_from of {origin})")
        with torch.no_grad():
            for name in names:
                t = f.get_tensor(name)
                if t.shape != expected[name].shape:
                    raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, the model "
                                          f"{tuple(expected[name].shape)} (checkpoint.init_from "
                                          f"of {origin})")
                expected[name].copy_(t)


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
