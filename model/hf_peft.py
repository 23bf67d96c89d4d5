"""A LoRA run's adapters in PEFT's format, which `peft.PeftModel.from_pretrained` loads onto the
Hugging Face export of the base model (`python -m model.hf export`):

    python -m model.hf_peft --run runs/sft-lora [--step N] --out-dir hf/sft-adapter [--base hf/base]

    hf/sft-adapter/adapter_config.json          peft_type LORA, r, lora_alpha, target_modules...
    hf/sft-adapter/adapter_model.safetensors    base_model.model.model.layers.0.self_attn.
                                                q_proj.lora_A.weight (r, in), ...lora_B (out, r)

Names (REFERENCE-POSTTRAIN.md section 2): PEFT saves the in-memory names without the adapter
name; our `blocks.{i}.attn.wq.lora_A.weight` is `base_model.model.` + the Hugging Face module
name (`model.layers.{i}.self_attn.q_proj`, model/hf_names.py) + `.lora_A.weight`. The tensors
are ours unchanged (same A, B layouts, scaling alpha / r), so the two compute the same model
for the Llama and Qwen3 exports, whose projections are ours one to one. Exports that permute
or split projections (Ernie's q/k rows, MoE experts) stop with an ExportError.

The merged model (adapters folded into the weights) is the ordinary export of the run:
`python -m model.hf export --run runs/sft-lora --out-dir hf/sft` (model/load.py merges).
"""

from __future__ import annotations

import argparse
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.atomic import atomic_dir, write_json
from common.errors import run_cli
from model.checkpoint import find_checkpoint, load_model_state, resolve_checkpoint
from model.config import PROJECTIONS, LoRAConfig, ModelConfig
from model.hf_config import LLAMA, QWEN3, ExportError, hf_architecture
from model.load import load_job_config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def hf_module_name(ours: str) -> str:
    """`blocks.3.attn.wq` -> `model.layers.3.self_attn.q_proj` (mlp: `...mlp.gate_proj`)."""
    blocks, layer, part, proj = ours.split(".")
    if blocks != "blocks" or part not in ("attn", "mlp") or proj not in PROJECTIONS:
        raise ExportError(f"{ours}: not a projection a PEFT adapter can name")
    return f"model.layers.{layer}.{'self_attn' if part == 'attn' else 'mlp'}.{PROJECTIONS[proj]}"


def peft_tensors(adapters: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our adapter tensors (`blocks.0.attn.wq.lora_A.weight`) -> PEFT's file names."""
    arch = hf_architecture(model)
    if arch not in (LLAMA, QWEN3):
        raise ExportError(f"a PEFT adapter for a {arch} export is not supported (Llama and "
                          "Qwen3 exports keep our projections one to one)")
    out = {}
    for name, t in adapters.items():
        module, _, tail = name.partition(".lora_")
        if tail not in ("A.weight", "B.weight"):
            raise ExportError(f"{name}: not a LoRA adapter tensor")
        out[f"{PREFIX}{hf_module_name(module)}.lora_{tail}"] = t.detach().contiguous().cpu()
    return out


def adapter_config(lora: LoRAConfig, target_modules: list[str], base: str,
                   layers: list[int] | None = None) -> dict:
    """adapter_config.json: what peft reads (missing keys take PEFT's defaults); `layers`:
    the adapted blocks when not all of them (layers_to_transform)."""
    try:
        version = metadata.version("peft")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "peft_version": version, "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": sorted(target_modules), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        "layers_to_transform": layers, "layers_pattern": "layers" if layers else None,
    }


def export_adapter(run: str | Path, out_dir: str | Path, step: int | None = None,
                   base: str | None = None) -> Path:
    """Write the adapters of a LoRA run's checkpoint as a PEFT adapter directory."""
    ckpt = resolve_checkpoint(run) if step is None else find_checkpoint(run, step)
    job = load_job_config(ckpt)
    if not job.lora.rank:
        raise ExportError(f"{ckpt}: not a LoRA run (lora.rank = 0); export the model itself "
                          "with python -m model.hf export")
    state = load_model_state(ckpt)
    adapters = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
    tensors = peft_tensors(adapters, job.model)
    targets = {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[1] for k in tensors}
    layers = sorted({int(k.split(".")[1]) for k in adapters})
    config = adapter_config(job.lora, sorted(targets), base or job.checkpoint.init_from,
                            layers if len(layers) < job.model.n_layers else None)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / ADAPTER_CONFIG, config, indent=2)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    """`--out-dir`: the adapter is a directory (--out names a file in every tool)."""
    parser = argparse.ArgumentParser(prog="python -m model.hf_peft",
                                     description="A LoRA run's adapters in PEFT's format.")
    parser.add_argument("--run", metavar="DIR", required=True,
                        help="run directory (or a checkpoint directory)")
    parser.add_argument("--step", metavar="N", type=int, default=None,
                        help="checkpoint step (default: latest)")
    parser.add_argument("--out-dir", metavar="DIR", required=True, help="the PEFT adapter directory")
    parser.add_argument("--base", default=None, help="base_model_name_or_path to record "
                        "(default: the run's checkpoint.init_from)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        out = export_adapter(args.run, args.out_dir, args.step, args.base)
    except (ExportError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}/{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")


if __name__ == "__main__":
    run_cli(main)
