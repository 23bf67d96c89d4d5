"""How evenly a trained Mixture-of-Experts model spreads held-out tokens over its experts.

    python -m eval.moe_load --run runs/moe-tiny [--step N] [--sequences 128] [--seq-len 128]

Routes random windows of the run's validation shards through the model and prints, per MoE
layer, the fraction of token slots each expert received and the busiest / idlest ratio.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.moe_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory or checkpoint directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--sequences", type=int, default=128, help="random validation windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, cfg, ckpt = load_model(args.run, args.device, step=args.step)
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
    device = next(model.parameters()).device
    report = load_balance_report(model, tokens.to(device))
    print(f"{ckpt}: {tokens.numel():,} validation tokens, balancing = {cfg.model.moe_balance!r}")
    for name, _ in moe_layers(model):
        fracs = [v for k, v in report.items() if k.startswith(f"moe/{name}/frac_e")]
        print(
            f"  {name}: max/min load {report[f'moe/{name}/max_min_ratio']:.2f} | fraction per "
            f"expert {' '.join(f'{f:.3f}' for f in fracs)}"
        )
    print(f"  worst layer max/min load: {report['moe/max_min_ratio']:.2f}")


if __name__ == "__main__":
    main()
