"""Multiple-choice scoring speed: ours (one forward of each item's shared context, batched by
length) against lm-evaluation-harness, on HellaSwag, same model, same machine, one run.

    python -m bench.eval_speed --hf data_cache/hf/SmolLM2-135M-Instruct --limit 200

Both sides score the same items with the same prompts (0-shot: lm-eval's HellaSwag prompt;
10-shot: CORE's, examples drawn as eval/icl.py draws them; lm-eval builds its prompts from task
folders written by bench/lm_eval_parity.py) at the same batch size. Timed: lm-eval's
`simple_evaluate` (model already loaded) against our `evaluate_task`, both including
tokenization; also ours request by request (lm-eval's algorithm in our code), and the CPU
seconds of the process. The table ends with the items on which the two disagree (acc,
acc_norm, acc_per_token), which must be none. Written to bench/results/eval-speed-<device>.md.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.lm_eval_parity import compare, lm_eval_model, run_lm_eval, write_lm_eval_task
from bench.tables import RESULTS_DIR, write_table
from common.cli import parse_device
from eval.core import CORE_TASKS, core_docs
from eval.icl import icl_items
from eval.models import load_hf
from eval.scoring import evaluate_task

SETTINGS = {0: "core:hellaswag_zeroshot", 10: "core:hellaswag"}


def timed(fn, *args, **kwargs):
    """fn(*args, **kwargs), its wall-clock seconds and the process's CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def measure(hf_dir: str, shots: list[int], limit: int, batch_size: int, device, rounds: int,
            data_dir=None, each: bool = True) -> list[dict]:
    """Per few-shot setting: both sides' seconds and their agreement. The items are split into
    `rounds` slices scored alternately (lm-eval, ours, request by request), so a machine whose
    load changes during the run slows both sides alike."""
    lm, tok = load_hf(hf_dir, device, batch_size=batch_size)
    theirs_lm = lm_eval_model(hf_dir, batch_size, str(device))
    rows = []
    for k in shots:
        name = SETTINGS[k]
        task = CORE_TASKS[name].task
        docs = core_docs(name, data_dir)
        items = icl_items(task, docs, limit)
        bounds = [round(i * len(items) / rounds) for i in range(rounds + 1)]
        t = dict.fromkeys(("lm_eval_s", "lm_eval_cpu_s", "ours_s", "ours_cpu_s", "ours_each_s"), 0.0)
        samples, ours_samples = {}, []
        for lo, hi in zip(bounds, bounds[1:]):
            with tempfile.TemporaryDirectory() as tmp:
                lm_name = write_lm_eval_task(task, docs, hi, Path(tmp), start=lo)
                theirs = run_lm_eval(theirs_lm, {lm_name: Path(tmp)})
            samples.update(theirs["samples"][lm_name])
            t["lm_eval_s"] += theirs["seconds"][lm_name]  # simple_evaluate only
            t["lm_eval_cpu_s"] += theirs["cpu_seconds"][lm_name]
            ours, wall, cpu = timed(
                evaluate_task, lm, tok, name, items[lo:hi], progress=False, log_samples=True
            )
            ours_samples += ours["samples"]
            t["ours_s"] += wall
            t["ours_cpu_s"] += cpu
            if each:  # optional: it costs as much again as lm-eval's side
                _, wall, _ = timed(
                    evaluate_task, lm, tok, name, items[lo:hi], progress=False, shared_context=False
                )
                t["ours_each_s"] += wall
        whole = {"samples": ours_samples, "metrics": {"all": {}}}
        agree = compare(task, whole, items, samples)
        rows.append({"shots": k, "n": len(items), **t, "speedup": t["lm_eval_s"] / t["ours_s"],
                     "cpu_speedup": t["lm_eval_cpu_s"] / t["ours_cpu_s"], **agree})
    return rows


def format_rows(rows: list[dict], title: str) -> str:
    head = ("| shots | items | lm-eval s | ours s | speedup | ours request by request s | "
            "lm-eval CPU s | ours CPU s | CPU speedup | acc (ours / lm-eval) | acc_norm (ours / lm-eval) | "
            "items differing (acc, acc_norm, acc_per_token) | max abs dloglik |")
    lines = [title, "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d = r["items_differing"]
        each = f"{r['ours_each_s']:.1f}" if r["ours_each_s"] else "not timed"
        lines.append(
            f"| {r['shots']} | {r['n']} | {r['lm_eval_s']:.1f} | {r['ours_s']:.1f} | "
            f"{r['speedup']:.2f}x | {each} | {r['lm_eval_cpu_s']:.1f} | "
            f"{r['ours_cpu_s']:.1f} | {r['cpu_speedup']:.2f}x | {r['ours']['acc']:.4f} / {r['lm_eval']['acc']:.4f} | "
            f"{r['ours']['acc_norm']:.4f} / {r['lm_eval']['acc_norm']:.4f} | "
            f"{d['acc']}, {d['acc_norm']}, {d['acc_per_token']} | {r['max_abs_dloglik']:.1e} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", metavar="DIR", required=True, help="a Hugging Face model dir")
    parser.add_argument("--limit", type=int, default=200, help="HellaSwag items")
    parser.add_argument("--shots", default="0,10", help="few-shot counts to measure (0, 10)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward, both")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="slices of the items, scored alternately by both sides")
    parser.add_argument("--no-each", action="store_true",
                        help="skip timing ours request by request")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    parser.add_argument("--benchmark-dir", metavar="DIR", default=None)
    parser.add_argument("--out-dir", metavar="DIR", default=str(RESULTS_DIR),
                        help="where eval-speed-<device>.md goes")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shots = [int(s) for s in args.shots.split(",")]
    bad = [s for s in shots if s not in SETTINGS]
    if bad:
        parser.error(f"--shots: {bad} not in {sorted(SETTINGS)}")
    rows = measure(args.hf, shots, args.limit, args.batch_size, device, args.rounds,
                   args.benchmark_dir, each=not args.no_each)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    title = (f"HellaSwag multiple-choice scoring, {Path(args.hf).name}, {device} "
             f"({name}, {torch.get_num_threads()} threads), batch size {args.batch_size}")
    table = format_rows(rows, title)
    print(table)
    path = write_table(args.out_dir, "eval-speed", name, table + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
