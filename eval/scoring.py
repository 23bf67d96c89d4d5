"""Benchmark scoring, as lm-evaluation-harness scores log-likelihood tasks.

Pipeline for one task: items (eval/tasks.py zero-shot, eval/icl.py few-shot) -> string pairs
(context, continuation) -> token pairs (`encode_pair`, lm-eval's `_encode_pair`) -> summed
log-likelihood and "is greedy" per pair from any `LogLikelihoodModel` (eval/models.py; an item's
pairs are sent as one group, scored from one forward of their shared context) -> per-item
metrics (`item_scores`) -> means over all, clean and dirty items (`aggregate`). Generation tasks
(eval/generation.py) give per-item metrics of their own and are aggregated the same way.
`run_tasks` loads and scores any tasks of eval/suite.py with the contamination check;
`summary_line`, `flat_metrics` and `format_table` report the results; eval/core.py and
eval/probes.py aggregate over tasks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval.contamination import dirty_flags, load_or_build_index, normalize_words
from eval.generation import evaluate_generation
from eval.models import LogLikelihoodModel, TokenRequest
from eval.suite import TaskInfo, load_items, task_info
from eval.tasks import Item

# ---------------------------------------------------------------------------------------------
# Strings -> token requests
# ---------------------------------------------------------------------------------------------


def encode_pair(tokenizer, context: str, continuation: str) -> TokenRequest:
    """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation; the
    context and context + continuation are each encoded whole and the continuation is the tail
    where they differ in length (so a merge across the boundary is tokenized as in the whole
    string). An empty context is the end-of-text token, as lm-eval does."""
    if context == "":
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    context_enc = tokenizer.encode(context)
    return context_enc, whole[len(context_enc) :]


def item_requests(tokenizer, item: Item) -> list[TokenRequest]:
    return [encode_pair(tokenizer, c, x) for c, x in zip(item.contexts, item.continuations)]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def item_scores(
    kind: str,
    item: Item,
    results: Sequence[tuple[float, bool]],
    n_tokens: Sequence[int] | None = None,
) -> dict[str, float]:
    """Per-item metrics. Multiple choice: acc = argmax of summed log-likelihood (first on ties,
    like np.argmax), acc_norm = argmax of log-likelihood / choice length in characters, and
    with the continuations' token counts acc_per_token = argmax of log-likelihood per token
    (the lowest mean loss: llm-foundry's and CORE's metric). LAMBADA and the few-shot language
    modeling tasks: acc = all target tokens greedy; loglik feeds the perplexity."""
    lls = np.array([r[0] for r in results])
    if kind == "loglikelihood":
        return {"acc": float(results[0][1]), "loglik": float(lls[0])}
    scores = {
        "acc": float(np.argmax(lls) == item.gold),
        "acc_norm": float(np.argmax(lls / np.array(item.choice_lengths)) == item.gold),
    }
    if n_tokens is not None:
        scores["acc_per_token"] = float(np.argmax(lls / np.array(n_tokens)) == item.gold)
    return scores


def aggregate(
    metrics: Sequence[str], scores: Sequence[dict[str, float]]
) -> dict[str, float | None]:
    """Means (with lm-eval's standard error: sample std / sqrt(n)) and perplexity =
    exp(-mean summed log-likelihood)."""
    out: dict[str, float | None] = {"n": len(scores)}
    for m in metrics:
        if not scores:
            out[m] = None  # an empty subset (e.g. no dirty items): JSON null, not NaN
            continue
        if m == "perplexity":
            out[m] = math.exp(-float(np.mean([s["loglik"] for s in scores])))
            continue
        values = np.array([s[m] for s in scores])
        out[m] = float(values.mean())
        if len(values) > 1:
            out[m + "_stderr"] = float(values.std(ddof=1) / math.sqrt(len(values)))
    return out


def evaluate_task(
    model: LogLikelihoodModel,
    tokenizer,
    task: str,
    items: Sequence[Item],
    dirty: Sequence[bool] | None = None,
    progress: bool = True,
    chunk_requests: int = 2048,
    log_samples: bool = False,
    shared_context: bool = True,
    spec: TaskInfo | None = None,
) -> dict:
    """Score one task. Returns {"task", "metrics": {"all", "clean", "dirty"} each {n, metric:
    value, ...}, "dirty_fraction", "items_per_s"}; clean/dirty are present when `dirty` is given.

    Items are sent to the model in chunks of about `chunk_requests` requests (sorted by length
    inside the chunk), which keeps padding low and lets the progress bar count items; with
    `shared_context` each item's requests form a group (one forward of their common prefix).
    `log_samples` adds "samples": per item its index, gold, log-likelihoods, token counts and
    greedy flags. `spec` describes a task that is not in eval/suite.py's tables.
    """
    spec = spec or task_info(task)
    scores: list[dict[str, float]] = []
    samples: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc=task, unit="item", disable=not progress, leave=False)
    i = 0
    while i < len(items):
        chunk, requests, counts, groups = [], [], [], []
        while i < len(items) and (not requests or len(requests) < chunk_requests):
            reqs = item_requests(tokenizer, items[i])
            groups += [len(chunk)] * len(reqs)
            chunk.append(items[i])
            requests += reqs
            counts.append(len(reqs))
            i += 1
        results = model.loglikelihood(requests, groups if shared_context else None)
        offset = 0
        for item, count in zip(chunk, counts):
            mine = results[offset : offset + count]
            n_tokens = [len(cont) for _, cont in requests[offset : offset + count]]
            scores.append(item_scores(spec.kind, item, mine, n_tokens))
            if log_samples:
                samples.append({
                    "index": item.index, "gold": item.gold, "loglik": [r[0] for r in mine],
                    "n_tokens": n_tokens, "greedy": [r[1] for r in mine],
                })
            offset += count
        bar.update(len(chunk))
    bar.close()
    elapsed = time.perf_counter() - start
    out = {
        "task": task,
        "metrics": {"all": aggregate(spec.metrics, scores)},
        "items_per_s": len(items) / max(elapsed, 1e-9),
    }
    if dirty is not None:
        if len(dirty) != len(items):
            raise ValueError(f"{len(dirty)} dirty flags for {len(items)} items")
        clean = [s for s, d in zip(scores, dirty) if not d]
        out["metrics"]["clean"] = aggregate(spec.metrics, clean)
        out["metrics"]["dirty"] = aggregate(spec.metrics, [s for s, d in zip(scores, dirty) if d])
        out["dirty_fraction"] = float(np.mean(dirty)) if len(dirty) else 0.0
        out["ngram_n"] = spec.ngram_n
        for sample, flag in zip(samples, dirty):
            sample["dirty"] = flag
    if log_samples:
        out["samples"] = samples
    return out


def run_tasks(
    model: LogLikelihoodModel,
    tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    data_dir: str | Path | None = None,
    contamination_dir: str | Path | None = None,
    dirty_threshold: float | None = None,
    progress: bool = True,
    log_samples: bool = False,
    max_new_tokens: int | None = None,
) -> dict[str, dict]:
    """Load and score several tasks (any of eval/suite.py; a generation task needs a
    GenerativeModel); with `contamination_dir` (a prepared data dir with train shards) each
    item is checked against the n-gram index stored there (built if missing)."""
    for name in tasks:  # fail on a bad name before any slow work
        task_info(name)
    results = {}
    for name in tasks:
        items = load_items(name, data_dir, limit)
        info = task_info(name)
        dirty, n = None, info.ngram_n
        if contamination_dir is not None:
            # The shards are decoded with their own data dir's tokenizer (not necessarily the
            # model's, e.g. for a Hugging Face model checked against some corpus).
            index = load_or_build_index(contamination_dir, n, progress=progress)
            dirty = dirty_flags([it.text for it in items], index, dirty_threshold)
        if info.family == "generation":
            results[name] = evaluate_generation(
                model, tokenizer, name, items, dirty, progress, log_samples, max_new_tokens
            )
        else:
            results[name] = evaluate_task(
                model, tokenizer, name, items, dirty, progress, log_samples=log_samples
            )
        if dirty is not None:
            # Items with fewer than n words have no n-gram and are never flagged.
            short = sum(len(normalize_words(it.text)) < n for it in items)
            results[name]["too_short_to_check"] = short
    return results


def summary_line(results: dict[str, dict]) -> str:
    """"hellaswag acc_norm 0.2612 | lambada acc 0.0213 ppl 2345.1" for a training log line
    (each task's main metric: eval/suite.py)."""
    parts = []
    for name, r in results.items():
        m = r["metrics"]["all"]
        main = task_info(name).main_metric
        text = f"{name} {main} {m[main]:.4f}"
        if "perplexity" in m:
            text += f" ppl {m['perplexity']:.1f}"
        parts.append(text)
    return " | ".join(parts)


def flat_metrics(results: dict[str, dict], prefix: str = "eval") -> dict[str, float]:
    """{"eval/hellaswag/acc_norm": 0.31, "eval/hellaswag/clean/acc_norm": ..., ...} for logging."""
    flat: dict[str, float] = {}
    for name, r in results.items():
        for subset, m in r["metrics"].items():
            tag = f"{prefix}/{name}" if subset == "all" else f"{prefix}/{name}/{subset}"
            for key, value in m.items():
                if value is not None and not key.endswith("_stderr"):
                    flat[f"{tag}/{key}"] = value
        if "dirty_fraction" in r:
            flat[f"{prefix}/{name}/dirty_fraction"] = r["dirty_fraction"]
    return flat


TABLE_METRICS = ("acc", "acc_norm", "acc_per_token")


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table: one row per task and subset (all / clean / dirty); the last column
    holds what a task has besides accuracies (perplexity, exact match, pass@1)."""
    width = max([14] + [len(name) for name in results])
    header = (
        f"{'task':<{width}} {'subset':<6} {'n':>6} {'acc':>14} {'acc_norm':>14} "
        f"{'acc_per_token':>14} {'other':>20} {'dirty%':>7}"
    )
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        for subset, m in r["metrics"].items():

            def cell(key: str, m=m) -> str:
                if m.get(key) is None:
                    return "-"
                err = m.get(key + "_stderr")
                return f"{m[key]:.4f}" + (f"±{err:.4f}" if err is not None else "")

            other = [k for k in m if k not in TABLE_METRICS and k != "n" and "stderr" not in k]
            if "perplexity" in other:
                ppl = m["perplexity"]
                extra = "-" if ppl is None else f"ppl {ppl:.2f}" if ppl < 1e5 else f"ppl {ppl:.3g}"
            else:
                extra = " ".join(
                    f"{k} {m[k]:.4f}" if m[k] is not None else f"{k} -" for k in other[:1]
                ) or "-"
            show_dirty = subset == "all" and "dirty_fraction" in r
            dirty = f"{100 * r['dirty_fraction']:.1f}" if show_dirty else ""
            lines.append(
                f"{name:<{width}} {subset:<6} {m['n']:>6} {cell('acc'):>14} "
                f"{cell('acc_norm'):>14} {cell('acc_per_token'):>14} {extra:>20} {dirty:>7}"
            )
    return "\n".join(lines)
