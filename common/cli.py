"""The command-line convention of every tool, in one place.

Every tool that reads a trained run takes the same four flags:

    --run DIR      a run directory (its newest checkpoint), or one of its checkpoint directories
    --step N       that run's checkpoint of step N (default: the newest)
    --device auto  auto | cpu | cuda[:N] (common/device.py)
    --out FILE     the one file the tool writes its results to (JSON, or a table for benchmarks)

Flags are kebab-case (`--max-new-tokens`); only train.py, data.prepare and bench.throughput
also take `--section.key=value` overrides of the job config. A tool that writes a directory
names the flag `--out-dir`, so that `--out` always names a file. Each tool builds its parser in
a `build_parser()` function, which tests/test_cli.py reads to check all of this.
"""

from __future__ import annotations

import argparse

import torch

from common.device import resolve_device


def add_run_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    out_help: str,
    run_required: bool = True,
) -> None:
    """Add --run DIR, --step N, --device auto and --out FILE (`out_help` says what is written
    there and what happens without it)."""
    parser.add_argument(
        "--run", metavar="DIR", required=run_required,
        help="run directory (its newest checkpoint, or --step), or a checkpoint directory",
    )
    parser.add_argument(
        "--step", metavar="N", type=int, default=None, help="checkpoint step (default: newest)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    parser.add_argument("--out", metavar="FILE", default=None, help=out_help)


def parse_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """`--device` resolved, or the parser's usage error naming the flag."""
    try:
        return resolve_device(name)
    except ValueError as e:
        parser.error(str(e))
