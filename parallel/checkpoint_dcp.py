"""Saving and resuming a run in any parallel layout, in model/checkpoint.py's directory format.

    checkpoints/step_000100/
        model.safetensors   consolidated full model, our names (eval, sampling, HF export)
        train_state.pt      scheduler, loader position, RNG, step (+ the optimizer when the
                            run had one process: FQN-keyed, see below)
        config.json
        dcp/                sharded model + optimizer (torch.distributed.checkpoint), written
                            by every rank of a multi-process native run
        deepspeed/          DeepSpeed's own files (parallel.engine = "deepspeed")

All ranks write their shards into the temporary directory, then rank 0 adds the consolidated
files and renames it into place (model/checkpoint.py), so a checkpoint is complete or absent.

Resuming reads `dcp/` when present: DCP reshards on load, so a checkpoint of 2 FSDP ranks
resumes on 1 process, on tensor parallelism 2, or any other mesh. Without `dcp/` the full
model.safetensors and the full optimizer state are loaded and sharded onto the current layout.
Optimizer states are keyed by parameter name (get_optimizer_state_dict), not by position, in
both places.

A checkpoint folder that holds only a sharded DCP checkpoint (saved by another tool, or with its
model.safetensors removed) gets one, consolidated in one process, for eval and HF export:

    python -m parallel.checkpoint_dcp --run runs/NAME [--step N]    # or --run a checkpoint dir
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from common.atomic import atomic_path, temp_path
from model.checkpoint import (
    MODEL_FILE,
    CheckpointError,
    checkpoint_dir,
    find_checkpoint,
    load_model_state,
    load_train_state,
    resolve_checkpoint,
    save_checkpoint,
    save_model_state,
)
from model.config import ModelConfig
from model.load import load_job_config
from model.transformer import Transformer
from parallel.dist import barrier

DCP_DIR = "dcp"
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def save_train_checkpoint(
    run_dir: Path, step: int, model: nn.Module, raw: nn.Module, optimizer, scheduler,
    train_state: dict, config: dict, keep: int, is_main: bool, tokenizer: dict | None = None,
) -> Path:
    """Every rank calls this. `model` is what the loop calls (a DeepSpeed engine, DDP, or raw);
    `train_state` holds loader / RNG / step; optimizer and scheduler are added here."""
    from parallel.parallelize import is_deepspeed

    final = checkpoint_dir(run_dir, step)
    tmp = temp_path(final)  # where save_checkpoint assembles `final`: every rank writes into it
    if is_deepspeed(model) or _world() > 1:
        if is_main and tmp.exists():
            shutil.rmtree(tmp)
        barrier()
        if is_deepspeed(model):
            from parallel import deepspeed_engine

            deepspeed_engine.save(model, tmp)
            full = deepspeed_engine.consolidated_state_dict(model)  # + scheduler in deepspeed/
        else:
            train_state = dict(train_state, scheduler=scheduler.state_dict())
            sharded = {"model": get_model_state_dict(raw),
                       "optimizer": get_optimizer_state_dict(raw, optimizer)}
            dcp.save(sharded, checkpoint_id=tmp / DCP_DIR)
            full = None  # rank 0 reads the whole model back from the shards (any layout)
        barrier()  # every shard is on disk before rank 0 commits
        if is_main:
            if full is None:
                full = consolidate_dcp(tmp / DCP_DIR, ModelConfig(**config["model"]))
            save_checkpoint(run_dir, step, full, train_state, config, keep, keep_temp_contents=True,
                            tokenizer=tokenizer)
    elif is_main:
        optim = get_optimizer_state_dict(raw, optimizer, options=FULL)
        train_state = dict(train_state, optimizer=optim, scheduler=scheduler.state_dict())
        save_checkpoint(run_dir, step, raw.state_dict(), train_state, config, keep,
                        tokenizer=tokenizer)
    barrier()
    return final


def load_train_checkpoint(ckpt: Path, model: nn.Module, raw: nn.Module, optimizer, scheduler) -> dict:
    """Load model, optimizer and scheduler (into whatever layout they have now); returns
    train_state (loader, RNG, step)."""
    from parallel.parallelize import is_deepspeed

    state = load_train_state(ckpt)
    if is_deepspeed(model):
        from parallel import deepspeed_engine

        deepspeed_engine.load(model, ckpt)  # model, optimizer and scheduler
        return state
    if (ckpt / DCP_DIR).is_dir():
        # Targets in the current layout: DCP reads the slices each rank owns.
        sharded = {"model": get_model_state_dict(raw),
                   "optimizer": get_optimizer_state_dict(raw, optimizer)}
        try:
            dcp.load(sharded, checkpoint_id=ckpt / DCP_DIR)
        except Exception as e:  # a damaged shard or .metadata: DCP's own errors name no file
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointError(f"{ckpt / DCP_DIR}: not a readable sharded checkpoint "
                                  f"({type(e).__name__}: {first})") from None
        set_model_state_dict(raw, sharded["model"])
        set_optimizer_state_dict(raw, optimizer, sharded["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return state
    if (ckpt / "deepspeed").is_dir():
        raise ValueError(f"{ckpt} was saved by parallel.engine = 'deepspeed'; resume it with that engine")
    # Full tensors on every rank; each keeps its own shard (of its pipeline stage's part).
    load_model_weights(raw, load_model_state(ckpt), where=ckpt / MODEL_FILE)
    optim = state.get("optimizer")
    if optim is None:
        raise ValueError(f"{ckpt}/train_state.pt holds no optimizer state")
    if optim["state"] and isinstance(next(iter(optim["state"])), int):
        optim = _positional_to_named(optim, optimizer, raw)
    mine = {name for name, _ in raw.named_parameters()}
    optim = {"state": {k: v for k, v in optim["state"].items() if k in mine},
             "param_groups": [dict(g, params=[n for n in g["params"] if n in mine])
                              for g in optim["param_groups"]]}
    set_optimizer_state_dict(raw, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    return state


def load_model_weights(raw: nn.Module, full: dict[str, torch.Tensor], where: Path | str = "") -> None:
    """Full (unsharded) tensors into `raw` in whatever layout it has: each rank keeps its
    shards of the tensors its model part holds (a pipeline stage holds a few layers)."""
    mine = raw.state_dict().keys()
    missing = [k for k in mine if k not in full]
    if missing:
        raise ValueError(f"{where}: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    set_model_state_dict(raw, {k: full[k] for k in mine},
                         options=StateDictOptions(full_state_dict=True))


def _positional_to_named(optim: dict, optimizer, raw: nn.Module) -> dict:
    """A torch `optimizer.state_dict()` (parameters numbered in param-group order) keyed by
    parameter name instead, using this run's optimizer (built by the same function, so the
    same order) to map numbers to names."""
    names = {id(p): n for n, p in raw.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [dict(g, params=[order[i] for i in g["params"]]) for g in optim["param_groups"]]
    return {"state": {order[i]: s for i, s in optim["state"].items()}, "param_groups": groups}


# --- consolidating a sharded model in one process ----------------------------------------------


def find_dcp_folder(ckpt: Path) -> Path | None:
    """The folder of a checkpoint directory that holds a DCP checkpoint (its `.metadata`): our
    `dcp/`, a `model/` folder, or the directory itself; None when there is none."""
    for folder in (ckpt / DCP_DIR, ckpt / "model", ckpt):
        if (folder / ".metadata").exists():
            return folder
    return None


def consolidate_dcp(folder: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the model from a DCP checkpoint saved by any number of ranks, in one
    process: DCP reassembles each tensor from its shards by the global shapes in `.metadata`.

    Stored keys may carry a prefix (e.g. "model.embed.weight" for a {"model": ...} state dict);
    each of our parameter names must match exactly one stored key ("model."-prefixed preferred).
    """
    reader = dcp.FileSystemReader(str(folder))
    stored = {
        key: meta
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()  # names and shapes only, no memory
    buffers, keys = {}, {}
    for name, t in expected.items():
        found = [k for k in stored if k == name or k.endswith("." + name)]
        if len(found) > 1:
            found = [k for k in found if k in (name, "model." + name)] or found
        if len(found) != 1:
            raise ValueError(
                f"{folder}: expected one stored tensor for {name!r}, found {found[:4] or 'none'}"
            )
        meta = stored[found[0]]
        if tuple(meta.size) != tuple(t.shape):
            raise ValueError(
                f"{folder}: {found[0]} has shape {tuple(meta.size)}, the config says {tuple(t.shape)}"
            )
        buffers[found[0]] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        keys[name] = found[0]
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(buffers, storage_reader=reader, no_dist=True)
    return {name: buffers[key] for name, key in keys.items()}


def consolidate_checkpoint(ckpt: Path, overwrite: bool = False) -> Path:
    """Write `<ckpt>/model.safetensors` (atomically) from the checkpoint's sharded DCP model,
    with the checkpoint's own model config; returns the file."""
    out = ckpt / MODEL_FILE
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists already (pass --overwrite to write it again)")
    folder = find_dcp_folder(ckpt)
    if folder is None:
        raise FileNotFoundError(f"{ckpt}: no sharded (DCP) checkpoint (no .metadata in "
                                f"{DCP_DIR}/, model/ or the directory itself)")
    state = consolidate_dcp(folder, load_job_config(ckpt).model)
    with atomic_path(out) as tmp:
        save_model_state(state, tmp)
    return out


def build_parser() -> argparse.ArgumentParser:
    """--run DIR [--step N]; no --out: the result is the checkpoint's own model.safetensors."""
    parser = argparse.ArgumentParser(
        prog="python -m parallel.checkpoint_dcp",
        description="Consolidate a checkpoint's sharded (DCP) model into its model.safetensors.",
    )
    parser.add_argument("--run", metavar="DIR", required=True,
                        help="run directory, or a checkpoint directory")
    parser.add_argument("--step", metavar="N", type=int, default=None,
                        help="checkpoint step (default: latest)")
    parser.add_argument("--overwrite", action="store_true", help="replace model.safetensors")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.run) if args.step is None else find_checkpoint(args.run, args.step)
        out = consolidate_checkpoint(ckpt, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
