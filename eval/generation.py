"""Generation tasks: greedy decoding, then a check of what was generated.

- gsm8k       3-shot chain of thought (DCLM's gsm8k_cot settings: "Q: " before the question,
              "\\nA: Let's think step by step." before the answer, " #### " before the final
              number, examples drawn as eval/icl.py draws them); stops at a blank line or "Q:".
              exact_match: the number after the last "####" equals the answer (commas, "$" and
              a final "." dropped); exact_match_flexible: the last number generated does.
- human_eval  0-shot: the function's signature and docstring; stops where the function ends
              (Codex's stop sequences); pass@1 from one greedy completion per problem: the
              prompt + completion + the problem's tests run in eval/sandbox.py, passed when
              they exit 0. A program that hangs, crashes, forks without end or tries to reach
              the network or write outside its directory fails, and the run goes on.
              (DCLM samples five completions per problem; greedy decoding gives one.)

Decoding (`greedy_generate`) batches prompts of similar length through eval/shared_context.py's
`CachedLM` (one prefill, then one token per step for every row, rows of different lengths in one
KV cache), so our Transformer and a Hugging Face model decode through the same loop.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eval.icl import fewshot_indices, icl_root
from eval.sandbox import run_python
from eval.shared_context import CachedLM
from eval.tasks import TaskDataError, read_jsonl


@torch.inference_mode()
def greedy_generate(
    lm: CachedLM,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    max_seq_len: int,
    device: torch.device,
    batch_size: int = 8,
    stop: Callable[[list[int]], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """The greedy continuation of each prompt (new tokens only), at most `max_new_tokens`,
    ending early where `stop(tokens so far)` is true. A prompt longer than
    max_seq_len - max_new_tokens keeps its last tokens."""
    if max_new_tokens < 1 or max_new_tokens >= max_seq_len:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be in [1, {max_seq_len})")
    keep = max_seq_len - max_new_tokens
    prompts = [list(p)[-keep:] for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("empty prompt")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        lengths = torch.tensor([len(prompts[i]) for i in batch])
        tokens = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, : len(prompts[i])] = torch.tensor(prompts[i])
        cache, hidden = lm.prefill(tokens.to(device), max_new_tokens)
        last = hidden[torch.arange(len(batch)), (lengths - 1).to(device)]  # (B, dim)
        state = lm.select(cache, torch.arange(len(batch), device=device), lengths.to(device))
        done = [False] * len(batch)
        for step in range(max_new_tokens):
            next_ids = lm.project(last).argmax(-1)  # (B,)
            for row, (i, t) in enumerate(zip(batch, next_ids.tolist())):
                if not done[row]:
                    out[i].append(t)
                    done[row] = stop is not None and stop(out[i])
            if all(done) or step == max_new_tokens - 1:
                break
            positions = (lengths + step)[:, None].to(device)  # (B, 1): the token just chosen
            last = lm.extend(state, next_ids[:, None], positions)[:, 0]
        if progress is not None:
            progress(len(batch))
    return out


def stop_at(tokenizer, stops: Sequence[str], eot_id: int | None, tail: int = 24):
    """A `stop` for greedy_generate: end-of-text, or one of `stops` in the decoded text (only
    the last `tail` tokens are decoded at each step: the stops are short)."""

    def stop(ids: list[int]) -> bool:
        if eot_id is not None and ids[-1] == eot_id:
            return True
        text = tokenizer.decode(ids[-tail:])
        return any(s in text for s in stops)

    return stop


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop sequence."""
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


# ---------------------------------------------------------------------------------------------
# The tasks
# ---------------------------------------------------------------------------------------------


@dataclass
class GenItem:
    index: int
    prompt: str
    target: str  # gsm8k: the answer; human_eval: the test code
    text: str  # what the contamination check looks for
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationTask:
    name: str
    path: str  # under icl/
    num_fewshot: int
    stops: tuple[str, ...]
    max_new_tokens: int
    metrics: tuple[str, ...]
    ngram_n: int = 13


GSM8K = GenerationTask(
    "gsm8k", "symbolic_problem_solving/gsm8k.jsonl", 3, ("\n\n", "Q:"), 256,
    ("exact_match", "exact_match_flexible"),
)
HUMAN_EVAL = GenerationTask(
    "human_eval", "programming/human_eval.jsonl", 0,
    ("\nclass", "\ndef", "\n#", "\nif", "\nprint"), 384, ("pass@1",),
)
GENERATION_TASKS = {t.name: t for t in (GSM8K, HUMAN_EVAL)}
GSM8K_ANSWER = "\nA: Let's think step by step."


def _docs(task: GenerationTask, data_dir, fields: tuple[str, ...]) -> list[dict]:
    path = icl_root(data_dir) / task.path
    if not path.is_file():
        raise TaskDataError(f"task {task.name!r}: {path} not found (llm-foundry's local_data)")
    docs = read_jsonl(path)
    for i, d in enumerate(docs):
        missing = [f for f in fields if not isinstance(d.get(f), str)]
        if missing:
            raise TaskDataError(f"{path}: item {i} has no string field(s) {missing}")
    return docs


