"""CORE (DCLM's "low variance" aggregate, nanochat's pretraining score): 22 few-shot tasks,
each accuracy centered on its random baseline, the plain mean over tasks.

    centered = (acc - b) / (1 - b)        b = the task's random baseline as a fraction
    CORE     = mean of centered over the 22 tasks

The table below is DCLM's `eval/mmlu_and_lowvar.yaml` (type, few-shot count, delimiter) with the
baselines of `eval/eval_meta_data_v1.csv` (v1: nanochat's, e.g. GPT-2 124M CORE 0.1139) and
`eval/eval_meta_data.csv` (v2: DCLM since 2025-09; three tasks differ), as collected in
../shared/benchmarks/icl/README.md. The metric per task is llm-foundry's: the lowest mean loss
per continuation token for multiple choice and schema tasks, greedy exact continuation for
language modeling (eval/icl.py).

Four CORE files are missing from the public copy (squad, coqa and both HellaSwag entries).
HellaSwag is rebuilt from our own HellaSwag file (query and endings as lm-eval builds them; the
exact strings of llm-foundry's file may differ a little), so `--tasks core` runs 20 of 22; the
report names what is missing and says that a mean over fewer tasks is not the published CORE.
The category composites are the means of centered accuracy within each llm-foundry category
(the folders of the task files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eval.icl import IclTask, icl_items, icl_root, load_icl_docs
from eval.tasks import Item, find_task_files, load_task


@dataclass(frozen=True)
class CoreTask:
    task: IclTask
    label: str  # DCLM's label
    baseline_v1: float  # random baseline, percent
    baseline_v2: float
    category: str
    derived_from: str | None = None  # a task rebuilt from another file (HellaSwag)


def _core(label, path, kind, shots, delim, v1, v2, n=13, derived=None) -> CoreTask:
    category = path.split("/")[0]
    task = IclTask(f"core:{label}", path, kind, shots, delim, n)
    return CoreTask(task, label, v1, v2, category, derived)


MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
ANSWER = "\nAnswer: "
CORE_TASKS: dict[str, CoreTask] = {
    t.task.name: t
    for t in (
        _core("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", MC, 0, " ", 25, 25,
              derived="hellaswag"),
        _core("jeopardy", "world_knowledge/jeopardy_all.jsonl", LM, 10, ANSWER, 0, 0, 12),
        _core("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", LM, 10, " ",
              0, 0, 8),
        _core("arc_easy", "world_knowledge/arc_easy.jsonl", MC, 10, ANSWER, 25, 25, 10),
        _core("arc_challenge", "world_knowledge/arc_challenge.jsonl", MC, 10, ANSWER, 25, 25, 11),
        _core("copa", "commonsense_reasoning/copa.jsonl", MC, 0, " ", 50, 50, 8),
        _core("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", MC, 10, " ", 20,
              40.3),
        _core("piqa", "commonsense_reasoning/piqa.jsonl", MC, 10, ANSWER, 50, 50, 8),
        _core("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", MC, 0, " ", 25, 25, 8),
        _core("lambada_openai", "language_understanding/lambada_openai.jsonl", LM, 0, " ", 0, 0),
        _core("hellaswag", "language_understanding/hellaswag.jsonl", MC, 10, " ", 25, 25,
              derived="hellaswag"),
        _core("winograd", "language_understanding/winograd_wsc.jsonl", SCHEMA, 0, " ", 50, 50, 9),
        _core("winogrande", "language_understanding/winogrande.jsonl", SCHEMA, 0, " ", 50, 50),
        _core("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl",
              LM, 10, " ", 0, 0),
        _core("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", MC, 3, " ",
              20, 25),
        _core("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl",
              LM, 10, " ", 0, 0),
        _core("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", LM, 10,
              " ", 0, 0),
        _core("bigbench_repeat_copy_logic",
              "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", LM, 10, " ", 0, 0),
        _core("squad", "reading_comprehension/squad.jsonl", LM, 10, " ", 0, 0),
        _core("coqa", "reading_comprehension/coqa.jsonl", LM, 0, " ", 0, 0),
        _core("boolq", "reading_comprehension/boolq.jsonl", MC, 10, ANSWER, 62, 62),
        _core("bigbench_language_identification",
              "language_understanding/bigbench_language_identification.jsonl", MC, 10, " ", 9.1,
              25),
    )
}


def core_available(data_dir: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(task names that can run, task names whose file is missing) under the benchmark dir."""
    ok, missing = [], []
    for name, t in CORE_TASKS.items():
        if t.derived_from is not None:
            found = find_task_files(t.derived_from, data_dir) is not None
            found = found or (icl_root(data_dir) / t.task.path).is_file()
        else:
            found = (icl_root(data_dir) / t.task.path).is_file()
        (ok if found else missing).append(name)
    return ok, missing


