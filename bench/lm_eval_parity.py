"""Our few-shot scores against lm-evaluation-harness's, on the same items with the same examples.

    python -m bench.lm_eval_parity --hf data_cache/hf/SmolLM2-135M-Instruct --limit 100
    python -m bench.lm_eval_parity --run runs/tiny --tasks core:arc_easy,core:winogrande

For each task, an lm-eval task folder is written from the same file: a YAML (the task type's
lm-eval output type, the per-task delimiters, the few-shot count), a jsonl of the items, each
carrying the few-shot documents eval/icl.py drew for it, and a sampler that hands lm-eval those
documents, so lm-eval builds every prompt itself (its `fewshot_context`, target and few-shot
delimiters). lm-eval's own HFLM scores them (for --run: on the checkpoint exported to a
temporary Hugging Face directory; our side scores the native model). The table gives per task
acc / acc_norm / acc_per_token on both sides (lm-eval has no per-token metric: its
log-likelihoods divided by the continuation token counts), the items whose prediction
differs, and the largest log-likelihood difference. Needs `pip install lm-eval`.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.tables import write_table
from common.cli import add_run_arguments, parse_device
from eval.core import CORE_TASKS, core_docs
from eval.icl import IclTask, fewshot_table, icl_items, load_icl_docs
from eval.probes import PROBE_TASKS
from eval.scoring import evaluate_task
from eval.suite import icl_info

LM_TYPE = {"multiple_choice": "multiple_choice", "schema": "multiple_choice",
           "language_modeling": "loglikelihood"}
SAMPLER = '''from lm_eval.api.samplers import ContextSampler


class FixedSampler(ContextSampler):
    """The few-shot documents our harness drew for this item (carried in the document)."""

    def sample(self, n, eval_doc=None, df=None, **kwargs):
        shots = list(eval_doc["fewshot"])
        assert len(shots) == n, (len(shots), n)
        return shots
'''


def lm_eval_fields(task: IclTask, doc: dict) -> dict:
    """A document's fields as the task YAML reads them."""
    if task.kind == "multiple_choice":
        # The delimiter belongs to the context (as in CORE); lm-eval adds its target
        # delimiter to the continuation, so the test document carries it and the target
        # delimiter is "" (few-shot examples: `text_fs` + delimiter + gold choice).
        return {"text": doc["query"] + task.delimiter, "text_fs": doc["query"],
                "choices": doc["choices"], "gold": doc["gold"]}
    if task.kind == "schema":
        return {"gold": doc["gold"], "choices": doc["context_options"],
                "target": doc["continuation"]}
    context = doc["context"].strip()
    return {"text": context + task.delimiter, "text_fs": context, "target": doc["continuation"]}


def write_lm_eval_task(
    task: IclTask, docs: list[dict], limit: int | None, folder: Path, start: int = 0
) -> str:
    """An lm-eval task folder for items start .. limit - 1 of `docs`; returns its task name."""
    name = "parity_" + task.name.replace(":", "_")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for idx, shots in enumerate(fewshot_table(task, len(docs), limit)):
        if idx < start:
            continue
        rows.append({**lm_eval_fields(task, docs[idx]), "idx": idx,
                     "fewshot": [lm_eval_fields(task, docs[j]) for j in shots]})
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "sampler.py").write_text(SAMPLER)
    kind = task.kind
    config = {
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test", "fewshot_split": "test", "output_type": LM_TYPE[kind],
        "doc_to_text": "gold" if kind == "schema" else "text",
        "doc_to_target": "gold" if kind == "multiple_choice" else "target",
        "target_delimiter": task.delimiter if kind == "schema" else "",
        "num_fewshot": task.num_fewshot,
        "metric_list": [{"metric": "acc"}] + ([{"metric": "acc_norm"}] if kind != "language_modeling" else []),
    }
    if kind != "language_modeling":
        config["doc_to_choice"] = "choices"
    fewshot = {"target_delimiter": task.delimiter, "fewshot_delimiter": task.fewshot_delimiter}
    if kind != "schema":
        fewshot["doc_to_text"] = "text_fs"
    # YAML holds JSON; only the sampler needs YAML's !function tag.
    text = json.dumps(config, indent=1)[:-2]
    text += ',\n "fewshot_config": {"sampler": !function sampler.FixedSampler, '
    text += ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in fewshot.items()) + "}\n}\n"
    (folder / f"{name}.yaml").write_text(text)
    return name


