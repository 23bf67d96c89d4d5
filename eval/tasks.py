"""Zero-shot benchmark tasks, built exactly as EleutherAI's lm-evaluation-harness builds them.

Each task turns its data file into a list of `Item`s. An item holds the (context, continuation)
string pairs the model scores, the index of the correct pair, and the text the contamination
check looks for in training data. Prompts follow lm-eval's task configs:

- hellaswag   query = activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), brackets
              removed; continuation " " + ending; acc and acc_norm. 10,042 validation items.
- lambada     (OpenAI version) context = all but the last space-separated word, continuation
              " " + last word; acc (every target token greedy) and perplexity. 5,153 items.
- arc_easy, arc_challenge   "Question: {q}\\nAnswer:" + " " + choice; acc, acc_norm.
- piqa        "Question: {goal}\\nAnswer:" + " " + solution; acc, acc_norm.
- winogrande  partial scoring: the context is the sentence up to "_" with each option filled
              in, the shared continuation is " " + the rest of the sentence; acc.

Data comes from local files first (the original release formats; see `TASKS[...].files`), then,
when `datasets` is installed and the hub is reachable, from the Hugging Face hub.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import PretrainError

REPO_ROOT = Path(__file__).resolve().parents[1]


class TaskDataError(PretrainError, RuntimeError):
    """A task that does not exist, a data file that is missing or malformed."""


@dataclass
class Item:
    """One benchmark question.

    contexts[i] + continuations[i] is the i-th scored string pair (one pair for LAMBADA).
    choice_lengths[i] is the length in characters acc_norm divides by (the choice text without
    the leading space, as lm-eval's `len(choice)`).
    text is what the contamination check looks for: the question (as in the source, without
    the prompt template) with its correct answer.
    """

    index: int
    contexts: list[str]
    continuations: list[str]
    gold: int
    choice_lengths: list[int]
    text: str


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "multiple_choice" | "loglikelihood"
    metrics: tuple[str, ...]
    ngram_n: int  # contamination n-gram length (REFERENCE.md: GPT-3 / lm-eval choice)
    files: tuple[tuple[str, ...], ...]  # alternative sets of files, tried in order
    hf: tuple[str, str | None, str]  # (dataset path, config name, split) on the hub
    size: int  # number of items in the full split, for messages and checks


# ---------------------------------------------------------------------------------------------
# Prompt construction (one function per task, from a document in the original field layout)
# ---------------------------------------------------------------------------------------------


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's hellaswag `preprocess`: WikiHow items carry [title]/[step]/... markers.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _multiple_choice(
    index: int, query: str, choices: list[str], gold: int, question: str | None = None
) -> Item:
    # The contamination text is the question as written in the source (without our
    # "Question: ... Answer:" template, which a leaked copy would not contain) + its answer.
    return Item(
        index=index,
        contexts=[query] * len(choices),
        continuations=[" " + c for c in choices],
        gold=gold,
        choice_lengths=[len(c) for c in choices],
        text=(query if question is None else question) + " " + choices[gold],
    )


def hellaswag_item(index: int, doc: dict) -> Item:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    choices = [_hellaswag_preprocess(e) for e in doc["endings"]]
    return _multiple_choice(index, query, choices, int(doc["label"]))


def lambada_item(index: int, doc: dict) -> Item:
    words = doc["text"].split(" ")
    context, target = " ".join(words[:-1]), " " + words[-1]
    return Item(index, [context], [target], 0, [len(target)], doc["text"])


def arc_item(index: int, doc: dict) -> Item:
    # Original release: question = {stem, choices: [{text, label}]}; hub: question is the stem
    # and choices = {text: [...], label: [...]}.
    q = doc["question"]
    if isinstance(q, dict):
        stem = q["stem"]
        texts, labels = [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
    else:
        stem, texts, labels = q, list(doc["choices"]["text"]), list(doc["choices"]["label"])
    if doc["answerKey"] not in labels:
        raise ValueError(f"answerKey {doc['answerKey']!r} is not one of the labels {labels}")
    gold = labels.index(doc["answerKey"])
    return _multiple_choice(index, f"Question: {stem}\nAnswer:", texts, gold, stem)


def piqa_item(index: int, doc: dict) -> Item:
    query, choices = f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]]
    return _multiple_choice(index, query, choices, int(doc["label"]), doc["goal"])


def winogrande_item(index: int, doc: dict) -> Item:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    options = [doc["option1"], doc["option2"]]
    rest = " " + sentence[blank + 1 :].strip()
    gold = {"1": 0, "2": 1}[str(doc["answer"])]
    return Item(
        index=index,
        contexts=[sentence[:blank] + opt for opt in options],
        continuations=[rest, rest],
        gold=gold,
        choice_lengths=[len(sentence[:blank] + opt) for opt in options],
        text=sentence.replace("_", options[gold], 1),
    )


# ---------------------------------------------------------------------------------------------
# The task table
# ---------------------------------------------------------------------------------------------

TASKS: dict[str, TaskSpec] = {
    "hellaswag": TaskSpec(
        "hellaswag", "multiple_choice", ("acc", "acc_norm"), 13,
        (("hellaswag_val.jsonl",), ("hellaswag_val_full.txt",)),
        ("Rowan/hellaswag", None, "validation"), 10042,
    ),
    "lambada": TaskSpec(
        "lambada", "loglikelihood", ("acc", "perplexity"), 13,
        (("lambada_test.jsonl",),), ("EleutherAI/lambada_openai", "default", "test"), 5153,
    ),
    "arc_easy": TaskSpec(
        "arc_easy", "multiple_choice", ("acc", "acc_norm"), 9,
        (("ARC-Easy-Test.jsonl",),), ("allenai/ai2_arc", "ARC-Easy", "test"), 2376,
    ),
    "arc_challenge": TaskSpec(
        "arc_challenge", "multiple_choice", ("acc", "acc_norm"), 10,
        (("ARC-Challenge-Test.jsonl",),), ("allenai/ai2_arc", "ARC-Challenge", "test"), 1172,
    ),
    "piqa": TaskSpec(
        "piqa", "multiple_choice", ("acc", "acc_norm"), 8,
        (("valid.jsonl", "valid-labels.lst"),), ("baber/piqa", None, "validation"), 1838,
    ),
    "winogrande": TaskSpec(
        "winogrande", "multiple_choice", ("acc",), 13,
        (("dev.jsonl",),), ("allenai/winogrande", "winogrande_xl", "validation"), 1267,
    ),
}

_ITEM_BUILDERS: dict[str, Callable[[int, dict], Item]] = {
    "hellaswag": hellaswag_item,
    "lambada": lambada_item,
    "arc_easy": arc_item,
    "arc_challenge": arc_item,
    "piqa": piqa_item,
    "winogrande": winogrande_item,
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise TaskDataError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name]


def default_data_dir() -> Path:
    """`../shared/benchmarks` beside the repository when present, else `data_cache/benchmarks`."""
    shared = REPO_ROOT.parent / "shared" / "benchmarks"
    return shared if shared.is_dir() else REPO_ROOT / "data_cache" / "benchmarks"


# ---------------------------------------------------------------------------------------------
# Reading the local files
# ---------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise TaskDataError(f"{path}: unreadable ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_jsonl(path: Path, check: Callable[[object, str], None] | None = None) -> list[dict]:
    """The objects of a jsonl file (blank lines skipped); `check(obj, "file:line")` may raise
    a TaskDataError naming what is wrong with one."""
    docs = []
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise TaskDataError(f"{path}:{lineno}: JSON nested too deeply") from None
        if check is not None:
            check(doc, f"{path}:{lineno}")
        docs.append(doc)
    return docs


def _read_hellaswag_text(path: Path) -> list[dict]:
    """The six-lines-per-item form: (1) activity_label + ": " + ctx, (2) label, (3-6) endings.

    ctx is one string here (ctx_b not capitalized, brackets already removed), so the document
    carries it in ctx_a with an empty ctx_b and an empty activity label prefix.
    """
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TaskDataError(
            f"{path}: {len(lines)} lines, expected a multiple of 6 (query, label, 4 endings)"
        )
    docs = []
    for start in range(0, len(lines), 6):
        label = lines[start + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise TaskDataError(f"{path}:{start + 2}: label {label!r}, expected 0, 1, 2 or 3")
        endings = lines[start + 2 : start + 6]
        docs.append({"query": lines[start], "label": int(label), "endings": endings})
    return docs


def _hellaswag_text_item(index: int, doc: dict) -> Item:
    query = _hellaswag_preprocess(doc["query"])
    choices = [_hellaswag_preprocess(e) for e in doc["endings"]]
    return _multiple_choice(index, query, choices, doc["label"])


def _load_local(spec: TaskSpec, files: list[Path]) -> list[Item]:
    name = spec.name
    if name == "hellaswag" and files[0].suffix == ".txt":
        docs, build = _read_hellaswag_text(files[0]), _hellaswag_text_item
    elif name == "piqa":
        docs = read_jsonl(files[0])
        labels = _read_text(files[1]).split()
        if any(label not in ("0", "1") for label in labels):
            raise TaskDataError(f"{files[1]}: expected one label 0 or 1 per line")
        if len(labels) != len(docs):
            raise TaskDataError(
                f"{files[1]}: {len(labels)} labels for {len(docs)} questions in {files[0]}"
            )
        for doc, label in zip(docs, labels):
            doc["label"] = int(label)
        build = piqa_item
    else:
        docs, build = read_jsonl(files[0]), _ITEM_BUILDERS[name]
    items = []
    for i, doc in enumerate(docs):
        try:
            items.append(build(i, doc))
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise TaskDataError(
                f"{files[0]}: item {i} is not in the {name} format ({type(e).__name__}: {e})"
            ) from None
    return items


def _load_hub(spec: TaskSpec) -> list[Item]:
    """The hub copy of the task via `datasets` (needs the [hf] extra and network access)."""
    import datasets  # imported here: optional dependency

    path, config, split = spec.hf
    rows = datasets.load_dataset(path, config, split=split)
    build = _ITEM_BUILDERS[spec.name]
    return [build(i, dict(row)) for i, row in enumerate(rows)]


def find_task_files(name: str, data_dir: str | Path | None = None) -> list[Path] | None:
    """The first complete set of local files for a task under <data_dir>/<task>/, or None."""
    spec = get_task(name)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    for names in spec.files:
        paths = [root / name / f for f in names]
        if all(p.is_file() for p in paths):
            return paths
    return None


def load_task(
    name: str,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    allow_download: bool = True,
) -> list[Item]:
    """The items of a task (the first `limit` of them), from local files or the hub."""
    spec = get_task(name)
    files = find_task_files(name, data_dir)
    if files is not None:
        items = _load_local(spec, files)
    else:
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        expected = " or ".join(" + ".join(names) for names in spec.files)
        where = f"put {expected} in {root / name}/ (or pass --benchmark-dir)"
        if not allow_download:
            raise TaskDataError(f"task {name!r}: no local data file; {where}")
        try:
            items = _load_hub(spec)
        except Exception as e:  # offline, `datasets` missing, hub error: say what to do
            raise TaskDataError(
                f"task {name!r}: no local data file and the Hugging Face hub copy "
                f"({spec.hf[0]}) could not be loaded ({type(e).__name__}: {e}); {where}"
            ) from None
    return items[:limit] if limit is not None else items


def decontamination_texts(name: str, data_dir: str | Path | None = None) -> list[str]:
    """Every item's text (question as in the source + its answer) for data.prepare's
    decontamination stage, so eval and decontamination read benchmarks one way."""
    return [item.text for item in load_task(name, data_dir, allow_download=False)]
