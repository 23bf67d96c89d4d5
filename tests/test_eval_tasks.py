"""Benchmark task loading: HellaSwag's six-line text form and LAMBADA's jsonl (generated files,
tests/helpers.py), the original release formats of ARC / PIQA / Winogrande, prompts built as
lm-evaluation-harness builds them, clear errors."""

import json

import pytest

import eval.tasks as eval_tasks
from eval.tasks import TaskDataError, find_task_files, load_task


def test_hellaswag_text_form_loads_every_item(benchmark_dir):
    path = benchmark_dir / "hellaswag" / "hellaswag_val_full.txt"
    lines = path.read_text().split("\n")[:-1]
    items = load_task("hellaswag", benchmark_dir)
    assert len(items) == len(lines) // 6 == 600
    assert [it.gold for it in items] == [int(lines[6 * i + 1]) for i in range(600)]
    first = items[0]
    assert first.contexts == [lines[0]] * 4
    assert first.continuations == [" " + e for e in lines[2:6]]
    assert first.choice_lengths == [len(e) for e in lines[2:6]]
    assert all(len(it.contexts) == 4 and "[" not in it.contexts[0] for it in items)


def test_lambada_items_split_at_last_word(benchmark_dir):
    items = load_task("lambada", benchmark_dir)
    texts = [json.loads(x)["text"] for x in
             (benchmark_dir / "lambada" / "lambada_test.jsonl").read_text().splitlines()]
    assert len(items) == len(texts) == 600
    for it, text in zip(items, texts):
        assert it.contexts[0] + it.continuations[0] == it.text == text
        assert it.continuations[0] == " " + text.split(" ")[-1]


def test_limit_takes_the_first_items(benchmark_dir):
    assert [it.index for it in load_task("lambada", benchmark_dir, limit=7)] == list(range(7))


def test_hellaswag_jsonl_query_as_lm_eval(tmp_path):
    doc = {
        "ind": 4, "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman "
        "wearing winter clothes smiles.", "ctx_b": "then",
        "endings": [", the man adds wax to the windshield.", ", a woman puts on a coat [title]"
                    " Wait.", ", the man continues removing the snow on his car.",
                    ", the man [step] stops."],
        "label": "2",
    }
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text(json.dumps(doc) + "\n")
    (it,) = load_task("hellaswag", tmp_path)
    # ctx_b capitalized, "[title]" -> ". ", other brackets removed, double spaces collapsed
    assert it.contexts[0] == (
        "Removing ice from car: Then, the man writes over the snow covering the window of a car,"
        " and a woman wearing winter clothes smiles. Then"
    )
    assert it.continuations[1] == " , a woman puts on a coat. Wait."
    assert it.continuations[3] == " , the man stops."
    assert it.gold == 2


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def test_arc_original_and_hub_layouts(tmp_path):
    original = {
        "id": "x1", "answerKey": "3",
        "question": {"stem": "Which object conducts heat best?", "choices": [
            {"text": "wood", "label": "1"}, {"text": "glass", "label": "2"},
            {"text": "copper", "label": "3"}]},
    }
    _write(tmp_path / "arc_challenge" / "ARC-Challenge-Test.jsonl", [json.dumps(original)])
    (it,) = load_task("arc_challenge", tmp_path)
    assert it.contexts == ["Question: Which object conducts heat best?\nAnswer:"] * 3
    assert it.continuations == [" wood", " glass", " copper"] and it.gold == 2
    assert it.text == "Which object conducts heat best? copper"  # no prompt template
    # The hub layout (question string, choices as columns) gives the same item.
    from eval.tasks import arc_item

    hub = {"question": original["question"]["stem"], "answerKey": "3",
           "choices": {"text": ["wood", "glass", "copper"], "label": ["1", "2", "3"]}}
    assert arc_item(0, hub) == it


