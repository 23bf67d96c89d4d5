"""python -m eval --run DIR [--step N] | --hf DIR [--tasks ...] [--device auto] [--out FILE]

Perplexity and bits per byte of a trained run on its validation shards; zero-shot benchmarks
(HellaSwag, LAMBADA, ARC-Easy/Challenge, PIQA, Winogrande) scored as lm-evaluation-harness
scores them; CORE's few-shot tasks and its aggregate; generation tasks (gsm8k, human_eval in a
sandbox); factuality and gender-bias probes. Every item is checked for contamination against
the run's training shards. The results of a run go into the run: <run>/eval/step_<N>.json.

    python -m eval --run runs/tiny                                  # perplexity only
    python -m eval --run runs/tiny --tasks hellaswag,lambada --limit 500 --out results.json
    python -m eval --hf exported/ --tasks core,probes --limit 200   # an exported model
    python -m eval --run runs/dpo --no-perplexity --preference      # held-out pairs (DPO)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common.atomic import write_json
from common.cli import add_run_arguments, parse_device
from common.device import resolve_device
from common.errors import PretrainError
from eval.core import CORE_TASKS, core_report, format_core
from eval.models import (
    LogLikelihoodModel,
    TransformerLogLikelihood,
    load_hf,
    native_tokenizer,
)
from eval.perplexity import evaluate_perplexity
from eval.preference import evaluate_preference
from eval.probes import format_probes, probe_report
from eval.scoring import format_table, run_tasks
from eval.suite import parse_tasks
from eval.tasks import TASKS
from model.checkpoint import load_config_dict
from model.load import load_model
from model.quant import add_quantize_arguments

EVAL_DIR = "eval"  # <run>/eval/<checkpoint name>.json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[2],
    )
    add_run_arguments(
        parser, run_required=False,
        out_help="write the results as JSON to FILE (default with --run: "
        "<run>/eval/step_<N>.json; with --hf: print only)",
    )
    parser.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory (an export)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=0, help="0: every validation window")
    parser.add_argument("--no-perplexity", action="store_true", help="benchmarks only")
    add_quantize_arguments(parser)
    parser.add_argument(
        "--preference", metavar="FILE", nargs="?", const="heldout", default=None,
        help="preference accuracy on a pairs file, or (no FILE) on the run's held-out pairs "
        "(eval/preference.py)",
    )
    add_benchmark_arguments(parser)
    return parser


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The zero-shot benchmark options (read by `run_benchmarks`)."""
    g = parser.add_argument_group("benchmarks")
    g.add_argument(
        "--tasks", default="",
        help="comma-separated tasks or groups: zeroshot (" + ", ".join(TASKS) + "), core "
        "(core:<label>, the 22 CORE tasks), probes (bigbench_misconceptions, winogender), "
        "generation (gsm8k, human_eval), all",
    )
    g.add_argument(
        "--max-new-tokens", metavar="N", type=int, default=None,
        help="generation tasks: at most N new tokens per answer (default: gsm8k 256, "
        "human_eval 384)",
    )
    g.add_argument("--limit", type=int, default=None, help="first N items of each task")
    g.add_argument(
        "--benchmark-dir", metavar="DIR", default=None,
        help="benchmark files: <benchmark-dir>/<task>/... (default: ../shared/benchmarks, "
        "data_cache/benchmarks, then the Hugging Face hub)",
    )
    g.add_argument(
        "--tokenizer", default=None,
        help="tiktoken name or .tiktoken file (default: the run's; for --hf: its tokenizer.json)",
    )
    g.add_argument(
        "--contamination", default="auto",
        help="prepared data dir whose train shards are checked for benchmark n-grams; 'auto': "
        "the checkpoint's data.path when it has train shards; 'off': no check",
    )
    g.add_argument(
        "--dirty-threshold", type=float, default=None,
        help="an item is dirty when this fraction of its n-grams is in the training data "
        "(default: any n-gram)",
    )
    g.add_argument(
        "--log-samples", action="store_true",
        help="include every item's log-likelihoods (and dirty flag) in the JSON",
    )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.run) == bool(args.hf):
        parser.error("give exactly one of --run DIR or --hf DIR")
    if args.hf and args.step is not None:
        parser.error("--step picks a checkpoint of --run; a --hf directory has none")
    if args.hf and args.quantize:
        parser.error("--quantize applies to a run of ours (--run), not to a --hf directory")
    if (args.hf or args.no_perplexity) and not (args.tasks or args.preference):
        parser.error("--hf and --no-perplexity need --tasks (or --preference for a run)")
    if args.hf and args.preference:
        parser.error("--preference scores a run (--run DIR): it needs the run's reference")
    args.device = parse_device(parser, args.device)
    try:
        evaluate(args)
    except (FileNotFoundError, PretrainError) as e:
        raise SystemExit(f"python -m eval: {e}") from None  # a clear message, no traceback


