"""Export to / import from the Hugging Face transformers format, with no custom code.

    python -m model.hf export --run runs/tiny [--step N] --out-dir hf/tiny [--max-shard-size 5GB]
    python -m model.hf import --hf hf/tiny --out-dir runs/from-hf

Which transformers class a model becomes (the first row that fits):

    MoE with moe_balance = "bias" (no qk_norm)  Ernie4_5_MoeForCausalLM  (dense layers, shared ok)
    MoE + shared experts (no qk_norm)           Qwen2MoeForCausalLM      (dense layers ok)
    MoE + qk_norm (no shared experts)           Qwen3MoeForCausalLM      (dense layers ok)
    MoE, every layer MoE                        MixtralForCausalLM
    dense + qk_norm                             Qwen3ForCausalLM
    dense                                       LlamaForCausalLM

Our parameters map one to one onto the Hugging Face names (RoPE is already the "rotate halves"
convention Llama / Qwen / Mixtral use, so q/k need no permutation; the tests compare logits).
Exact adaptations: stacked expert weights (E, ...) are written as one tensor per expert.
Qwen2-MoE's gated shared expert, sigmoid(shared_expert_gate(x)) * shared(x), gets a zero gate
(sigmoid(0) is exactly 1/2) and a down projection scaled by exactly 2, which together compute our
ungated shared expert bit for bit (scaling by a power of two is exact in floating point).
Aux-loss-free balancing (a per-expert bias added to the softmax scores to choose the experts, at
inference too) is computed exactly only by Ernie 4.5's MoE router
(`moe_statics.e_score_correction_bias`); Ernie rotates interleaved pairs, so q/k rows are
permuted per head from halves to interleaved on the way (q.k is unchanged).

A model that a target class cannot express (a feature transformers has no field for) stops with
an `ExportError` naming the feature, rather than writing files that load but compute something
else. Import is the inverse, into a run directory that training can start from.

    model/hf_config.py   the class for a model, and config.json, both ways (one row per family)
    model/hf_names.py    tensor names and the exact adaptations above, both ways
    model/hf.py          the files: safetensors shards, tokenizer, export / import, this CLI
    model/hf_gguf.py     a GGUF file -> a plain Hugging Face directory (to import from)

Export reads the checkpoint's consolidated model.safetensors (every checkpoint our training
writes has one). A folder holding only a sharded torch.distributed.checkpoint is consolidated
first with `python -m parallel.checkpoint_dcp --run DIR [--step N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from contextlib import AbstractContextManager
from importlib import metadata
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.atomic import atomic_dir, write_json, write_text
from data.hf_tokenizer import EOT, from_hf_tokenizer, save_hf_tokenizer
from data.manifest import manifest_tokenizer
from data.tokenizer import Tokenizer, load_tokenizer
from job_config import JobConfig, to_toml
from model.checkpoint import MODEL_FILE, find_checkpoint, load_model_state, resolve_checkpoint
from model.config import ModelConfig
from model.hf_config import ExportError, hf_architecture, hf_config, model_config_from_hf
from model.hf_names import EXPERT_BIAS_SUFFIXES, from_hf_state_dict, to_hf_state_dict
from model.load import load_job_config

SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DCP_COMMAND = "python -m parallel.checkpoint_dcp"  # consolidates a sharded checkpoint


# ---------------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------------


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '100KB' / '1000' -> bytes (powers of 1000, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {size!r}: expected e.g. 5GB, 500MB, 100KB or bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    scale.update(KIB=2**10, MIB=2**20, GIB=2**30)
    return int(float(m.group(1)) * scale[unit])


def write_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int
) -> list[str]:
    """One `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` plus
    `model.safetensors.index.json` when the total exceeds `max_shard_size`. Returns file names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:  # a tensor larger than the limit
            shards.append({})  # gets a shard of its own
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        _save(shards[0], out_dir / SAFETENSORS_FILE)
        return [SAFETENSORS_FILE]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        _save(shard, out_dir / fname)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(out_dir / INDEX_FILE, index, indent=2)
    return names + [INDEX_FILE]


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})  # older transformers need it
    os.chmod(path, 0o644)  # safetensors creates the file private (0600); this is for sharing


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory (single file or sharded with an index)."""
    index = hf_dir / INDEX_FILE
    if (hf_dir / SAFETENSORS_FILE).exists():
        files = [hf_dir / SAFETENSORS_FILE]
    elif index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ExportError(f"{index}: no 'weight_map' object")
        files = [hf_dir / f for f in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"{hf_dir}: no {SAFETENSORS_FILE} or {INDEX_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_model(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer=None,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write a Hugging Face model directory from our state dict; returns the architecture.

    tokenizer: our `data.tokenizer.Tokenizer` (or a tiktoken Encoding), written as
    tokenizer.json; None writes no tokenizer. dtype: 'float32' | 'bfloat16' | 'float16' or None
    to keep the checkpoint's. The directory is built beside `out_dir` and renamed into place.
    """
    arch = hf_architecture(cfg)
    encoding = getattr(tokenizer, "encoding", tokenizer)
    eot_id = None
    if encoding is not None:
        n_vocab = encoding.max_token_value + 1
        if n_vocab > cfg.vocab_size:
            raise ExportError(
                f"tokenizer {encoding.name} has ids up to {n_vocab - 1} but model.vocab_size = "
                f"{cfg.vocab_size}: the embedding does not cover every token id"
            )
        eot_id = encoding._special_tokens.get(EOT)
    tensors = to_hf_state_dict(state, cfg, arch)
    fp32_only = ".e_score_correction_bias"  # selection bias: fp32 whatever the dtype
    if dtype is not None:
        to = _dtype(dtype)
        tensors = {n: t if n.endswith(fp32_only) else t.to(to) for n, t in tensors.items()}
    dtypes = {t.dtype for n, t in tensors.items() if not n.endswith(fp32_only)}
    if len(dtypes) != 1:
        raise ExportError(f"checkpoint mixes dtypes {sorted(map(str, dtypes))}: pass --dtype")
    config = hf_config(cfg, arch, eot_id, dtypes.pop())

    out_dir = Path(out_dir)
    with _staging_dir(out_dir, overwrite) as tmp:
        write_safetensors(tensors, tmp, parse_size(max_shard_size))
        write_json(tmp / "config.json", config, indent=2)
        generation = {"do_sample": False, "transformers_version": _transformers_version()}
        if eot_id is not None:
            generation.update(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
        write_json(tmp / "generation_config.json", generation, indent=2)
        if encoding is not None:
            save_hf_tokenizer(encoding, tmp, model_max_length=cfg.max_seq_len)
    return arch


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    step: int | None = None,
    tokenizer: str | None = None,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    overwrite: bool = False,
    with_tokenizer: bool = True,
) -> str:
    """Export checkpoint `step` (default: the newest) of a run directory (or a checkpoint
    directory). The tokenizer is the run's prepared data's (data.path/manifest.json), or
    `tokenizer` (a spec for data.tokenizer.load_tokenizer) when given."""
    ckpt = resolve_checkpoint(run_dir) if step is None else find_checkpoint(run_dir, step)
    job = load_job_config(ckpt)
    state = checkpoint_model_state(ckpt)
    tok = None
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    elif with_tokenizer:
        try:
            tok = manifest_tokenizer(job.data.path)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}; the tokenizer of {ckpt} comes from its prepared data (data.path = "
                f"{job.data.path!r}): pass --tokenizer SPEC, or --no-tokenizer"
            ) from None
    return export_model(state, job.model, out_dir, tok, max_shard_size, dtype, overwrite)


