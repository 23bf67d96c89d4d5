"""Export to / import from the Hugging Face transformers format, with no custom code.

    python -m model.hf export --run runs/tiny [--step N] --out-dir hf/tiny [--max-shard-size 5GB]
    python -m model.hf import --hf hf/tiny --out-dir runs/from-hf

Which transformers class a model becomes (the first row that fits):

    MoE with moe_balance = "bias" (no qk_norm)  Ernie4_5_MoeForCausalLM  (dense layers, shared ok)
    MoE + shared experts (no qk_norm)           Qwen2MoeForCausalLM      (dense layers ok)
    MoE + qk_norm (no shared experts)           Qwen3MoeForCausalLM      (dense layers ok)
    MoE, every layer MoE                        MixtralForCausalLM
    dense + qkv_bias (no qk_norm)               Qwen2ForCausalLM
    dense + qk_norm                             Qwen3ForCausalLM
    dense                                       LlamaForCausalLM

RoPE scaling (model.rope_scaling: linear, llama3, yarn, dynamic) is written as `rope_scaling`
and read back from `rope_scaling` / `rope_parameters`; anything else our model does not compute
(another rope_type, sliding windows, biases on the output or MLP projections...) stops the
import with the field named.

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

An imported model is a normal run: its tokenizer files are kept in <run>/tokenizer (with the
model's generation_config.json) and its config says data.tokenizer = "hf:<run>/tokenizer", so
data.prepare (continued pretraining on data tokenized the model's way), model.generate, eval
and export all use it; export writes the same tokenizer files and chat template back.

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
import dataclasses
import importlib.util
import os
import re
import sys
from contextlib import AbstractContextManager
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.atomic import atomic_dir, naming, write_bytes, write_json, write_text
from common.errors import MissingFileError, read_json, run_cli
from data.hf_tokenizer import (
    TOKENIZER_FILES,
    HFTokenizer,
    save_hf_tokenizer,
    token_ids,
    transformers_differences,
)
from data.tokenizer import HF_PREFIX, Tokenizer
from job_config import JobConfig, to_toml
from model.checkpoint import (
    MODEL_FILE,
    TOKENIZER_FILE,
    find_checkpoint,
    load_model_state,
    read_safetensors_file,
    resolve_checkpoint,
)
from model.config import ModelConfig
from model.hf_config import (
    QWEN2_MOE,
    ExportError,
    hf_architecture,
    hf_config,
    model_config_from_hf,
)
from model.hf_names import (
    EXPERT_BIAS_SUFFIXES,
    from_hf_state_dict,
    has_qkv_biases,
    to_hf_state_dict,
)
from model.load import checkpoint_tokenizer, load_job_config

SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DCP_COMMAND = "python -m parallel.checkpoint_dcp"  # consolidates a sharded checkpoint
IMPORTED_LR = 1e-4  # optim.lr in an imported run's config.toml (continued pretraining)


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
    with naming(path):  # safetensors reports a full disk as a SafetensorError
        save_file(tensors, str(path), metadata={"format": "pt"})  # older transformers need it
    os.chmod(path, 0o644)  # safetensors creates the file private (0600); this is for sharing


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory (single file or sharded with an index)."""
    index = hf_dir / INDEX_FILE
    if (hf_dir / SAFETENSORS_FILE).exists():
        files = [hf_dir / SAFETENSORS_FILE]
    elif index.exists():
        weight_map = read_json(index, "a safetensors index (a JSON object)")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) and Path(f).name == f for f in weight_map.values()):
            raise ExportError(f"{index}: expected a 'weight_map' of tensor -> file name in {hf_dir}")
        files = [hf_dir / f for f in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"{hf_dir}: no {SAFETENSORS_FILE} or {INDEX_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(read_safetensors_file(path))  # names a damaged file
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

    tokenizer: ours (`data.tokenizer.Tokenizer`, or a tiktoken Encoding), written as
    tokenizer.json; or an imported model's (`HFTokenizer`), whose files are copied as they are
    (chat template included) with its generation_config.json and bos / eos / pad ids; None
    writes no tokenizer. dtype: 'float32' | 'bfloat16' | 'float16' or None to keep the
    checkpoint's. The directory is built beside `out_dir` and renamed into place.
    """
    arch = hf_architecture(cfg)
    if tokenizer is not None and not hasattr(tokenizer, "eot_id"):  # a bare tiktoken Encoding
        tokenizer = Tokenizer(tokenizer, tokenizer.name)
    ids = {}
    if tokenizer is not None:
        if tokenizer.n_vocab > cfg.vocab_size:
            raise ExportError(
                f"tokenizer {tokenizer.name} has ids up to {tokenizer.n_vocab - 1} but "
                f"model.vocab_size = {cfg.vocab_size}: the embedding does not cover every token id"
            )
        ids = token_ids(tokenizer)
    tensors = to_hf_state_dict(state, cfg, arch)
    fp32_only = ".e_score_correction_bias"  # selection bias: fp32 whatever the dtype
    if dtype is not None:
        to = _dtype(dtype)
        tensors = {n: t if n.endswith(fp32_only) else t.to(to) for n, t in tensors.items()}
    dtypes = {t.dtype for n, t in tensors.items() if not n.endswith(fp32_only)}
    if len(dtypes) != 1:
        raise ExportError(f"checkpoint mixes dtypes {sorted(map(str, dtypes))}: pass --dtype")
    config = hf_config(cfg, arch, ids, dtypes.pop())

    out_dir = Path(out_dir)
    with _staging_dir(out_dir, overwrite) as tmp:
        write_safetensors(tensors, tmp, parse_size(max_shard_size))
        write_json(tmp / "config.json", config, indent=2)
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.save(tmp)
            generation = dict(tokenizer.generation_config)
        elif tokenizer is not None:
            save_hf_tokenizer(tokenizer.encoding, tmp, model_max_length=cfg.max_seq_len)
            generation = {"do_sample": False}
        else:
            generation = {"do_sample": False}
        generation.update({k: v for k, v in ids.items() if v is not None})
        generation["transformers_version"] = _transformers_version()
        write_json(tmp / "generation_config.json", generation, indent=2)
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
    directory). The tokenizer is the one the checkpoint records (model.load.checkpoint_tokenizer:
    its run's prepared data, or an imported run's own), or `tokenizer` (a spec for
    data.tokenizer.load_tokenizer) when given, which must be the same tokenizer."""
    ckpt = resolve_checkpoint(run_dir) if step is None else find_checkpoint(run_dir, step)
    job = load_job_config(ckpt)
    state = checkpoint_model_state(ckpt)
    tok = None
    if with_tokenizer or tokenizer:
        try:  # the one the checkpoint records, or `tokenizer` checked against it
            tok = checkpoint_tokenizer(ckpt, job, tokenizer)
        except FileNotFoundError as e:
            raise MissingFileError(
                f"{e}; the tokenizer of {ckpt} comes from its prepared data (data.path = "
                f"{job.data.path!r}) or data.tokenizer: pass --tokenizer SPEC, or --no-tokenizer"
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
    hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None, overwrite: bool = False,
    check_tokenizer: bool = True,
) -> ModelConfig:
    """A Hugging Face Llama / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE / Qwen2-MoE / Ernie-4.5-MoE dir
    -> a run directory holding checkpoints/step_000000 (model.safetensors in our names,
    config.json), checkpoints/latest, config.toml and the model's tokenizer in `tokenizer/`
    (`data.tokenizer = "hf:<run>/tokenizer"`: data.prepare, generate, eval and export use it).

    The tokenizer files are copied as they are, with a generation_config.json (the model's, its
    bos / eos / pad ids filled in from config.json). check_tokenizer: compare our encoding with
    transformers' AutoTokenizer of `hf_dir` on a probe text (when transformers is installed);
    where they differ (a tokenizer class that rebuilds its pipeline) the directory gets the
    tokenizer.json AutoTokenizer saves, and must then agree.
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    hf_config_dict = read_json(config_path, "a Hugging Face model config (a JSON object)")
    if not isinstance(hf_config_dict, dict):
        raise ExportError(f"{config_path}: expected a JSON object")
    cfg, arch = model_config_from_hf(hf_config_dict, str(config_path))
    tensors = read_safetensors(hf_dir)
    if arch == QWEN2_MOE and has_qkv_biases(tensors, cfg):
        cfg = dataclasses.replace(cfg, qkv_bias=True)
    state = from_hf_state_dict(tensors, cfg, arch, str(hf_dir))
    if dtype is not None:
        to = _dtype(dtype)
        state = {  # the balancing bias buffer stays fp32 (model/moe.py)
            n: t if n.endswith(EXPERT_BIAS_SUFFIXES) else t.to(to) for n, t in state.items()
        }
    job = JobConfig(model=cfg)
    out_dir = Path(out_dir)
    job.train.run_dir = str(out_dir)
    job.train.seq_len = min(job.train.seq_len, cfg.max_seq_len)
    # Continued training of a trained model: a peak learning rate far below a fresh run's.
    job.optim.lr = IMPORTED_LR
    # Not prepared yet: `python -m data.prepare --config <run>/config.toml` fills it with the
    # model's own tokenizer (no other data dir's tokenizer is ever picked up by mistake).
    job.data.path = str(out_dir.resolve() / "data")
    with _staging_dir(out_dir, overwrite) as tmp:
        tokenizer_json = hf_dir / "tokenizer.json"
        # Recorded in the checkpoint: sampling / evaluation use it, or refuse without one.
        identity = {"sha256": None, "reason": f"{tokenizer_json} does not exist"}
        if tokenizer_json.exists():
            try:
                tok = _import_tokenizer(hf_dir, tmp / "tokenizer", hf_config_dict, check_tokenizer)
                job.data.tokenizer = HF_PREFIX + str(out_dir.resolve() / "tokenizer")
                if tok.n_vocab > cfg.vocab_size:
                    raise ExportError(f"{hf_dir}: the tokenizer has {tok.n_vocab} ids, the "
                                      f"model's vocab_size is {cfg.vocab_size}")
                identity = {**tok.identity(), "name": out_dir.name, "spec": job.data.tokenizer}
            except ValueError as e:
                identity["reason"] = f"{tokenizer_json} not imported: {e}"
                job.data.tokenizer = JobConfig().data.tokenizer
                print(f"tokenizer not imported ({e}); prepare data with a matching tokenizer",
                      file=sys.stderr)
        step_dir = tmp / "checkpoints" / "step_000000"
        step_dir.mkdir(parents=True)
        _save({n: t.contiguous() for n, t in state.items()}, step_dir / SAFETENSORS_FILE)
        write_json(step_dir / "config.json", job.to_dict(), indent=2)
        write_json(step_dir / TOKENIZER_FILE, identity)
        write_text(tmp / "checkpoints" / "latest", "step_000000\n")
        write_text(tmp / "config.toml", to_toml(job))
    return cfg


def _import_tokenizer(hf_dir: Path, out: Path, config: dict, check: bool) -> HFTokenizer:
    """Copy the tokenizer files of `hf_dir` to `out` (see import_hf) and load them."""
    out.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file() and name != "generation_config.json":
            write_bytes(out / name, (hf_dir / name).read_bytes())
    generation = {}
    if (hf_dir / "generation_config.json").is_file():
        generation = read_json(hf_dir / "generation_config.json")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if generation.get(key) is None and config.get(key) is not None:
            generation[key] = config[key]
    write_json(out / "generation_config.json", generation, indent=2)
    tok = HFTokenizer(out)
    if not check or importlib.util.find_spec("transformers") is None:
        return tok
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    if transformers_differences(tok, reference):
        reference.save_pretrained(out)  # what AutoTokenizer built, as its tokenizer.json
        tok = HFTokenizer(out)
        if diff := transformers_differences(tok, reference):
            raise ExportError(f"{hf_dir}: our tokenizer differs from AutoTokenizer's: {diff}")
    return tok


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
    im.add_argument("--no-tokenizer-check", action="store_true",
                    help="skip comparing the tokenizer with transformers' AutoTokenizer")
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
            cfg = import_hf(args.hf, args.out_dir, args.dtype, args.overwrite,
                            check_tokenizer=not args.no_tokenizer_check)
            print(f"wrote {args.out_dir}/checkpoints/step_000000 ({cfg.num_params():,} parameters)")
    except (ExportError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    run_cli(main)
