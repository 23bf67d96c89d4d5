"""In-context-learning (few-shot) tasks from llm-foundry's task files, as CORE scores them.

Three task types, each a jsonl layout (../shared/benchmarks/icl/README.md):

- multiple_choice  {query, choices, gold}: one request per choice, context = query +
                   delimiter, continuation = the choice.
- schema           {context_options, continuation, gold}: the option changes the context, the
                   continuation (delimiter + continuation) is shared.
- language_modeling  {context, continuation}: context = context.strip() + delimiter; correct
                   when every continuation token is the model's greedy prediction.

Few-shot examples come from the same file, never the item itself: item `idx` draws
`num_fewshot` of the other items with `random.Random(1234 + idx)` (nanochat's draw, so an
item's examples do not depend on `--limit` or on which other items are scored). Each example is
written with its answer (query + delimiter + gold choice; gold option + delimiter +
continuation; stripped context + delimiter + continuation) and followed by a blank line
(`fewshot_delimiter`, nanochat's and lm-eval's default; llm-foundry uses one newline).

The items are eval/tasks.py `Item`s, so they are scored by eval/scoring.py exactly as the
zero-shot tasks (lm-eval's request encoding, acc / acc_norm by characters) plus acc_per_token
(lowest mean loss per continuation token: llm-foundry's and nanochat's multiple-choice metric,
the one CORE uses). An item's contamination text is the item alone (without the examples).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from eval.tasks import Item, TaskDataError, default_data_dir, read_jsonl

FEWSHOT_SEED = 1234
KINDS = ("multiple_choice", "schema", "language_modeling")
FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


@dataclass(frozen=True)
class IclTask:
    """One few-shot task: a file under icl/ and how its prompts are built."""

    name: str
    path: str  # under the icl/ benchmark folder, e.g. "world_knowledge/arc_easy.jsonl"
    kind: str  # one of KINDS
    num_fewshot: int
    delimiter: str = " "  # between the query / context and the answer
    ngram_n: int = 13  # contamination n-gram length (5th-percentile item words, in [8, 13])
    fewshot_delimiter: str = "\n\n"  # after each example

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind {self.kind!r}, expected one of {KINDS}")

    @property
    def scoring_kind(self) -> str:
        """eval/scoring.py's kind: choices compared, or one continuation judged greedy."""
        return "loglikelihood" if self.kind == "language_modeling" else "multiple_choice"

    @property
    def metrics(self) -> tuple[str, ...]:
        if self.kind == "language_modeling":
            return ("acc",)
        return ("acc", "acc_norm", "acc_per_token")

    @property
    def main_metric(self) -> str:
        """The metric CORE centers: greedy exact continuation, or lowest mean token loss."""
        return "acc" if self.kind == "language_modeling" else "acc_per_token"


def fewshot_indices(idx: int, n_items: int, k: int, seed: int = FEWSHOT_SEED) -> list[int]:
    """`k` distinct indices in range(n_items) other than `idx`: exactly
    `random.Random(seed + idx).sample([i for i in range(n_items) if i != idx], k)` (sample
    picks by position, and position j of that list is j, or j + 1 from idx on), without
    building the list (O(k) per item, not O(n))."""
    if k == 0:
        return []
    if k > n_items - 1:
        raise TaskDataError(f"{k}-shot needs {k + 1} items, the file has {n_items}")
    picks = random.Random(seed + idx).sample(range(n_items - 1), k)
    return [j + (j >= idx) for j in picks]


def read_icl_file(path: Path, kind: str) -> list[dict]:
    """The documents of a task file, each checked for its layout's fields and types."""
    docs = read_jsonl(path, lambda doc, where: _check_doc(doc, kind, where))
    if not docs:
        raise TaskDataError(f"{path}: no items")
    return docs


