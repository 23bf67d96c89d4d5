"""How evenly a trained Mixture-of-Experts model spreads held-out tokens over its experts.

    python -m eval.moe_load --run runs/moe-tiny [--step N] [--sequences 128] [--seq-len 128]
        [--device auto] [--out FILE]

Routes random windows of the run's validation shards through the model and prints, per MoE
layer, the fraction of token slots each expert received and the busiest / idlest ratio
(`--out`: also as JSON).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from common.atomic import write_json
from common.cli import add_run_arguments, parse_device
from data.shards import read_shard
from model.load import load_model
from model.moe import moe_layers, moe_metrics


@torch.no_grad()
def load_balance_report(model: nn.Module, tokens: torch.Tensor, batch: int = 16) -> dict:
    """Route `tokens` (n, T) through the model; moe_metrics over exactly those tokens."""
    moe_metrics(model)  # drop anything recorded before
    was_training = model.training
    model.train()  # statistics are recorded in training mode (the model has no dropout)
    for chunk in tokens.split(batch):
        model(chunk)
    for _, layer in moe_layers(model):
        layer.last_aux_loss = None  # nothing here is a training step
        layer.step_load = None
    model.train(was_training)
    return moe_metrics(model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.moe_load", description=__doc__.split("\n\n")[0]
    )
    add_run_arguments(parser, out_help="also write the report as JSON to FILE (default: print only)")
    parser.add_argument("--sequences", type=int, default=128, help="random validation windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)

    model, cfg, ckpt = load_model(args.run, device, step=args.step)
    if not cfg.model.is_moe:
        raise SystemExit(f"{ckpt}: model.n_experts = 0, not a Mixture-of-Experts model")
    shards = sorted(Path(cfg.data.path).glob("val_*.bin"))
    if not shards:
        raise SystemExit(f"{cfg.data.path}: no val_*.bin shards (data.path of {ckpt})")
    val = read_shard(shards[0])
    T = min(args.seq_len, cfg.model.max_seq_len, len(val) - 1)
    gen = torch.Generator().manual_seed(args.seed)
    # Windows at random offsets over the whole split, so that no single file dominates.
    starts = torch.randint(0, len(val) - T, (args.sequences,), generator=gen).tolist()
    tokens = torch.stack([torch.from_numpy(val[s : s + T].astype("int64")) for s in starts])
    report = load_balance_report(model, tokens.to(device))
    print(f"{ckpt}: {tokens.numel():,} validation tokens, balancing = {cfg.model.moe_balance!r}")
    for name, _ in moe_layers(model):
        fracs = [v for k, v in report.items() if k.startswith(f"moe/{name}/frac_e")]
        print(
            f"  {name}: max/min load {report[f'moe/{name}/max_min_ratio']:.2f} | fraction per "
            f"expert {' '.join(f'{f:.3f}' for f in fracs)}"
        )
    print(f"  worst layer max/min load: {report['moe/max_min_ratio']:.2f}")
    if args.out:
        write_json(Path(args.out), {"checkpoint": str(ckpt), "tokens": tokens.numel(), **report})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
