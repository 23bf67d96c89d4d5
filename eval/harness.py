"""Zero-shot benchmark scoring, as lm-evaluation-harness scores log-likelihood tasks.

Pipeline for one task: items (eval/tasks.py) -> string pairs (context, continuation) -> token
pairs (`encode_pair`, lm-eval's `_encode_pair`) -> summed log-likelihood and "is greedy" per pair
from any `LogLikelihoodModel` -> per-item metrics -> means over all, clean and dirty items.

Any model that can score token pairs plugs in: `TransformerLogLikelihood` wraps our native
Transformer, `HFLogLikelihood` a Hugging Face causal LM, so an exported model can be compared
with the native one on identical token requests.
"""

from __future__ import annotations

import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import PretrainError
from eval.tasks import Item, get_task, load_task

TokenRequest = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


@runtime_checkable
class LogLikelihoodModel(Protocol):
    """Scores continuations: for each (context, continuation) token pair, the sum over the
    continuation's tokens of log p(token | everything before it), and whether every
    continuation token is the model's argmax (greedy) prediction."""

    max_seq_len: int

    def loglikelihood(self, requests: list[TokenRequest]) -> list[tuple[float, bool]]: ...


class _BatchedLogLikelihood(ABC):
    """lm-eval's `_loglikelihood_tokens` for a model that maps tokens (B, T) -> logits (B, T, V).

    Requests are sorted by total length (longest first, so an out-of-memory shows at once),
    batched, right-padded to the longest in the batch. The model input is
    (context + continuation)[-(max_seq_len + 1):][:-1], i.e. the context is truncated on the
    left so the whole continuation is always scored (a continuation longer than max_seq_len
    keeps its last max_seq_len tokens, with a warning). Right padding is safe for a causal model:
    no real position attends to a pad.
    """

    def __init__(self, max_seq_len: int, batch_size: int, device: torch.device):
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.device = device

    @abstractmethod
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 on self.device -> logits (B, T, V)."""

    def logits_at(self, tokens: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        """Logits (N, V) at positions (rows[k], cols[k]) only; override to skip the rest."""
        return self.logits(tokens)[rows, cols]

    @torch.inference_mode()
    def loglikelihood(self, requests: list[TokenRequest]) -> list[tuple[float, bool]]:
        inputs, targets, too_long = [], [], 0
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i}: empty continuation")
            if not ctx:
                raise ValueError(f"request {i}: empty context (encode_pair puts eot there)")
            inputs.append((list(ctx) + list(cont))[-(self.max_seq_len + 1) :][:-1])
            if len(cont) > self.max_seq_len:
                # Only the last max_seq_len continuation tokens can be predicted inside the
                # window; score those (lm-eval has no defined behaviour here). Rare: it needs
                # an answer longer than the model's context.
                too_long += 1
                cont = cont[-self.max_seq_len :]
            targets.append(list(cont))
        if too_long:
            warnings.warn(
                f"{too_long} continuation(s) longer than max_seq_len {self.max_seq_len}: "
                "scored on their last max_seq_len tokens",
                stacklevel=2,
            )
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(inputs[batch[0]])  # longest first: the batch's padded width
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens[row, : len(inputs[i])] = torch.tensor(inputs[i])
            # Position t predicts token t + 1, so a continuation of n_cont tokens is predicted
            # by the last n_cont input positions. Take those positions of every sequence as one
            # (N, V) block (N = total continuation tokens): one log_softmax and one device ->
            # host copy per batch.
            rows, cols, target = [], [], []
            for row, i in enumerate(batch):
                n_in, n_cont = len(inputs[i]), len(targets[i])
                rows += [row] * n_cont
                cols += range(n_in - n_cont, n_in)
                target += targets[i]
            dev = self.device
            rows_t = torch.tensor(rows, device=dev)
            target_t = torch.tensor(target, device=dev)
            logits = self.logits_at(tokens.to(dev), rows_t, torch.tensor(cols, device=dev))
            logprobs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
            picked = logprobs.gather(1, target_t[:, None]).squeeze(1).double()  # (N,)
            missed = (logprobs.argmax(-1) != target_t).double()  # (N,) 1 where not greedy
            zeros = torch.zeros(len(batch), dtype=torch.float64, device=dev)
            sums = zeros.index_add(0, rows_t, picked)  # (B,) summed log-likelihood per request
            misses = zeros.index_add(0, rows_t, missed)
            for row, (ll, miss) in enumerate(zip(sums.tolist(), misses.tolist())):
                results[batch[row]] = (ll, miss == 0)
        return results  # type: ignore[return-value]


class TransformerLogLikelihood(_BatchedLogLikelihood):
    """Our model/transformer.py Transformer (forward(tokens) -> logits (B, T, V))."""

    def __init__(self, model: torch.nn.Module, batch_size: int = 16):
        device = next(model.parameters()).device
        super().__init__(model.cfg.max_seq_len, batch_size, device)
        self.model = model

    def loglikelihood(self, requests: list[TokenRequest]) -> list[tuple[float, bool]]:
        # Eval mode while scoring, then back to what it was (eval runs inside training too).
        was_training = self.model.training
        self.model.eval()
        try:
            return super().loglikelihood(requests)
        finally:
            self.model.train(was_training)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def logits_at(self, tokens: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        # Project only the scored positions: (B, T, V) logits would be 8 GB at batch 16,
        # 2048 tokens and a 128k vocabulary in bf16.
        hidden = self.model(tokens, return_hidden=True)  # (B, T, dim)
        return F.linear(hidden[rows, cols], self.model.output_weight)  # (N, V)


class HFLogLikelihood(_BatchedLogLikelihood):
    """A Hugging Face AutoModelForCausalLM (e.g. our export loaded by transformers)."""

    def __init__(self, model, batch_size: int = 16, max_seq_len: int | None = None):
        device = next(model.parameters()).device
        max_len = max_seq_len or model.config.max_position_embeddings
        super().__init__(max_len, batch_size, device)
        self.model = model.eval()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, **kw
    ) -> HFLogLikelihood:
        import transformers
        from transformers import AutoModelForCausalLM  # optional dependency ([hf] extra)

        # transformers renamed torch_dtype to dtype in 4.56.
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        model = AutoModelForCausalLM.from_pretrained(path, **{key: dtype}).to(device)
        return cls(model, **kw)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits


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


def item_scores(kind: str, item: Item, results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """Per-item metrics. Multiple choice: acc = argmax of summed log-likelihood (first on ties,
    like np.argmax), acc_norm = argmax of log-likelihood / choice length in characters.
    LAMBADA: acc = all target tokens greedy; loglik feeds the perplexity."""
    lls = np.array([r[0] for r in results])
    if kind == "loglikelihood":
        return {"acc": float(results[0][1]), "loglik": float(lls[0])}
    return {
        "acc": float(np.argmax(lls) == item.gold),
        "acc_norm": float(np.argmax(lls / np.array(item.choice_lengths)) == item.gold),
    }


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
) -> dict:
    """Score one task. Returns {"task", "metrics": {"all", "clean", "dirty"} each {n, metric:
    value, ...}, "dirty_fraction", "items_per_s"}; clean/dirty are present when `dirty` is given.

    Items are sent to the model in chunks of about `chunk_requests` requests (sorted by length
    inside the chunk), which keeps padding low and lets the progress bar count items.
    `log_samples` adds "samples": per item its index, gold, log-likelihoods and greedy flags.
    """
    from tqdm import tqdm

    spec = get_task(task)
    scores: list[dict[str, float]] = []
    samples: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc=task, unit="item", disable=not progress, leave=False)
    i = 0
    while i < len(items):
        chunk, requests, counts = [], [], []
        while i < len(items) and (not requests or len(requests) < chunk_requests):
            reqs = item_requests(tokenizer, items[i])
            chunk.append(items[i])
            requests += reqs
            counts.append(len(reqs))
            i += 1
        results = model.loglikelihood(requests)
        offset = 0
        for item, count in zip(chunk, counts):
            mine = results[offset : offset + count]
            scores.append(item_scores(spec.kind, item, mine))
            if log_samples:
                samples.append({
                    "index": item.index, "gold": item.gold,
                    "loglik": [r[0] for r in mine], "greedy": [r[1] for r in mine],
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
) -> dict[str, dict]:
    """Load and score several tasks; with `contamination_dir` (a prepared data dir with train
    shards) each item is checked against the n-gram index stored there (built if missing)."""
    from eval.contamination import dirty_flags, load_or_build_index, normalize_words

    for name in tasks:  # fail on a bad name before any slow work
        get_task(name)
    results = {}
    for name in tasks:
        items = load_task(name, data_dir, limit)
        dirty, n = None, get_task(name).ngram_n
        if contamination_dir is not None:
            # The shards are decoded with their own data dir's tokenizer (not necessarily the
            # model's, e.g. for a Hugging Face model checked against some corpus).
            index = load_or_build_index(contamination_dir, n, progress=progress)
            dirty = dirty_flags([it.text for it in items], index, dirty_threshold)
        results[name] = evaluate_task(
            model, tokenizer, name, items, dirty, progress, log_samples=log_samples
        )
        if dirty is not None:
            # Items with fewer than n words have no n-gram and are never flagged.
            short = sum(len(normalize_words(it.text)) < n for it in items)
            results[name]["too_short_to_check"] = short
    return results


def summary_line(results: dict[str, dict]) -> str:
    """"hellaswag acc_norm 0.2612 | lambada acc 0.0213 ppl 2345.1" for a training log line."""
    parts = []
    for name, r in results.items():
        m = r["metrics"]["all"]
        main = "acc_norm" if "acc_norm" in m else "acc"
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


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table: one row per task and subset (all / clean / dirty)."""
    header = (
        f"{'task':<14} {'subset':<6} {'n':>6} {'acc':>14} {'acc_norm':>14} {'ppl':>9} "
        f"{'dirty%':>7}"
    )
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        for subset, m in r["metrics"].items():

            def cell(key: str, m=m) -> str:
                if m.get(key) is None:
                    return "-"
                err = m.get(key + "_stderr")
                return f"{m[key]:.4f}" + (f"±{err:.4f}" if err is not None else "")

            ppl = m.get("perplexity")
            ppl = "-" if ppl is None else f"{ppl:.2f}" if ppl < 1e5 else f"{ppl:.3g}"
            show_dirty = subset == "all" and "dirty_fraction" in r
            dirty = f"{100 * r['dirty_fraction']:.1f}" if show_dirty else ""
            lines.append(
                f"{name:<14} {subset:<6} {m['n']:>6} {cell('acc'):>14} {cell('acc_norm'):>14} "
                f"{ppl:>9} {dirty:>7}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loading a model and its tokenizer for evaluation (used by `python -m eval`)
# ---------------------------------------------------------------------------------------------


class TokenizerMismatchError(PretrainError, ValueError):
    """The tokenizer at hand is not the one the checkpoint was trained with."""


def check_checkpoint_tokenizer(ckpt: Path, tokenizer, model_vocab_size: int) -> None:
    """Stop when `tokenizer` differs from the one the checkpoint's run was trained with.

    The run's tokenizer identity is in `<run>/run_info.json` (the data manifest train.py saved
    at the start of the run); the tokenizer at hand comes from today's data dir, which may have
    been re-prepared since. Scores with another tokenizer would be meaningless.
    """
    import json

    info_path = Path(ckpt).parent.parent / "run_info.json"
    if info_path.is_file():
        trained = json.loads(info_path.read_text()).get("manifest", {}).get("tokenizer")
        here = tokenizer.identity()
        if trained and trained.get("sha256") != here["sha256"]:
            raise TokenizerMismatchError(
                f"checkpoint {ckpt} was trained with tokenizer {trained.get('name')!r} "
                f"({trained.get('n_vocab')} ids, sha256 {trained.get('sha256', '')[:12]}, see "
                f"{info_path}), but the tokenizer given is {here['name']!r} ({here['n_vocab']} "
                f"ids, sha256 {here['sha256'][:12]}); evaluate with the run's data dir or "
                f"tokenizer file"
            )
    if tokenizer.n_vocab > model_vocab_size:
        raise TokenizerMismatchError(
            f"checkpoint {ckpt}: the tokenizer has {tokenizer.n_vocab} ids but the model only "
            f"{model_vocab_size} (model.vocab_size): not the tokenizer it was trained with"
        )


def native_tokenizer(ckpt: Path, cfg, tokenizer_spec: str | None = None):
    """The tokenizer to score a checkpoint with: `tokenizer_spec` (tiktoken name or .tiktoken
    file) or its data dir's; checked to be the one the run was trained with."""
    from data.manifest import manifest_tokenizer
    from data.tokenizer import load_tokenizer

    if tokenizer_spec is not None:
        tokenizer = load_tokenizer(tokenizer_spec)
    else:
        tokenizer = manifest_tokenizer(cfg.data.path)
    check_checkpoint_tokenizer(ckpt, tokenizer, cfg.model.vocab_size)
    return tokenizer


def load_native(
    checkpoint: str | Path,
    device: str = "cpu",
    tokenizer_spec: str | None = None,
    batch_size: int = 16,
) -> tuple[TransformerLogLikelihood, object, Path]:
    """(scorer, tokenizer, checkpoint dir) for a checkpoint dir or a run dir (its newest
    checkpoint); see `native_tokenizer` for the tokenizer."""
    from model.load import load_model

    model, cfg, ckpt = load_model(checkpoint, device)
    tokenizer = native_tokenizer(ckpt, cfg, tokenizer_spec)
    return TransformerLogLikelihood(model, batch_size), tokenizer, ckpt


class HFTokenizer:
    """A Hugging Face `tokenizer.json` behind our Tokenizer interface (encode / decode /
    eot_id), so an exported model is scored with the tokenizer that was exported with it."""

    def __init__(self, path: str | Path, eot_token: str = "<|endoftext|>"):
        from tokenizers import Tokenizer as _HFTok

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found (an exported model has a tokenizer.json)")
        self.tok = _HFTok.from_file(str(file))
        self.name = file.parent.name
        self.n_vocab = self.tok.get_vocab_size(with_added_tokens=True)
        eot = self.tok.token_to_id(eot_token)
        if eot is None:
            raise ValueError(f"{file}: no {eot_token} token")
        self.eot_id = eot

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def load_hf(
    path: str | Path,
    device: str = "cpu",
    tokenizer_spec: str | None = None,
    batch_size: int = 16,
) -> tuple[HFLogLikelihood, object]:
    """(scorer, tokenizer) for a Hugging Face model dir; the tokenizer is the dir's
    tokenizer.json unless `tokenizer_spec` names one of ours."""
    from data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_spec) if tokenizer_spec else HFTokenizer(path)
    return HFLogLikelihood.from_pretrained(path, device, batch_size=batch_size), tokenizer


