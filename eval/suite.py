"""Every task `python -m eval --tasks` knows, by name, and the groups that name several.

    zero-shot     hellaswag lambada arc_easy arc_challenge piqa winogrande   (eval/tasks.py)
    core          core:<label> for the 22 CORE tasks                        (eval/core.py)
    probes        bigbench_misconceptions winogender_female winogender_male (eval/probes.py)
    generation    gsm8k human_eval                                         (eval/generation.py)

Groups: `zeroshot`, `core`, `probes` (`winogender` names both of its files), `generation`,
`all` (everything). A group skips the tasks whose files are missing and says so (`core` runs
20 of 22 from the public copy); a task named on its own with a missing file is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eval.core import CORE_TASKS, core_available, load_core_task
from eval.generation import GENERATION_TASKS, gsm8k_items, human_eval_items
from eval.icl import IclTask, icl_root, load_icl_task
from eval.probes import PROBE_ALIASES, PROBE_TASKS
from eval.tasks import TASKS, TaskDataError, load_task


@dataclass(frozen=True)
class TaskInfo:
    """What scoring needs to know of a task, whatever its family."""

    name: str
    family: str  # "zeroshot" | "icl" | "generation"
    kind: str  # "multiple_choice" | "loglikelihood" | "generation"
    metrics: tuple[str, ...]
    main_metric: str
    ngram_n: int


def icl_info(task: IclTask) -> TaskInfo:
    """The TaskInfo of any few-shot task (also one that is not in the tables)."""
    return TaskInfo(task.name, "icl", task.scoring_kind, task.metrics, task.main_metric,
                    task.ngram_n)


def task_info(name: str) -> TaskInfo:
    if name in TASKS:
        spec = TASKS[name]
        main = "acc_norm" if "acc_norm" in spec.metrics else "acc"
        return TaskInfo(name, "zeroshot", spec.kind, spec.metrics, main, spec.ngram_n)
    if name in CORE_TASKS:
        return icl_info(CORE_TASKS[name].task)
    if name in PROBE_TASKS:
        return icl_info(PROBE_TASKS[name])
    if name in GENERATION_TASKS:
        t = GENERATION_TASKS[name]
        return TaskInfo(name, "generation", "generation", t.metrics, t.metrics[0], t.ngram_n)
    raise TaskDataError(
        f"unknown task {name!r}: expected one of {sorted(GROUPS)} or a task of them "
        f"({', '.join(all_task_names())})"
    )


def all_task_names() -> list[str]:
    return [*TASKS, *CORE_TASKS, *PROBE_TASKS, *GENERATION_TASKS]


GROUPS = {
    "zeroshot": list(TASKS),
    "core": list(CORE_TASKS),
    "probes": list(PROBE_TASKS),
    "generation": list(GENERATION_TASKS),
    **PROBE_ALIASES,
}


def load_items(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list:
    """The items of any task (eval/tasks.py `Item`s; generation tasks: `GenItem`s)."""
    info = task_info(name)
    if info.family == "zeroshot":
        return load_task(name, data_dir, limit)
    if name in CORE_TASKS:
        return load_core_task(name, data_dir, limit)
    if name in PROBE_TASKS:
        return load_icl_task(PROBE_TASKS[name], data_dir, limit)
    return (gsm8k_items if name == "gsm8k" else human_eval_items)(data_dir, limit)


def _present(name: str, data_dir) -> bool:
    if name in TASKS:
        return True  # local file or the hub: load_task says which is missing
    if name in CORE_TASKS:
        return name in core_available(data_dir)[0]
    path = PROBE_TASKS[name].path if name in PROBE_TASKS else GENERATION_TASKS[name].path
    return (icl_root(data_dir) / path).is_file()


def parse_tasks(spec: str, data_dir: str | Path | None = None) -> tuple[list[str], dict]:
    """'hellaswag,core,winogender' -> (task names in order, {group: [names skipped because
    their files are missing]}). An unknown name stops here, before any slow work."""
    names, skipped = [], {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in GROUPS or part == "all":
            members = all_task_names() if part == "all" else GROUPS[part]
            here = [n for n in members if _present(n, data_dir)]
            if len(here) < len(members):
                skipped[part] = [n for n in members if n not in here]
            names += [n for n in here if n not in names]
        else:
            task_info(part)
            if part not in names:
                names.append(part)
    return names, skipped