def evaluate(args: argparse.Namespace) -> dict:
    """Run what `args` asks for, print it, write the JSON report; returns the report."""
    # An unknown task stops here, before loading a model.
    tasks, skipped = parse_tasks(args.tasks, args.benchmark_dir)
    device = resolve_device(args.device)

    results: dict = {}
    if args.hf:
        lm, tokenizer = load_hf(args.hf, device, args.tokenizer, args.batch_size)
        results["hf"] = str(args.hf)
        ckpt = None
    else:
        model, cfg, ckpt = load_model(
            args.run, device, step=args.step, quantize=args.quantize, group_size=args.group_size
        )
        results["checkpoint"] = str(ckpt)
        if args.quantize:
            results["quantize"] = {"mode": args.quantize, "group_size": args.group_size}
        if not args.no_perplexity:
            ppl = evaluate_perplexity(
                model, cfg.data.path, cfg.train.seq_len, args.batch_size, args.max_batches, device
            )
            results.update(ppl)
            print(
                f"{ckpt}: val loss {ppl['val_loss']:.4f} | perplexity {ppl['perplexity']:.2f} | "
                f"{ppl['bits_per_byte']:.4f} bits/byte over {ppl['tokens']:,} tokens"
            )
        if tasks or args.preference:
            tokenizer = native_tokenizer(ckpt, cfg, args.tokenizer)
        if args.preference:
            results["preference"] = evaluate_preference(model, cfg, tokenizer, args.preference,
                                                        device, args.batch_size)
            for name, r in results["preference"].items():
                print(f"{ckpt}: preference {name}: " + ", ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
        if tasks:
            lm = TransformerLogLikelihood(model, args.batch_size)
    for group, names in skipped.items():
        print(f"--tasks {group}: no files for {', '.join(names)} (skipped)")
    if tasks:
        results.update(run_benchmarks(lm, tokenizer, tasks, args, ckpt))
        results["skipped"] = skipped
    out = Path(args.out) if args.out else results_path(ckpt) if ckpt else None
    if out is not None:
        write_json(out, results)
        print(f"wrote {out}")
    return results


def results_path(ckpt: Path) -> Path:
    """<run>/eval/step_<N>.json for <run>/checkpoints/step_<N> (beside a checkpoint directory
    that is not inside a run's checkpoints/)."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / EVAL_DIR / f"{ckpt.name}.json"


def contamination_dir(option: str, ckpt: Path | None) -> Path | None:
    """--contamination: a dir, 'off', or 'auto' (the checkpoint's data.path if it still has
    train shards; nothing for a Hugging Face model, whose training data is unknown)."""
    if option == "off":
        return None
    if option != "auto":
        return Path(option)
    if ckpt is None:
        return None
    data_path = Path(load_config_dict(ckpt)["data"]["path"])
    return data_path if any(data_path.glob("train_*.bin")) else None


def run_benchmarks(
    lm: LogLikelihoodModel,
    tokenizer,
    tasks: Sequence[str],
    args: argparse.Namespace,
    ckpt: Path | None = None,
) -> dict:
    """Score `tasks` with the options of `add_benchmark_arguments`; print the table; return
    {"tasks": per-task results, "contamination": settings} for the JSON report."""
    check_dir = contamination_dir(args.contamination, ckpt)
    results = run_tasks(
        lm, tokenizer, tasks, args.limit, args.benchmark_dir, check_dir, args.dirty_threshold,
        log_samples=args.log_samples, max_new_tokens=args.max_new_tokens,
    )
    print(format_table(results))
    report = {
        "tasks": results,
        "limit": args.limit,
        "contamination": {
            "data_dir": str(check_dir) if check_dir else None,
            "threshold": args.dirty_threshold if args.dirty_threshold is not None else "any",
        },
    }
    if any(name in CORE_TASKS for name in results):
        report["core"] = core_report(results)
        print(format_core(report["core"]))
    probes = probe_report(results)
    if probes:
        report["probes"] = probes
        print(format_probes(probes))
    return report


if __name__ == "__main__":
    main()