def test_piqa_labels_from_the_lst_file(tmp_path):
    docs = [{"goal": "Keep bread fresh", "sol1": "Seal it in a bag.", "sol2": "Soak it."},
            {"goal": "Open a jar", "sol1": "Freeze the lid.", "sol2": "Warm the lid."}]
    _write(tmp_path / "piqa" / "valid.jsonl", [json.dumps(d) for d in docs])
    _write(tmp_path / "piqa" / "valid-labels.lst", ["0", "1"])
    items = load_task("piqa", tmp_path)
    assert [it.gold for it in items] == [0, 1]
    assert items[1].contexts[0] == "Question: Open a jar\nAnswer:"
    assert items[1].continuations == [" Freeze the lid.", " Warm the lid."]
    assert items[1].text == "Open a jar Warm the lid."
    _write(tmp_path / "piqa" / "valid-labels.lst", ["0"])
    with pytest.raises(TaskDataError, match="1 labels for 2 questions"):
        load_task("piqa", tmp_path)


def test_winogrande_partial_scoring_pairs(tmp_path):
    doc = {"sentence": "Sarah lent Maria a book because _ had already read it.",
           "option1": "Sarah", "option2": "Maria", "answer": "1"}
    _write(tmp_path / "winogrande" / "dev.jsonl", [json.dumps(doc)])
    (it,) = load_task("winogrande", tmp_path)
    assert it.contexts == ["Sarah lent Maria a book because Sarah",
                           "Sarah lent Maria a book because Maria"]
    assert it.continuations == [" had already read it."] * 2
    assert it.gold == 0 and it.text == "Sarah lent Maria a book because Sarah had already read it."


def test_unknown_task_names_the_known_ones():
    with pytest.raises(TaskDataError, match=r"unknown task 'helaswag'.*'hellaswag'"):
        load_task("helaswag")


def test_missing_file_says_which_files_and_where(tmp_path, monkeypatch):
    assert find_task_files("winogrande", tmp_path) is None
    with pytest.raises(TaskDataError) as e:
        load_task("piqa", tmp_path, allow_download=False)
    msg = str(e.value)
    assert "valid.jsonl + valid-labels.lst" in msg and str(tmp_path / "piqa") in msg
    # Online path with the hub unreachable (as on this machine) -> the same advice.
    def offline(spec):
        raise ConnectionError("no network")

    monkeypatch.setattr(eval_tasks, "_load_hub", offline)
    with pytest.raises(TaskDataError, match=r"could not be loaded.*put dev.jsonl in"):
        load_task("winogrande", tmp_path, allow_download=True)


def test_malformed_files_name_the_file_and_line(tmp_path):
    _write(tmp_path / "hellaswag" / "hellaswag_val_full.txt", ["ctx", "7", "a", "b", "c", "d"])
    with pytest.raises(TaskDataError, match=r"hellaswag_val_full.txt:2: label '7'"):
        load_task("hellaswag", tmp_path)
    _write(tmp_path / "lambada" / "lambada_test.jsonl", ['{"text": "a b"}', "{oops"])
    with pytest.raises(TaskDataError, match=r"lambada_test.jsonl:2: not valid JSON"):
        load_task("lambada", tmp_path)
    _write(tmp_path / "winogrande" / "dev.jsonl", [json.dumps({"sentence": "no blank"})])
    with pytest.raises(TaskDataError, match=r"dev.jsonl: item 0 is not in the winogrande format"):
        load_task("winogrande", tmp_path)


def test_decontamination_texts_are_the_items_with_answers(benchmark_dir):
    from eval.tasks import decontamination_texts

    lines = (benchmark_dir / "lambada" / "lambada_test.jsonl").read_text().splitlines()
    assert decontamination_texts("lambada", benchmark_dir) == [json.loads(x)["text"] for x in lines]
    texts = decontamination_texts("hellaswag", benchmark_dir)
    hs = (benchmark_dir / "hellaswag" / "hellaswag_val_full.txt").read_text().split("\n")
    assert texts[0] == hs[0] + " " + hs[2 + int(hs[1])]  # context + gold ending
