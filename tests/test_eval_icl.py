"""Few-shot task files, prompts and aggregates: examples drawn as nanochat draws them and never
the item itself, prompts built per task type with the task's delimiters, CORE's centered mean
and categories, the groups of --tasks and what a group says is missing, the probes' reports,
clear errors for malformed files. No model here (tests/test_eval_shared.py scores)."""

import json
import random

import pytest

from eval.core import CORE_TASKS, centered, core_docs, core_report, core_scores, format_core
from eval.icl import IclTask, fewshot_indices, icl_items, load_icl_task
from eval.probes import probe_report
from eval.suite import load_items, parse_tasks, task_info
from eval.tasks import TaskDataError, load_task
from tests.icl_fixtures import write_icl_fixtures


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_icl_fixtures(tmp_path_factory.mktemp("bench"))


def test_fewshot_draw_is_nanochats_and_skips_the_item(seed):
    rng = random.Random(seed)
    for _ in range(200):
        n = rng.randrange(2, 300)
        k = rng.randrange(0, min(n - 1, 12) + 1)
        idx = rng.randrange(n)
        # nanochat's scripts: Random(1234 + idx).sample over the other items' indices
        reference = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
        got = fewshot_indices(idx, n, k)
        assert got == reference and idx not in got and len(set(got)) == k


def test_fewshot_draw_needs_enough_items():
    with pytest.raises(TaskDataError, match="10-shot needs 11 items, the file has 5"):
        fewshot_indices(0, 5, 10)


def test_prompts_per_task_type(bench):
    mc_docs = [json.loads(x) for x in (bench / "icl/world_knowledge/arc_easy.jsonl").read_text().splitlines()]
    arc = CORE_TASKS["core:arc_easy"].task
    items = load_icl_task(arc, bench, limit=3)
    for it in items:
        shots = fewshot_indices(it.index, len(mc_docs), 10)
        prefix = "".join(f"{mc_docs[j]['query']}\nAnswer: {mc_docs[j]['choices'][mc_docs[j]['gold']]}\n\n"
                         for j in shots)
        doc = mc_docs[it.index]
        assert it.contexts == [prefix + doc["query"] + "\nAnswer: "] * 4
        assert it.continuations == doc["choices"] and it.gold == doc["gold"]
        assert it.choice_lengths == [len(c) for c in doc["choices"]]
        assert it.text == doc["query"] + " " + doc["choices"][doc["gold"]]  # no examples in it

    wino = [json.loads(x) for x in (bench / "icl/language_understanding/winogrande.jsonl").read_text().splitlines()]
    it = load_icl_task(CORE_TASKS["core:winogrande"].task, bench, limit=2)[1]
    assert it.contexts == wino[1]["context_options"]  # 0-shot
    assert it.continuations == [" " + wino[1]["continuation"]] * 2

    lm_docs = [json.loads(x) for x in (bench / "icl/language_understanding/lambada_openai.jsonl").read_text().splitlines()]
    lm3 = IclTask("lm3", "language_understanding/lambada_openai.jsonl", "language_modeling", 3,
                  "\nAnswer: ")
    it = icl_items(lm3, [dict(d, context=d["context"] + "  ") for d in lm_docs], 1)[0]
    shots = fewshot_indices(0, len(lm_docs), 3)
    prefix = "".join(f"{lm_docs[j]['context']}\nAnswer: {lm_docs[j]['continuation']}\n\n" for j in shots)
    assert it.contexts == [prefix + lm_docs[0]["context"] + "\nAnswer: "]  # context stripped
    assert it.continuations == [lm_docs[0]["continuation"]]


def test_items_do_not_depend_on_the_limit(bench):
    task = CORE_TASKS["core:arc_easy"].task
    few, many = load_icl_task(task, bench, limit=3), load_icl_task(task, bench)
    assert [it.contexts for it in few] == [it.contexts for it in many[:3]]


def test_hellaswag_is_rebuilt_from_our_file(bench):
    zero = load_task("hellaswag", bench)
    core0 = load_items("core:hellaswag_zeroshot", bench)
    assert [(it.contexts, it.continuations) for it in zero] == [
        ([c.rstrip() for c in it.contexts], [" " + x for x in it.continuations]) for it in core0
    ]  # the same pairs once encode_pair moves the trailing space
    docs = core_docs("core:hellaswag", bench)
    ten = load_items("core:hellaswag", bench, limit=2)
    assert ten[1].contexts[0].endswith("\n\n" + docs[1]["query"] + " ")
    assert ten[1].contexts[0].count("\n\n") == 10