def lm_eval_model(hf_dir: str | Path, batch_size: int, device: str):
    """lm-eval's own HFLM on a Hugging Face directory (fp32, no BOS: as our encode_pair)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), batch_size=batch_size, device=device, dtype="float32",
                add_bos_token=False)


def run_lm_eval(lm, folders: dict[str, Path]) -> dict:
    """lm-eval (`lm`: lm_eval_model's) on the task folders: {"samples": {task name: {idx: (lls, acc,
    acc_norm)}}, "seconds" / "cpu_seconds": {task name: wall / CPU seconds of its
    simple_evaluate} (import and model loading excluded)}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Only our folders: indexing lm-eval's thousands of built-in task files takes minutes here.
    manager = TaskManager(include_path=[str(f) for f in folders.values()], include_defaults=False)
    out, seconds, cpu_seconds = {}, {}, {}
    for name in folders:
        start, cpu = time.perf_counter(), time.process_time()
        res = simple_evaluate(model=lm, tasks=[name], task_manager=manager, log_samples=True,
                              bootstrap_iters=0, verbosity="ERROR")
        seconds[name] = time.perf_counter() - start
        cpu_seconds[name] = time.process_time() - cpu
        per_doc = {}
        for s in res["samples"][name]:
            lls = [float(r[0][0]) for r in s["resps"]]
            per_doc[s["doc"]["idx"]] = (lls, s["acc"], s.get("acc_norm"))
        out[name] = per_doc
    return {"samples": out, "seconds": seconds, "cpu_seconds": cpu_seconds}


def compare(task: IclTask, ours: dict, items: list, theirs: dict[int, tuple]) -> dict:
    """Per-item agreement of our result (evaluate_task with log_samples on `items`) and
    lm-eval's: metrics on both sides, items whose prediction differs, max |log-lik diff|."""
    rows = {s["index"]: s for s in ours["samples"]}
    lengths = {it.index: np.array(it.choice_lengths) for it in items}
    metrics = ("acc",) if task.kind == "language_modeling" else ("acc", "acc_norm", "acc_per_token")
    ours_m: dict[str, list[float]] = {k: [] for k in metrics}
    lm_m: dict[str, list[float]] = {k: [] for k in metrics}
    differ = dict.fromkeys(metrics, 0)
    max_dll = 0.0
    for idx, (lls, acc, acc_norm) in theirs.items():
        s = rows[idx]
        mine_ll, n_tok, gold = np.array(s["loglik"]), np.array(s["n_tokens"]), s["gold"]
        max_dll = max(max_dll, float(np.max(np.abs(np.array(lls) - mine_ll))))
        if task.kind == "language_modeling":
            mine, other = {"acc": float(all(s["greedy"]))}, {"acc": float(acc)}
        else:
            mine = {
                "acc": float(np.argmax(mine_ll) == gold),
                "acc_norm": float(np.argmax(mine_ll / lengths[idx]) == gold),
                "acc_per_token": float(np.argmax(mine_ll / n_tok) == gold),
            }
            # lm-eval has no per-token metric: its log-likelihoods over our token counts.
            other = {"acc": float(acc), "acc_norm": float(acc_norm),
                     "acc_per_token": float(np.argmax(np.array(lls) / n_tok) == gold)}
        for k in metrics:
            ours_m[k].append(mine[k])
            lm_m[k].append(other[k])
            differ[k] += mine[k] != other[k]
    return {
        "n": len(theirs), "max_abs_dloglik": max_dll, "items_differing": differ,
        "ours": {k: float(np.mean(v)) for k, v in ours_m.items()},
        "ours_reported": {k: ours["metrics"]["all"].get(k) for k in metrics},
        "lm_eval": {k: float(np.mean(v)) for k, v in lm_m.items()},
    }


def parity_tasks(names: list[str]) -> dict[str, IclTask]:
    tasks = {}
    for n in names:
        if n in CORE_TASKS:
            tasks[n] = CORE_TASKS[n].task
        elif n in PROBE_TASKS:
            tasks[n] = PROBE_TASKS[n]
        else:
            raise SystemExit(f"--tasks: {n!r} is not a few-shot task (core:<label> or a probe)")
    return tasks


def task_docs(name: str, data_dir=None) -> list[dict]:
    return core_docs(name, data_dir) if name in CORE_TASKS else load_icl_docs(PROBE_TASKS[name], data_dir)