def gsm8k_items(data_dir: str | Path | None = None, limit: int | None = None) -> list[GenItem]:
    docs = _docs(GSM8K, data_dir, ("context", "chain_of_thought", "answer"))
    items = []
    for idx in range(len(docs) if limit is None else min(limit, len(docs))):
        shots = fewshot_indices(idx, len(docs), GSM8K.num_fewshot)
        prompt = "".join(
            f"Q: {docs[j]['context']}{GSM8K_ANSWER} {docs[j]['chain_of_thought']} #### "
            f"{docs[j]['answer']}\n\n" for j in shots
        )
        # The prompt ends without the delimiter's trailing space: the model writes it with the
        # first word (a token of its own in most tokenizers).
        prompt += f"Q: {docs[idx]['context']}{GSM8K_ANSWER}"
        d = docs[idx]
        items.append(GenItem(idx, prompt, d["answer"], d["context"] + " " + d["answer"]))
    return items


def human_eval_items(data_dir: str | Path | None = None, limit: int | None = None) -> list[GenItem]:
    docs = _docs(HUMAN_EVAL, data_dir, ("task_id", "prompt", "test", "entry_point"))
    return [
        GenItem(i, d["prompt"], d["test"], d["prompt"],
                {"entry_point": d["entry_point"], "task_id": d["task_id"]})
        for i, d in enumerate(docs[:limit])
    ]


def normalize_number(text: str) -> str:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else str(value)


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_score(completion: str, answer: str) -> dict[str, float]:
    gold = normalize_number(answer)
    strict = None
    if "####" in completion:
        found = NUMBER.findall(completion.split("####")[-1])
        strict = normalize_number(found[0]) if found else None
    numbers = NUMBER.findall(completion)
    flexible = normalize_number(numbers[-1]) if numbers else None
    return {"exact_match": float(strict == gold), "exact_match_flexible": float(flexible == gold)}


def human_eval_program(item: GenItem, completion: str) -> str:
    return (f"{item.prompt}{completion}\n\n{item.target}\n\n"
            f"check({item.extra['entry_point']})\n")


def score_human_eval(
    items: Sequence[GenItem], completions: Sequence[str], timeout_s: float = 10.0,
    workers: int = 2,
) -> list[dict]:
    """Run each problem's program in the sandbox; per item pass@1 and how it ended."""

    def one(pair):
        item, completion = pair
        r = run_python(human_eval_program(item, completion), timeout_s=timeout_s)
        return {"pass@1": float(r.passed), "status": r.status, "seconds": round(r.seconds, 3),
                "stderr": r.stderr[-500:], "layers": r.layers}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, zip(items, completions)))


def evaluate_generation(
    lm,
    tokenizer,
    task: str,
    items: Sequence[GenItem],
    dirty: Sequence[bool] | None = None,
    progress: bool = True,
    log_samples: bool = False,
    max_new_tokens: int | None = None,
    sandbox_workers: int = 2,
    sandbox_timeout_s: float = 10.0,
) -> dict:
    """Generate for every item with `lm` (eval/models.py's GenerativeModel), score, and
    aggregate as eval/scoring.py's evaluate_task: {"task", "metrics": {"all", "clean",
    "dirty"}, "items_per_s", ...}."""
    from tqdm import tqdm

    from eval.scoring import aggregate

    spec = GENERATION_TASKS[task]
    # At most half the window for the answer: the prompt keeps the rest.
    new = min(max_new_tokens or spec.max_new_tokens, lm.max_seq_len // 2)
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc=task, unit="item", disable=not progress, leave=False)
    ids = lm.generate(
        [tokenizer.encode(it.prompt) for it in items], new,
        stop_at(tokenizer, spec.stops, tokenizer.eot_id), bar.update,
    )
    bar.close()
    eot = tokenizer.eot_id
    completions = [
        cut_at_stops(tokenizer.decode([t for t in x if t != eot]), spec.stops) for x in ids
    ]
    if task == "gsm8k":
        scores = [gsm8k_score(c, it.target) for c, it in zip(completions, items)]
    else:
        scores = score_human_eval(items, completions, sandbox_timeout_s, sandbox_workers)
    out = {
        "task": task,
        "metrics": {"all": aggregate(spec.metrics, scores)},
        "items_per_s": len(items) / max(time.perf_counter() - start, 1e-9),
    }
    if task == "human_eval":
        out["sandbox_layers"] = scores[0]["layers"] if scores else []
        out["statuses"] = {s: sum(x["status"] == s for x in scores) for s in ("ok", "error", "timeout")}
    if dirty is not None:
        out["metrics"]["clean"] = aggregate(spec.metrics, [s for s, d in zip(scores, dirty) if not d])
        out["metrics"]["dirty"] = aggregate(spec.metrics, [s for s, d in zip(scores, dirty) if d])
        out["dirty_fraction"] = sum(dirty) / len(dirty) if dirty else 0.0
    if log_samples:
        out["samples"] = [
            {"index": it.index, "completion": c, **{m: s[m] for m in spec.metrics},
             **({"dirty": dirty[k]} if dirty is not None else {})}
            for k, (it, c, s) in enumerate(zip(items, completions, scores))
        ]
    return out
