"""What weight-only quantization costs and saves: validation perplexity and weight memory of a run
in fp32, int8 (per output channel) and int4 (group-wise, round to nearest), in one run.

    python -m bench.quant --run runs/smollm2 [--group-sizes 32 64 128] [--max-batches 8]

Every configuration scores the same validation windows of the run's prepared data (or --data
DIR), so the perplexity ratios are paired; the bounds are issue 15's: int8 within +1% of fp32,
int4 (group 64) within +5%, weight memory / 3.5 and / 6 or better. The table goes to
bench/results/quant-<device>.md (or --out FILE).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from bench.tables import RESULTS_DIR, write_table
from bench.throughput import device_name
from common.atomic import write_text
from common.cli import add_run_arguments, parse_device
from common.errors import run_cli
from eval.perplexity import evaluate_perplexity
from inference.gptq import calibration_batches, gptq_quantize_model
from model.load import load_model
from model.quant import GROUP_SIZES, weight_bytes

# (perplexity increase allowed, memory divisor required) per configuration the issue bounds
BOUNDS = {"int8": (0.01, 3.5), "int4 g64": (0.05, 6.0), "int4 g64 GPTQ": (0.05, 6.0)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.quant", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, out_help="write the table to FILE (default: bench/results/quant-<device>.md)")
    parser.add_argument("--data", metavar="DIR", default=None, help="prepared data dir (default: the run's)")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[64], choices=GROUP_SIZES)
    parser.add_argument("--max-batches", type=int, default=8, help="validation batches (0: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=0, help="default: the run's train.seq_len")
    parser.add_argument("--gptq", action="store_true", help="also int4 (each group size) by GPTQ")
    parser.add_argument("--calibration", type=int, default=16, help="GPTQ: train windows")
    parser.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal")
    parser.add_argument("--clip", action="store_true", help="GPTQ: search each group's range")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)
    torch.set_grad_enabled(False)
    configs = [("fp32", None, 0), ("int8", "int8", 0)]
    configs += [(f"int4 g{g}", "int4", g) for g in args.group_sizes]
    options = "".join(f" +{o}" for o, on in (("act-order", args.act_order), ("clip", args.clip)) if on)
    configs += [(f"int4 g{g} GPTQ{options}", "gptq", g) for g in args.group_sizes if args.gptq]
    rows, cfg = [], None
    for name, mode, group in configs:
        model, cfg, ckpt = load_model(args.run, device, args.step, None if mode == "gptq" else mode, group or 64)
        seq_len = args.seq_len or cfg.train.seq_len
        if mode == "gptq":
            batches = calibration_batches(args.data or cfg.data.path, args.calibration, seq_len, device)
            gptq_quantize_model(model, batches, group, act_order=args.act_order, clip=args.clip)
        r = evaluate_perplexity(model, args.data or cfg.data.path, seq_len, args.batch_size,
                                args.max_batches, device)  # fmt: skip
        rows.append((name, weight_bytes(model), r))
        print(f"{name}: perplexity {r['perplexity']:.4f} over {r['tokens']} tokens, "
              f"weights {rows[-1][1] / 1e6:.1f} MB ({r['seconds']:.0f} s)", file=sys.stderr)  # fmt: skip
        del model
    table = format_table(args, device, ckpt, rows)
    print(table)
    path = Path(args.out) if args.out else write_table(RESULTS_DIR, "quant", device_name(device), table)
    if args.out:
        write_text(path, table)
    print(f"wrote {path}", file=sys.stderr)


def format_table(args, device, ckpt, rows) -> str:
    fp_bytes, fp = rows[0][1], rows[0][2]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Weight-only quantization, {device_name(device)}, torch {torch.__version__}",
        "",
        f"Checkpoint `{ckpt}`; validation data `{args.data or 'the run'}`, {fp['tokens']} target "
        f"tokens ({args.max_batches or 'all'} batches of {args.batch_size}), the same windows for "
        f"every row. int4 rounds to nearest (bf16 scale and zero per group); the embedding (tied "
        f"head) is int8 per row in both modes. Machine load: {load}.",
        "",
        "| weights | MB | fp32 / this | val loss | perplexity | vs fp32 | bits/byte | bound (ppl, memory) | holds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, nbytes, r in rows:
        ratio, mem = r["perplexity"] / fp["perplexity"], fp_bytes / nbytes
        bound = BOUNDS.get(name.split(" +")[0])
        holds = "-" if bound is None else ("yes" if ratio <= 1 + bound[0] and mem >= bound[1] else "NO")
        bound_text = "-" if bound is None else f"+{bound[0]:.0%}, / {bound[1]}"
        lines.append(f"| {name} | {nbytes / 1e6:.1f} | {mem:.2f} | {r['val_loss']:.4f} | "
                     f"{r['perplexity']:.4f} | {100 * (ratio - 1):+.2f}% | {r['bits_per_byte']:.4f} | "
                     f"{bound_text} | {holds} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(main)