def test_groups_and_what_they_skip(bench):
    names, skipped = parse_tasks("hellaswag,core,winogender", bench)
    assert names[0] == "hellaswag"
    assert set(names) == {"hellaswag", "core:hellaswag_zeroshot", "core:hellaswag",
                          "core:arc_easy", "core:winogrande", "core:lambada_openai",
                          "winogender_female", "winogender_male"}
    assert "core:squad" in skipped["core"] and len(skipped["core"]) == 22 - 5
    everything, _ = parse_tasks("all", bench)
    assert {"gsm8k", "human_eval", "bigbench_misconceptions"} <= set(everything)
    with pytest.raises(TaskDataError, match="unknown task 'core:nope'"):
        parse_tasks("core:nope", bench)
    with pytest.raises(TaskDataError, match="squad.jsonl not found"):
        load_items("core:squad", bench)
    assert task_info("core:lambada_openai").main_metric == "acc"
    assert task_info("core:arc_easy").main_metric == "acc_per_token"


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "gold 2 is not an index into its 2"),
    ('{"query": "q", "choices": ["a", "b"]}', "a multiple_choice item needs fields \\['query', 'choices', 'gold'\\]"),
    ('{"query": 3, "choices": ["a", "b"], "gold": 0}', "field 'query' must be a string"),
    ('not json', "not valid JSON"),
])
def test_malformed_file_is_named_with_its_line(tmp_path, line, message):
    path = tmp_path / "icl" / "world_knowledge" / "arc_easy.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n' + line + "\n")
    with pytest.raises(TaskDataError, match=f"arc_easy.jsonl:2: {message}"):
        load_icl_task(IclTask("t", "world_knowledge/arc_easy.jsonl", "multiple_choice", 0), tmp_path)


def _result(metric: str, values: dict[str, float | None]) -> dict:
    return {"metrics": {s: {"n": 10, metric: v} for s, v in values.items()}}


def test_core_is_the_mean_of_centered_accuracies():
    results = {
        "core:arc_easy": _result("acc_per_token", {"all": 0.55, "clean": 0.5, "dirty": 0.7}),
        "core:commonsense_qa": _result("acc_per_token", {"all": 0.4, "clean": 0.4, "dirty": None}),
        "core:lambada_openai": _result("acc", {"all": 0.3, "clean": 0.25, "dirty": 0.5}),
    }
    r = core_scores(results)
    assert r["tasks"]["core:arc_easy"]["centered_v1"] == pytest.approx((0.55 - 0.25) / 0.75)
    # commonsense_qa: baseline 20 (v1) and 40.3 (v2, the majority label rate)
    assert r["tasks"]["core:commonsense_qa"]["centered_v2"] == pytest.approx((0.4 - 0.403) / 0.597)
    expected = [(0.55 - 0.25) / 0.75, (0.4 - 0.2) / 0.8, 0.3]
    assert r["core_v1"] == pytest.approx(sum(expected) / 3)
    assert r["categories_v1"]["world_knowledge"] == pytest.approx(expected[0])
    assert r["categories_v1"]["commonsense_reasoning"] == pytest.approx(expected[1])
    assert len(r["missing"]) == 19 and not r["complete"]
    dirty = core_scores(results, "dirty")
    assert dirty["empty"] == ["core:commonsense_qa"] and dirty["n_tasks"] == 2
    report = core_report(results)
    assert set(report) == {"all", "clean", "dirty"}
    text = format_core(report)
    assert "not the published CORE: 3 of 22 tasks" in text and "core:squad" in text
    assert centered(0.62, 62) == 0.0


def test_probe_report_gives_the_gender_gap():
    results = {
        "winogender_female": {"metrics": {"all": {"n": 6, "acc": 0.5, "acc_norm": 0.5,
                                                  "acc_per_token": 0.75}}},
        "winogender_male": {"metrics": {"all": {"n": 6, "acc": 0.5, "acc_norm": 0.25,
                                                "acc_per_token": 0.5}}},
        "bigbench_misconceptions": {"metrics": {"all": {"n": 6, "acc": 0.6, "acc_norm": 0.6,
                                                        "acc_per_token": 0.7}}},
    }
    r = probe_report(results)
    assert r["winogender"]["all"]["acc_per_token"] == {"female": 0.75, "male": 0.5, "gap": 0.25}
    assert r["factuality"]["all"]["acc_per_token"]["above_chance"] == pytest.approx(0.2)