def check(lm, tokenizer, hf_dir, names, limit, batch_size, device, data_dir=None) -> dict:
    """Score the tasks `names` both ways; {task: comparison} (see `compare`)."""
    tasks = parity_tasks(names)
    return check_tasks(lm, tokenizer, hf_dir, {n: (t, task_docs(n, data_dir)) for n, t in tasks.items()},
                       limit, batch_size, device)


def check_tasks(lm, tokenizer, hf_dir, tasks: dict[str, tuple[IclTask, list[dict]]], limit,
                batch_size, device) -> dict:
    """{name: (task, its documents)} scored both ways: {name: comparison, with both sides'
    seconds}."""
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for n, (t, docs) in tasks.items():
            folder = Path(tmp) / n.replace(":", "_")
            folders[n] = (write_lm_eval_task(t, docs, limit, folder), folder)
        theirs = run_lm_eval(lm_eval_model(hf_dir, batch_size, device), dict(folders.values()))
    report = {}
    for n, (t, docs) in tasks.items():
        items = icl_items(t, docs, limit)
        start = time.perf_counter()
        ours = evaluate_task(lm, tokenizer, n, items, progress=False, log_samples=True,
                             spec=icl_info(t))
        seconds = time.perf_counter() - start
        lm_name = folders[n][0]
        report[n] = compare(t, ours, items, theirs["samples"][lm_name])
        report[n]["seconds"] = {"ours": seconds, "lm_eval": theirs["seconds"][lm_name]}
    return report


def format_report(report: dict) -> str:
    head = (f"{'task':<24} {'n':>5} {'metric':<14} {'ours':>8} {'lm-eval':>8} {'differ':>6} "
            f"{'max|dll|':>9}")
    lines = [head, "-" * len(head)]
    for n, r in report.items():
        for k, v in r["lm_eval"].items():
            lines.append(f"{n:<24} {r['n']:>5} {k:<14} {r['ours'][k]:>8.4f} {v:>8.4f} "
                         f"{r['items_differing'][k]:>6} {r['max_abs_dloglik']:>9.2e}")
    return "\n".join(lines)


def format_markdown(report: dict, title: str) -> str:
    """The comparison as a markdown table for bench/results/."""
    head = ("| task | items | metric | ours | lm-eval | items differing | max abs dloglik | "
            "ours s | lm-eval s |")
    lines = [title, "", head, "|" + "---|" * (head.count("|") - 1)]
    for n, r in report.items():
        for k, v in r["lm_eval"].items():
            lines.append(f"| {n} | {r['n']} | {k} | {r['ours'][k]:.4f} | {v:.4f} | "
                         f"{r['items_differing'][k]} | {r['max_abs_dloglik']:.1e} | "
                         f"{r['seconds']['ours']:.1f} | {r['seconds']['lm_eval']:.1f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.lm_eval_parity",
                                     description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, run_required=False, out_help="write the comparison as JSON")
    parser.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory")
    parser.add_argument("--tasks", default="core:arc_easy,core:winogrande,core:lambada_openai")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--benchmark-dir", metavar="DIR", default=None)
    parser.add_argument("--out-dir", metavar="DIR", default=None,
                        help="also write the table as lm-eval-parity-<model>-<device>.md here "
                             "(e.g. bench/results)")
    return parser


def main(argv: list[str] | None = None) -> None:
    from common.atomic import write_json
    from eval.models import load_hf, load_native
    from model.hf import export_run

    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.run) == bool(args.hf):
        parser.error("give exactly one of --run DIR or --hf DIR")
    device = parse_device(parser, args.device)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        if args.hf:
            lm, tok = load_hf(args.hf, device, batch_size=args.batch_size)
            hf_dir = args.hf
        else:
            lm, tok, ckpt = load_native(args.run, device, batch_size=args.batch_size,
                                        step=args.step)
            hf_dir = Path(tmp) / "hf"
            export_run(ckpt, hf_dir)  # lm-eval reads a Hugging Face directory
        report = check(lm, tok, hf_dir, names, args.limit, args.batch_size, str(device),
                       args.benchmark_dir)
    print(format_report(report))
    if args.out:
        write_json(Path(args.out), report)
    if args.out_dir:
        model = Path(args.hf or args.run).name
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        title = (f"lm-evaluation-harness parity, {model} ({args.hf or args.run}), {device} ({name}), "
                 f"first {args.limit} items of each task, batch size {args.batch_size}")
        path = write_table(args.out_dir, f"lm-eval-parity-{model}", name,
                           format_markdown(report, title) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