# ---------------------------------------------------------------------------------------------
# Command line: the benchmark part of `python -m eval`
# ---------------------------------------------------------------------------------------------


def add_benchmark_arguments(parser) -> None:
    """The benchmark options of `python -m eval` (an argparse parser)."""
    from eval.tasks import TASKS

    g = parser.add_argument_group("zero-shot benchmarks")
    g.add_argument(
        "--tasks", default="",
        help=f"comma-separated benchmark tasks ({', '.join(TASKS)}), or 'all'",
    )
    g.add_argument("--limit", type=int, default=None, help="first N items of each task")
    g.add_argument("--data-dir", default=None, help="benchmark files: <data-dir>/<task>/...")
    g.add_argument(
        "--tokenizer", default=None,
        help="tiktoken name or .tiktoken file (default: the run's; for --hf: its tokenizer.json)",
    )
    g.add_argument(
        "--contamination", default="auto",
        help="prepared data dir whose train shards are checked for benchmark n-grams; 'auto': "
        "the checkpoint's data.path when it has train shards; 'off': no check",
    )
    g.add_argument(
        "--dirty-threshold", type=float, default=None,
        help="an item is dirty when this fraction of its n-grams is in the training data "
        "(default: any n-gram)",
    )
    g.add_argument(
        "--log-samples", action="store_true",
        help="include every item's log-likelihoods (and dirty flag) in the JSON",
    )


