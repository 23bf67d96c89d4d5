"""python -m eval --run DIR [--step N] | --checkpoint PATH | --hf DIR [--tasks ...] [--out FILE]

Perplexity and bits per byte of a trained run on its validation shards, and zero-shot
benchmarks (HellaSwag, LAMBADA, ARC-Easy/Challenge, PIQA, Winogrande) scored as
lm-evaluation-harness scores them, each item checked for contamination against the run's
training shards.

    python -m eval --run runs/tiny                                  # perplexity only
    python -m eval --run runs/tiny --tasks hellaswag,lambada --limit 500 --out results.json
    python -m eval --hf exported/ --tasks all                       # an exported model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.atomic import write_json
from data.shards import ShardError
from eval.harness import (
    TokenizerMismatchError,
    TransformerLogLikelihood,
    add_benchmark_arguments,
    load_hf,
    native_tokenizer,
    parse_tasks,
    run_benchmarks,
)
from eval.perplexity import evaluate_perplexity
from eval.tasks import TaskDataError
from model.checkpoint import find_checkpoint, resolve_checkpoint
from model.load import load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eval", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[2],
    )
    parser.add_argument("--run", help="run directory (its newest checkpoint, or --step)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--checkpoint", help="a checkpoint directory (or a run directory)")
    parser.add_argument("--hf", help="a Hugging Face model directory (e.g. an export)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=0, help="0: every validation window")
    parser.add_argument("--no-perplexity", action="store_true", help="benchmarks only")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_benchmark_arguments(parser)
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.run, args.checkpoint, args.hf)) != 1:
        parser.error("give exactly one of --run DIR, --checkpoint PATH or --hf DIR")
    if (args.hf or args.no_perplexity) and not args.tasks:
        parser.error("--hf and --no-perplexity need --tasks")
    try:
        evaluate(args)
    except (FileNotFoundError, TaskDataError, TokenizerMismatchError, ShardError) as e:
        raise SystemExit(f"python -m eval: {e}") from None  # a clear message, no traceback


def evaluate(args: argparse.Namespace) -> None:
    tasks = parse_tasks(args.tasks)  # an unknown task stops here, before loading a model

    results: dict = {}
    if args.hf:
        lm, tokenizer = load_hf(args.hf, args.device, args.tokenizer, args.batch_size)
        results["hf"] = str(args.hf)
        ckpt = None
    else:
        ckpt = find_checkpoint(args.run, args.step) if args.run else args.checkpoint
        model, cfg, ckpt = load_model(resolve_checkpoint(ckpt), args.device)
        results["checkpoint"] = str(ckpt)
        if not args.no_perplexity:
            ppl = evaluate_perplexity(
                model, cfg.data.path, cfg.train.seq_len, args.batch_size, args.max_batches,
                args.device,
            )
            results.update(ppl)
            print(
                f"{ckpt}: val loss {ppl['val_loss']:.4f} | perplexity {ppl['perplexity']:.2f} | "
                f"{ppl['bits_per_byte']:.4f} bits/byte over {ppl['tokens']:,} tokens"
            )
        if tasks:
            tokenizer = native_tokenizer(ckpt, cfg, args.tokenizer)
            lm = TransformerLogLikelihood(model, args.batch_size)
    if tasks:
        results.update(run_benchmarks(lm, tokenizer, tasks, args, ckpt))
    if args.out:
        out = Path(args.out)
        write_json(out, results)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
