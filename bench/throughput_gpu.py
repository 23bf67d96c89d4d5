"""Training throughput and MFU on GPUs: tokens/s of gpt2-124m and llama-1b, with and without
torch.compile and activation checkpointing, through the same parallelize() as train.py.

    python -m bench.throughput_gpu                                # one GPU, all variants
    python -m bench.throughput_gpu --sizes llama-1b --compile on --ac none
    torchrun --nproc_per_node 8 -m bench.throughput_gpu --sizes llama-1b  # FSDP2 over 8 GPUs
    python -m bench.throughput_gpu --smoke                        # CPU check of the script

Each variant builds the model, applies FSDP2 (bf16 parameters, fp32 gradient reduction; on one
GPU too, so the numerics are those of a multi-GPU run), activation checkpointing and per-block
compile, then times `--steps` full optimizer steps (forward, backward, clip, AdamW) after
`--warmup` steps on random tokens. MFU = 6N + attention FLOPs per token (ModelConfig.
flops_per_token) x tokens/s / (peak dense bf16 FLOP/s x GPUs). Results are appended as JSON
lines with the device name to bench/results/throughput_gpu.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from job_config import JobConfig
from model.config import model_config
from model.loss import lm_loss
from model.transformer import build_model
from parallel.grads import GradSync
from parallel.parallelize import (
    apply_activation_checkpointing,
    apply_fsdp,
    fsdp_mixed_precision,
)
from training.metrics import GPU_PEAK_FLOPS
from training.optim import build_optimizer

# Per-GPU micro-batch (sequences) and sequence length of each size (fits an 80 GB H100 without
# activation checkpointing).
SHAPES = {"gpt2-124m": (16, 1024), "llama-1b": (4, 2048), "tiny": (2, 64)}  # tiny: --smoke


def bench_one(size: str, compile_: bool, ac: str, args, device: torch.device, world: int) -> dict:
    batch, seq_len = SHAPES[size]
    batch = args.batch or batch
    mcfg = model_config(size, attention=args.attention, fused_kernels=args.fused_kernels)
    job = JobConfig.from_dict({
        "model": {"size": size, "attention": args.attention},
        "train": {"seq_len": seq_len, "batch_size": batch * world, "micro_batch_size": batch,
                  "dtype": "bfloat16" if device.type == "cuda" else "float32",
                  "compile": compile_, "fused_loss": args.fused_loss},
        "parallel": {"activation_checkpointing": ac},
    })
    torch.manual_seed(0)
    model = build_model(mcfg, device, seed=0)
    apply_activation_checkpointing(model, ac)
    if compile_:
        for block in model.blocks:
            block.compile()
    from torch.distributed.device_mesh import init_device_mesh

    apply_fsdp(model, init_device_mesh(device.type, (world,)), fsdp_mixed_precision(job, device))
    optimizer = build_optimizer(model, job.optim, device)
    grads = GradSync(model, stage_size=world)  # the global norm over the FSDP shards
    tokens = torch.randint(0, mcfg.vocab_size, (batch, seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        hidden = model(inputs, return_hidden=True)
        loss = lm_loss(hidden, model.output_weight, targets, fused=args.fused_loss)
        loss.backward()
        grads.clip(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss = float(loss)  # waits for the GPU
    elapsed = time.perf_counter() - t0
    tokens_per_s = args.steps * batch * seq_len * world / elapsed
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
    mfu = mcfg.flops_per_token(seq_len) * tokens_per_s / (peak * world) if peak else None
    return {
        "size": size, "compile": compile_, "activation_checkpointing": ac, "world": world,
        "micro_batch": batch, "seq_len": seq_len, "attention": args.attention,
        "fused_loss": args.fused_loss, "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / world, "mfu": mfu,
        "step_s": elapsed / args.steps, "loss": loss,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
        "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput_gpu", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes", nargs="+", default=["gpt2-124m", "llama-1b"], choices=list(SHAPES))
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--ac", nargs="+", default=["none", "selective", "full"],
                        choices=["none", "selective", "full"])
    parser.add_argument("--attention", default="sdpa", help="model.attention backend")
    parser.add_argument("--fused-kernels", action="store_true", help="Triton norm/rope/swiglu")
    parser.add_argument("--fused-loss", action="store_true", help="Triton linear+cross-entropy")
    parser.add_argument("--batch", type=int, default=0, help="micro-batch per GPU (0: default)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--out", metavar="FILE", default=str(Path(__file__).parent / "results" / "throughput_gpu.jsonl"),
        help="JSON lines file each result is appended to (default: bench/results/throughput_gpu.jsonl)",
    )
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on the CPU: tiny model, 2 steps, nothing recorded")
    return parser


def init_device(smoke: bool) -> tuple[torch.device, int]:
    """(device, world size), with the process group FSDP2 wants even on one device: gloo on the
    CPU for --smoke, NCCL on GPUs (torchrun's WORLD_SIZE / LOCAL_RANK when set)."""
    if smoke:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return torch.device("cpu"), 1
    if not torch.cuda.is_available():
        sys.exit("bench/throughput_gpu.py needs a CUDA GPU (none found); --smoke runs on CPU")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device)
    torch.backends.cuda.matmul.allow_tf32 = True
    return device, world


def run_variant(size: str, compile_: bool, ac: str, args, device: torch.device, world: int) -> dict:
    """bench_one, with a failure (out of memory, a compile error) returned as an `error` row
    (traceback on stderr) so the other variants still run."""
    try:
        result = bench_one(size, compile_, ac, args, device, world)
    except Exception as e:
        if not isinstance(e, torch.OutOfMemoryError):
            traceback.print_exc()
        error = "out of memory" if isinstance(e, torch.OutOfMemoryError) else (
            f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        result = {"size": size, "compile": compile_, "activation_checkpointing": ac,
                  "attention": args.attention, "fused_loss": args.fused_loss,
                  "error": error, "device": name}
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def result_line(result: dict) -> str:
    mfu = f"{100 * result['mfu']:.1f}%" if result.get("mfu") else "-"
    head = (f"{result['size']:10s} compile={'on' if result['compile'] else 'off':3s} "
            f"ac={result['activation_checkpointing']:9s} ")
    if "error" in result:
        return head + result["error"]
    return head + (f"{result['tokens_per_s_per_gpu']:>10,.0f} tok/s/GPU  MFU {mfu}  "
                   f"{result['peak_mem_gib']:.1f} GiB")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.sizes, args.compile, args.steps, args.warmup = ["tiny"], ["off"], 2, 1
        args.out = os.devnull
    device, world = init_device(args.smoke)
    out = Path(args.out)
    for size, comp, ac in itertools.product(args.sizes, args.compile, args.ac):
        result = run_variant(size, comp == "on", ac, args, device, world)
        if dist.get_rank() == 0:
            print(result_line(result), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
