"""Watermark detection rates of a real model: true positives on watermarked generations (as
generated, and after a fraction of their tokens is replaced at random), false positives on
human text (documents of the run's validation split), and our z-scores next to transformers'
WatermarkDetector on the same ids.

    python -m bench.watermark --run runs/smollm2 --data data_cache/stdlib-smollm2 \\
        [--generations 200] [--new-tokens 200] [--quantize int8] [--out FILE]

Prompts are chat requests (instructions built from topics x kinds of text, rendered with the
run's chat template); sampling at temperature 1 with the green-list bias (gamma 0.25, delta 2,
lefthash, as transformers' defaults); every generation runs its full length (no stop token).
Human texts: windows of --new-tokens tokens of validation documents (human_texts). Rates
are at z > --z-threshold (4, the paper's).
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.tables import RESULTS_DIR, write_table
from bench.throughput import device_name
from common.atomic import write_text
from common.cli import add_run_arguments, parse_device
from common.errors import run_cli
from data.chat import chat_ids
from data.loader import TokenStream
from data.manifest import load_manifest
from inference.engine import Engine
from inference.sampling import SamplingParams
from inference.watermark import GreenLists, add_watermark_arguments, score, watermark_config
from model.load import checkpoint_tokenizer, load_model
from model.quant import add_quantize_arguments

TOPICS = ["the ocean", "a lighthouse keeper", "bread baking", "the moon landing", "a lost cat",
          "volcanoes", "a chess tournament", "honey bees", "the printing press", "a rainy city",
          "mountain climbing", "a robot learning to paint", "ancient Rome", "jazz music",
          "a desert journey", "the human heart", "autumn leaves", "a train station", "coral reefs",
          "a village festival"]  # fmt: skip
KINDS = ["Write a short story about {}.", "Explain {} to a child.", "Write a poem about {}.",
         "Describe {} in detail.", "Write a diary entry about {}.", "Give advice related to {}.",
         "Write a news report about {}.", "List some surprising facts about {}.",
         "Write a letter to a friend about {}.", "Argue for and against {}."]  # fmt: skip


def human_texts(data_path: str, eot_id: int, n: int, length: int) -> list[list[int]]:
    """n windows of `length` tokens of validation documents: non-overlapping, none crossing a
    document's end, taken from the documents in turn (the first window of each, then the
    second, ...), so that a split of few long documents still gives n texts."""
    stream = TokenStream(data_path, "val", load_manifest(data_path))
    tokens = stream.read(0, stream.num_tokens)
    ends = np.concatenate([np.flatnonzero(tokens == eot_id), [len(tokens)]])
    starts = np.concatenate([[0], ends[:-1] + 1])
    per_doc = [[tokens[i : i + length].tolist() for i in range(s, e - length + 1, length)]
               for s, e in zip(starts, ends)]  # fmt: skip
    texts = [w for turn in itertools.zip_longest(*per_doc) for w in turn if w is not None]
    if len(texts) < n:
        print(f"note: only {len(texts)} validation windows of {length} tokens", file=sys.stderr)
    return texts[:n]


def replace_fraction(ids: list[int], fraction: float, vocab: int, rng: random.Random) -> list[int]:
    out = list(ids)
    for i in rng.sample(range(len(ids)), int(round(fraction * len(ids)))):
        out[i] = rng.randrange(vocab)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.watermark", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, out_help="the results table (default: bench/results/watermark-<device>.md)")
    add_quantize_arguments(parser)
    parser.add_argument("--data", metavar="DIR", default=None, help="prepared data dir (default: the run's)")
    parser.add_argument("--generations", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--replace", type=float, default=0.2, help="fraction of tokens replaced")
    parser.add_argument("--z-threshold", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    add_watermark_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)
    torch.set_grad_enabled(False)
    model, job, ckpt = load_model(args.run, device, args.step, args.quantize, args.group_size)
    tokenizer = checkpoint_tokenizer(ckpt, job)
    cfg, V = watermark_config(args), model.cfg.vocab_size
    requests = [k.format(t) for k, t in itertools.product(KINDS, TOPICS)][: args.generations]
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": r}], add_generation_prompt=True) for r in requests]
    engine = Engine(model, tokenizer, args.batch, max(map(len, prompts)) + args.new_tokens + 1)
    params = [SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=args.seed + i, watermark=cfg)
              for i in range(len(prompts))]  # fmt: skip
    # Progress in tokens (an upper bound: a generation may stop early), with rate and ETA.
    bar = tqdm(total=len(prompts) * args.new_tokens, desc="generating", unit="tok",
               file=sys.stderr, mininterval=5)
    t0 = time.perf_counter()
    seqs = engine.generate(prompts, params, on_token=lambda s, t, d: t is None or bar.update(1))
    seconds = time.perf_counter() - t0
    bar.close()
    print(f"scoring {len(seqs)} generations and human texts", file=sys.stderr, flush=True)
    marked = [s.generated for s in seqs]
    human = human_texts(args.data or job.data.path, tokenizer.eot_id, args.generations, args.new_tokens)
    rng = random.Random(args.seed)
    attacked = [replace_fraction(ids, args.replace, V, rng) for ids in marked]
    retokenized = [tokenizer.encode(tokenizer.decode(ids)) for ids in marked]
    lists = GreenLists(cfg, V)
    rows = []
    for ignore in (False, True):
        z = {name: [score(ids, cfg, V, None, ignore, lists)["z_score"] for ids in texts]
             for name, texts in (("marked", marked), ("retokenized", retokenized),
                                 ("attacked", attacked), ("human", human))}  # fmt: skip
        rows.append((ignore, z))
    parity = transformers_parity(marked[:20] + human[:20], cfg, V)
    return report(args, device, ckpt, seconds, sum(map(len, marked)), rows, parity, len(human))


def transformers_parity(texts: list[list[int]], cfg, V: int) -> float:
    """The largest |z ours - z transformers| over `texts` (both ngram counting rules; no id is
    BOS: ours strips none either)."""
    from transformers import LlamaConfig, WatermarkDetector, WatermarkingConfig

    worst = 0.0
    for ignore in (False, True):
        det = WatermarkDetector(LlamaConfig(vocab_size=V, bos_token_id=-1), "cpu",
                                WatermarkingConfig(**cfg.transformers_kwargs()), ignore_repeated_ngrams=ignore)  # fmt: skip
        for ids in texts:
            theirs = float(det(torch.tensor([ids]), return_dict=True).z_score[0])
            worst = max(worst, abs(theirs - score(ids, cfg, V, None, ignore)["z_score"]))
    return worst


def report(args, device, ckpt, seconds, tokens, rows, parity, n_human) -> None:
    thr = args.z_threshold
    rate = lambda zs: sum(z > thr for z in zs) / len(zs)
    lines = [
        f"# Watermark detection, {device_name(device)}",
        "",
        f"`{ckpt}`{' ' + args.quantize if args.quantize else ''}; gamma {args.gamma}, delta {args.delta}, "
        f"{args.seeding_scheme} (width {args.context_width}); {len(rows[0][1]['marked'])} generations of "
        f"{args.new_tokens} tokens at temperature 1 ({tokens / seconds:.1f} tok/s, batch {args.batch}); "
        f"{n_human} human texts (windows of {args.new_tokens} tokens of validation documents); z > {thr}.",
        "",
        "| n-grams counted | TPR as generated | TPR decoded + re-encoded | "
        f"TPR {args.replace:.0%} tokens replaced | FPR human | median z generated | median z human | max z human |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ignore, z in rows:
        lines.append(
            f"| {'each distinct once' if ignore else 'every occurrence'} | {rate(z['marked']):.3f} | "
            f"{rate(z['retokenized']):.3f} | {rate(z['attacked']):.3f} | {rate(z['human']):.3f} | "
            f"{np.median(z['marked']):.2f} | {np.median(z['human']):.2f} | {max(z['human']):.2f} |"
        )
    lines += ["", f"Largest |z ours - z transformers.WatermarkDetector| on 40 texts, both rules: {parity:.2e}"]
    table = "\n".join(lines) + "\n"
    print(table)
    path = Path(args.out) if args.out else write_table(RESULTS_DIR, "watermark", device_name(device), table)
    if args.out:
        write_text(path, table)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
