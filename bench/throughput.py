"""Training throughput and model FLOPs utilization (MFU) per config.

    python -m bench.throughput --configs configs/tiny.toml configs/gpt2-124m.toml [--device auto]
        [--out FILE] [--section.key=value ...]

Writes a Markdown table to --out (default: bench/results/throughput-<device>.md); the
`--section.key=value` overrides apply to every config.

MFU is measured against the peak of a large matmul timed in the same run (fp32 on the CPU, bf16
on a GPU), so the figure means the same thing on any machine: the fraction of what this device
actually does on its best-case kernel that the training step achieves. A step is the config's
full global batch (all micro-batches), forward + backward + clip + AdamW, on random tokens.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from bench.tables import RESULTS_DIR, write_table
from common.atomic import write_text
from common.cli import parse_device
from data.loader import Batch
from job_config import load_config
from model.transformer import build_model
from parallel.parallelize import build_loss_fn
from training.optim import build_optimizer


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, seconds: float = 3.0) -> float:
    """FLOP/s of a large square matmul: fp32 on the CPU, bf16 on a GPU."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def train_throughput(config: str, device: torch.device, steps: int, warmup: int, overrides):
    cfg = load_config(config, overrides)
    t = cfg.train
    model = build_model(cfg.model, device, seed=0)
    if t.compile:
        model = torch.compile(model)
    raw = model if not t.compile else model._orig_mod
    optimizer = build_optimizer(raw, cfg.optim, device)
    accum = t.batch_size // t.micro_batch_size
    gen = torch.Generator().manual_seed(0)

    def random_batch() -> Batch:
        tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=gen)
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    batches = [random_batch() for _ in range(accum)]
    loss_fn = build_loss_fn(model, raw, cfg, device)  # train.py's loss for this config

    def step() -> None:
        for batch in batches:
            (loss_fn(batch) / accum).backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    tokens_per_s = t.batch_size * t.seq_len / seconds
    return cfg, tokens_per_s, cfg.model.flops_per_token(t.seq_len) * tokens_per_s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__.split("\n\n")[0],
        epilog="Any other --section.key=value overrides every config's field.",
    )
    parser.add_argument("--configs", nargs="+", default=["configs/tiny.toml"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    parser.add_argument(
        "--out", metavar="FILE", default=None,
        help="the results table (default: bench/results/throughput-<device>.md)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    device = parse_device(parser, args.device)
    name = device_name(device)
    peak = matmul_peak(device)
    rows = []
    for config in args.configs:
        cfg, tps, flops = train_throughput(config, device, args.steps, args.warmup, overrides)
        rows.append(
            f"| {config} | {cfg.model.num_params() / 1e6:.1f}M | {cfg.train.batch_size}x{cfg.train.seq_len} "
            f"| {tps:,.0f} | {flops / 1e9:,.1f} | {100 * flops / peak:.1f}% |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"# Training throughput on {name}",
            "",
            f"Matmul peak measured in the same run: {peak / 1e9:,.1f} GFLOP/s "
            f"({'fp32' if device.type == 'cpu' else 'bf16'}); torch {torch.__version__}.",
            "",
            "| config | params | batch | tokens/s | model GFLOP/s | MFU vs measured peak |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(table)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, table)
    else:
        path = write_table(RESULTS_DIR, "throughput", name, table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
