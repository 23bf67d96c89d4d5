"""Probes: factuality (BIG-bench misconceptions) and gender bias (Winogender), few-shot
multiple-choice tasks from llm-foundry's files, scored as eval/icl.py scores every such task.

- bigbench_misconceptions  219 statements, answer T or F: does the model tell a common
  misconception from the fact (10-shot; chance 0.5).
- winogender_female / winogender_male  the same 60 sentences with a female or a male pronoun;
  which noun phrase does the pronoun refer to (10-shot, each file its own examples). The gap
  female - male in accuracy measures how much the answer depends on the pronoun's gender
  (0 for a model without that bias; a large gap, either sign, is the finding).
"""

from __future__ import annotations

from eval.icl import IclTask

MC = "multiple_choice"
PROBE_TASKS: dict[str, IclTask] = {
    t.name: t
    for t in (
        IclTask("bigbench_misconceptions", "world_knowledge/bigbench_misconceptions.jsonl", MC, 10),
        IclTask("winogender_female", "safety/winogender_mc_female.jsonl", MC, 10),
        IclTask("winogender_male", "safety/winogender_mc_male.jsonl", MC, 10),
    )
}
PROBE_ALIASES = {"winogender": ["winogender_female", "winogender_male"]}
FACTUALITY_BASELINE = 0.5


def probe_report(results: dict[str, dict]) -> dict:
    """From per-task results: factuality (misconceptions accuracy and its margin over chance)
    and the Winogender female / male accuracies and their gap, per subset (all / clean /
    dirty) and metric. Only the probes present in `results` are reported."""
    out: dict = {}
    mis = results.get("bigbench_misconceptions")
    if mis is not None:
        out["factuality"] = {
            subset: {
                m: {"acc": m_all[m], "above_chance": m_all[m] - FACTUALITY_BASELINE}
                for m in ("acc", "acc_norm", "acc_per_token") if m_all.get(m) is not None
            }
            for subset, m_all in mis["metrics"].items()
        }
    female, male = results.get("winogender_female"), results.get("winogender_male")
    if female is not None and male is not None:
        gender: dict = {}
        for subset in female["metrics"]:
            f, m = female["metrics"][subset], male["metrics"].get(subset, {})
            gender[subset] = {
                metric: {"female": f[metric], "male": m[metric], "gap": f[metric] - m[metric]}
                for metric in ("acc", "acc_norm", "acc_per_token")
                if f.get(metric) is not None and m.get(metric) is not None
            }
        out["winogender"] = gender
    return out


def format_probes(report: dict) -> str:
    lines = []
    if "factuality" in report:
        r = report["factuality"]["all"]["acc_per_token"]
        lines.append(
            f"factuality (bigbench_misconceptions): acc {r['acc']:.4f} "
            f"({r['above_chance']:+.4f} vs chance)"
        )
    if "winogender" in report:
        r = report["winogender"]["all"]["acc_per_token"]
        lines.append(
            f"winogender: female {r['female']:.4f} | male {r['male']:.4f} | gap (female - male) "
            f"{r['gap']:+.4f}"
        )
    return "\n".join(lines)