def _check_doc(doc: object, kind: str, where: str) -> None:
    fields = FIELDS[kind]
    if not isinstance(doc, dict) or any(k not in doc for k in fields):
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise TaskDataError(f"{where}: a {kind} item needs fields {list(fields)}, got {got}")
    options = doc.get("choices", doc.get("context_options"))
    if options is not None:
        if not isinstance(options, list) or len(options) < 2 or not all(
            isinstance(o, str) for o in options
        ):
            raise TaskDataError(f"{where}: choices / context_options must be 2+ strings")
        gold = doc["gold"]
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
            raise TaskDataError(
                f"{where}: gold {gold!r} is not an index into its {len(options)} options"
            )
    for key in ("query", "context", "continuation"):
        if key in fields and not isinstance(doc[key], str):
            raise TaskDataError(f"{where}: field {key!r} must be a string")


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def example_text(task: IclTask, doc: dict) -> str:
    """A few-shot example: the item written out with its answer."""
    if task.kind == "multiple_choice":
        return doc["query"] + task.delimiter + doc["choices"][doc["gold"]]
    if task.kind == "schema":
        return doc["context_options"][doc["gold"]] + task.delimiter + doc["continuation"]
    return doc["context"].strip() + task.delimiter + doc["continuation"]


def icl_item(task: IclTask, index: int, doc: dict, prefix: str) -> Item:
    """The scored string pairs of one item after its few-shot `prefix`."""
    if task.kind == "multiple_choice":
        choices = doc["choices"]
        return Item(
            index=index,
            contexts=[prefix + doc["query"] + task.delimiter] * len(choices),
            continuations=list(choices),
            gold=doc["gold"],
            choice_lengths=[len(c) for c in choices],
            text=doc["query"] + " " + choices[doc["gold"]],
        )
    if task.kind == "schema":
        options = doc["context_options"]
        return Item(
            index=index,
            contexts=[prefix + o for o in options],
            continuations=[task.delimiter + doc["continuation"]] * len(options),
            gold=doc["gold"],
            choice_lengths=[len(o) for o in options],  # lm-eval's: the options are its choices
            text=options[doc["gold"]] + " " + doc["continuation"],
        )
    cont = doc["continuation"]
    return Item(
        index=index,
        contexts=[prefix + doc["context"].strip() + task.delimiter],
        continuations=[cont],
        gold=0,
        choice_lengths=[len(cont)],
        text=doc["context"].strip() + " " + cont,
    )


def icl_items(task: IclTask, docs: list[dict], limit: int | None = None) -> list[Item]:
    """The first `limit` items, each with its few-shot examples drawn from all of `docs`."""
    items = []
    for idx in range(len(docs) if limit is None else min(limit, len(docs))):
        shots = fewshot_indices(idx, len(docs), task.num_fewshot)
        prefix = "".join(example_text(task, docs[j]) + task.fewshot_delimiter for j in shots)
        items.append(icl_item(task, idx, docs[idx], prefix))
    return items


def fewshot_table(task: IclTask, n_items: int, limit: int | None = None) -> list[list[int]]:
    """Item -> the indices of its few-shot examples (for logs and the lm-eval parity check)."""
    n = n_items if limit is None else min(limit, n_items)
    return [fewshot_indices(idx, n_items, task.num_fewshot) for idx in range(n)]


def icl_root(data_dir: str | Path | None = None) -> Path:
    """<benchmark dir>/icl: ../shared/benchmarks/icl or data_cache/benchmarks/icl."""
    return (Path(data_dir) if data_dir is not None else default_data_dir()) / "icl"


def load_icl_docs(task: IclTask, data_dir: str | Path | None = None) -> list[dict]:
    path = icl_root(data_dir) / task.path
    if not path.is_file():
        raise TaskDataError(
            f"task {task.name!r}: {path} not found (llm-foundry's scripts/eval/local_data/"
            f"{task.path}; pass --benchmark-dir with an icl/ folder)"
        )
    return read_icl_file(path, task.kind)


def load_icl_task(
    task: IclTask, data_dir: str | Path | None = None, limit: int | None = None
) -> list[Item]:
    return icl_items(task, load_icl_docs(task, data_dir), limit)