def parse_tasks(spec: str) -> list[str]:
    """'hellaswag,lambada' or 'all' -> names; an unknown name stops before any slow work."""
    from eval.tasks import TASKS, get_task

    names = list(TASKS) if spec.strip() == "all" else [t.strip() for t in spec.split(",")]
    names = [n for n in names if n]
    for name in names:
        get_task(name)
    return names


def contamination_dir(option: str, ckpt: Path | None) -> Path | None:
    """--contamination: a dir, 'off', or 'auto' (the checkpoint's data.path if it still has
    train shards; nothing for a Hugging Face model, whose training data is unknown)."""
    if option == "off":
        return None
    if option != "auto":
        return Path(option)
    if ckpt is None:
        return None
    from model.checkpoint import load_config_dict

    data_path = Path(load_config_dict(ckpt)["data"]["path"])
    return data_path if any(data_path.glob("train_*.bin")) else None


def run_benchmarks(
    lm: LogLikelihoodModel, tokenizer, tasks: Sequence[str], args, ckpt: Path | None = None
) -> dict:
    """Score `tasks` with the options of `add_benchmark_arguments`; print the table; return
    {"tasks": per-task results, "contamination": settings} for the JSON report."""
    check_dir = contamination_dir(args.contamination, ckpt)
    results = run_tasks(
        lm, tokenizer, tasks, args.limit, args.data_dir, check_dir, args.dirty_threshold,
        log_samples=args.log_samples,
    )
    print(format_table(results))
    return {
        "tasks": results,
        "limit": args.limit,
        "contamination": {
            "data_dir": str(check_dir) if check_dir else None,
            "threshold": args.dirty_threshold if args.dirty_threshold is not None else "any",
        },
    }