def core_docs(name: str, data_dir: str | Path | None = None) -> list[dict]:
    """A CORE task's documents; HellaSwag from llm-foundry's file if present, else rebuilt from
    ours (query = lm-eval's preprocessed context, choices = the endings)."""
    t = CORE_TASKS[name]
    if t.derived_from is not None and not (icl_root(data_dir) / t.task.path).is_file():
        return [
            {"query": it.contexts[0], "choices": [c[1:] for c in it.continuations],
             "gold": it.gold}
            for it in load_task(t.derived_from, data_dir, allow_download=False)
        ]
    return load_icl_docs(t.task, data_dir)


def load_core_task(name: str, data_dir: str | Path | None = None, limit=None) -> list[Item]:
    return icl_items(CORE_TASKS[name].task, core_docs(name, data_dir), limit)


# ---------------------------------------------------------------------------------------------
# The aggregate
# ---------------------------------------------------------------------------------------------


def centered(acc: float, baseline_percent: float) -> float:
    b = baseline_percent / 100
    return (acc - b) / (1 - b)


def core_scores(results: dict[str, dict], subset: str = "all") -> dict:
    """CORE from per-task results (eval/scoring.py's `evaluate_task` outputs, keyed by task
    name): per task its accuracy and centered accuracy (v1 and v2 baselines), the means over
    the tasks present, per-category composites, and the CORE tasks not present.

    `subset` is "all", "clean" or "dirty" (items flagged by the contamination check); a task
    with no items in the subset is left out of that subset's means and listed as empty."""
    tasks, empty = {}, []
    for name, t in CORE_TASKS.items():
        if name not in results:
            continue
        m = results[name]["metrics"].get(subset)
        if m is None or m.get(t.task.main_metric) is None:
            empty.append(name)
            continue
        acc = m[t.task.main_metric]
        tasks[name] = {
            "metric": t.task.main_metric, "acc": acc, "n": m["n"], "category": t.category,
            "centered_v1": centered(acc, t.baseline_v1),
            "centered_v2": centered(acc, t.baseline_v2),
        }
    missing = [n for n in CORE_TASKS if n not in results]
    out: dict = {"subset": subset, "tasks": tasks, "n_tasks": len(tasks), "of": len(CORE_TASKS)}
    for v in ("v1", "v2"):
        values = [s[f"centered_{v}"] for s in tasks.values()]
        out[f"core_{v}"] = sum(values) / len(values) if values else None
        categories: dict[str, list[float]] = {}
        for s in tasks.values():
            categories.setdefault(s["category"], []).append(s[f"centered_{v}"])
        out[f"categories_{v}"] = {c: sum(x) / len(x) for c, x in sorted(categories.items())}
    out["missing"] = missing
    out["empty"] = empty
    out["derived"] = [n for n in tasks if CORE_TASKS[n].derived_from is not None]
    out["complete"] = not missing and not empty
    return out


def core_report(results: dict[str, dict]) -> dict:
    """CORE on all items, and on clean / dirty items when the contamination check ran."""
    subsets = ["all"] + [
        s for s in ("clean", "dirty")
        if any(s in results[n]["metrics"] for n in CORE_TASKS if n in results)
    ]
    return {s: core_scores(results, s) for s in subsets}


def format_core(report: dict) -> str:
    """The CORE table: per task acc and centered (v1 / v2), then the aggregates, and a line
    saying which tasks are missing so the number is not read as the published CORE."""
    main = report["all"]
    lines = [f"{'CORE task':<42} {'n':>6} {'acc':>8} {'centered v1':>12} {'centered v2':>12}"]
    lines.append("-" * len(lines[0]))
    for name, s in main["tasks"].items():
        mark = " (rebuilt)" if name in main["derived"] else ""
        lines.append(
            f"{name + mark:<42} {s['n']:>6} {s['acc']:>8.4f} {s['centered_v1']:>12.4f} "
            f"{s['centered_v2']:>12.4f}"
        )
    for subset, r in report.items():
        if r["core_v1"] is None:
            lines.append(f"CORE ({subset}): no tasks")
            continue
        lines.append(
            f"CORE ({subset} items, {r['n_tasks']}/{r['of']} tasks): v1 {r['core_v1']:.4f} | "
            f"v2 {r['core_v2']:.4f}"
        )
    cats = " | ".join(f"{c} {v:.4f}" for c, v in main["categories_v1"].items())
    lines.append(f"categories (v1): {cats}")
    if not main["complete"]:
        lines.append(
            f"not the published CORE: {main['n_tasks']} of {main['of']} tasks; missing: "
            f"{', '.join(main['missing'] + main['empty']) or 'none'}"
        )
    return "\n".join(lines)