def checkpoint_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The consolidated model state dict (our names) of a checkpoint directory. A checkpoint
    that holds only a sharded torch.distributed.checkpoint (a `.metadata` file in it or in a
    folder of it) stops with the command that consolidates it."""
    if not (ckpt / MODEL_FILE).exists() and any(ckpt.glob("**/.metadata")):
        raise ExportError(
            f"{ckpt} holds a sharded (DCP) checkpoint but no {MODEL_FILE}: consolidate it "
            f"first with `{DCP_COMMAND} --run {ckpt}`, then export again"
        )
    return load_model_state(ckpt)


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def import_hf(
    hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None, overwrite: bool = False
) -> ModelConfig:
    """A Hugging Face Llama / Qwen3 / Mixtral / Qwen3-MoE / Qwen2-MoE / Ernie-4.5-MoE dir -> a run
    directory holding checkpoints/step_000000 (model.safetensors in our names, config.json)
    and checkpoints/latest; the tokenizer, when it converts exactly, as tokenizer.tiktoken."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} does not exist")
    cfg, arch = model_config_from_hf(
        json.loads(config_path.read_text(encoding="utf-8")), str(config_path)
    )
    state = from_hf_state_dict(read_safetensors(hf_dir), cfg, arch, str(hf_dir))
    if dtype is not None:
        to = _dtype(dtype)
        state = {  # the balancing bias buffer stays fp32 (model/moe.py)
            n: t if n.endswith(EXPERT_BIAS_SUFFIXES) else t.to(to) for n, t in state.items()
        }
    job = JobConfig(model=cfg)
    out_dir = Path(out_dir)
    job.train.run_dir = str(out_dir)
    with _staging_dir(out_dir, overwrite) as tmp:
        tokenizer_json = hf_dir / "tokenizer.json"
        if tokenizer_json.exists():
            try:
                encoding = from_hf_tokenizer(tokenizer_json, name=hf_dir.name or "hf")
                Tokenizer(encoding, str(tokenizer_json)).save(tmp / "tokenizer.tiktoken")
                job.data.tokenizer = str(out_dir.resolve() / "tokenizer.tiktoken")
            except ValueError as e:
                print(f"tokenizer not converted ({e}); prepare data with a matching tokenizer",
                      file=sys.stderr)
        step_dir = tmp / "checkpoints" / "step_000000"
        step_dir.mkdir(parents=True)
        _save({n: t.contiguous() for n, t in state.items()}, step_dir / SAFETENSORS_FILE)
        write_json(step_dir / "config.json", job.to_dict(), indent=2)
        write_text(tmp / "checkpoints" / "latest", "step_000000\n")
        write_text(tmp / "config.toml", to_toml(job))
    return cfg


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _staging_dir(out: Path, overwrite: bool) -> AbstractContextManager[Path]:
    """A temporary directory that replaces `out` on success (common.atomic.atomic_dir: nothing
    half-written is ever at `out`); an existing non-empty `out` needs overwrite=True."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite)")
    return atomic_dir(out)


def _dtype(name: str) -> torch.dtype:
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def _transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """`--out-dir`, not `--out`: both commands write a directory (--out names a file in every
    tool, common/cli.py)."""
    parser = argparse.ArgumentParser(prog="python -m model.hf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a run's checkpoint -> Hugging Face directory")
    ex.add_argument("--run", metavar="DIR", required=True, help="run directory (holds checkpoints/)")
    ex.add_argument("--step", metavar="N", type=int, default=None,
                    help="checkpoint step (default: latest)")
    ex.add_argument("--out-dir", metavar="DIR", required=True, help="Hugging Face model directory")
    ex.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the run's)")
    ex.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    ex.add_argument("--max-shard-size", default="5GB", help="shard above this size (5GB)")
    dtypes = sorted(DTYPES) + sorted(DTYPE_ALIASES)
    ex.add_argument("--dtype", default=None, choices=dtypes, help="default: the checkpoint's")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    im = sub.add_parser("import", help="Hugging Face directory -> run directory")
    im.add_argument("--hf", metavar="DIR", required=True, help="Hugging Face model directory")
    im.add_argument("--out-dir", metavar="DIR", required=True, help="output run directory")
    im.add_argument("--dtype", default=None, choices=dtypes, help="default: the files' dtype")
    im.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            arch = export_run(
                args.run, args.out_dir, args.step, args.tokenizer, args.max_shard_size, args.dtype,
                args.overwrite, with_tokenizer=not args.no_tokenizer,
            )
            print(f"wrote {arch} to {args.out_dir}")
        else:
            cfg = import_hf(args.hf, args.out_dir, args.dtype, args.overwrite)
            print(f"wrote {args.out_dir}/checkpoints/step_000000 ({cfg.num_params():,} parameters)")
    except (ExportError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
