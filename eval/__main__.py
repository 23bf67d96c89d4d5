"""python -m eval --run runs/tiny [--step N] [--max-batches N] [--out results.json]

Perplexity and bits per byte of a trained run on its validation shards.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from eval.perplexity import evaluate_perplexity
from model.checkpoint import find_checkpoint, load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[1])
    parser.add_argument("--run", required=True, help="run directory (its newest checkpoint)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=0, help="0: every validation window")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    ckpt = find_checkpoint(args.run, args.step)
    model, cfg, ckpt = load_model(ckpt, args.device)
    results = evaluate_perplexity(
        model, cfg.data.path, cfg.train.seq_len, args.batch_size, args.max_batches, args.device
    )
    results["checkpoint"] = str(ckpt)
    print(
        f"{ckpt}: val loss {results['val_loss']:.4f} | perplexity {results['perplexity']:.2f} | "
        f"{results['bits_per_byte']:.4f} bits/byte over {results['tokens']:,} tokens"
    )
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
