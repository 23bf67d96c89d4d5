"""Green-list watermarking (Kirchenbauer et al. 2023, arXiv 2301.10226) and its detector.

At every step a pseudo-random "green list" of gamma * V token ids is drawn from a seed hashed
from the preceding token(s), and delta is added to the green logits; a text whose tokens are
green far more often than gamma is watermarked:

    z = (G - gamma T) / sqrt(T gamma (1 - gamma)),   p = P(N(0, 1) > z) = erfc(z / sqrt 2) / 2

for G green tokens out of T scored. The hashing is transformers' (WatermarkLogitsProcessor /
WatermarkDetector, generation/watermarking.py), so the two detect each other's text when
configured alike (same gamma, delta, key, scheme, context width; vocab_size = the model's):

    lefthash  seed = key * previous token (the context width only sets where scoring starts)
    selfhash  seed = min over the window (last width - 1 tokens + the candidate c) of
              key * (T[t] + 1) * (T[c] + 1) in wrapping int64, T = randperm(1_000_003) seeded
              with the key; a candidate among the 40 best is green only in its own list

Green lists come from torch's CPU generator: CUDA's draws other permutations, so ours always
hash on the CPU and a text reads the same wherever it was generated.

    python -m inference.watermark detect --run DIR --file texts.jsonl [--out scores.json]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.atomic import write_json
from common.cli import add_run_arguments, parse_device
from common.errors import run_cli
from model.checkpoint import find_checkpoint, resolve_checkpoint
from model.load import checkpoint_tokenizer, load_job_config

SCHEMES = ("lefthash", "selfhash")
TABLE_SIZE = 1_000_003
SELFHASH_CANDIDATES = 40  # transformers (and the original repository) try the 40 best


@dataclass(frozen=True)
class WatermarkConfig:
    gamma: float = 0.25  # fraction of the vocabulary that is green (transformers: greenlist_ratio)
    delta: float = 2.0  # added to green logits (transformers: bias)
    hash_key: int = 15485863  # the millionth prime; deploy with your own
    seeding_scheme: str = "lefthash"
    context_width: int = 1

    def __post_init__(self):
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"watermark gamma = {self.gamma}: expected 0 < gamma < 1")
        if self.seeding_scheme not in SCHEMES:
            raise ValueError(f"watermark seeding_scheme = {self.seeding_scheme!r}: expected one of {SCHEMES}")
        if self.context_width < 1:
            raise ValueError(f"watermark context_width = {self.context_width}: expected >= 1")

    def transformers_kwargs(self) -> dict:
        """The same settings as transformers.WatermarkingConfig(**kwargs) takes them."""
        return dict(greenlist_ratio=self.gamma, bias=self.delta, hashing_key=self.hash_key,
                    seeding_scheme=self.seeding_scheme, context_width=self.context_width)  # fmt: skip


class GreenLists:
    """The green lists of one configuration and vocabulary size (cached by seed)."""

    def __init__(self, cfg: WatermarkConfig, vocab_size: int):
        self.cfg, self.vocab_size = cfg, vocab_size
        self.size = int(vocab_size * cfg.gamma)
        self.rng = torch.Generator(device="cpu")
        self.rng.manual_seed(cfg.hash_key)
        self.table = torch.randperm(TABLE_SIZE, generator=self.rng)  # selfhash's fixed table
        self._mask = functools.lru_cache(maxsize=2048)(self._mask_of_seed)

    def seed(self, window: list[int]) -> int:
        """The seed of the green list that follows (lefthash) / holds (selfhash) `window`."""
        window = window[-self.cfg.context_width :]
        if self.cfg.seeding_scheme == "selfhash":
            ids = torch.tensor(window, dtype=torch.int64)
            a = self.table[ids % TABLE_SIZE] + 1
            b = self.table[ids[-1] % TABLE_SIZE] + 1
            seed = int((self.cfg.hash_key * a * b).min())  # int64, wrapping as transformers'
        else:
            seed = self.cfg.hash_key * window[-1]
        return seed % (2**64 - 1)

    def _mask_of_seed(self, seed: int) -> torch.Tensor:
        self.rng.manual_seed(seed)
        green = torch.randperm(self.vocab_size, generator=self.rng)[: self.size]
        return torch.zeros(self.vocab_size, dtype=torch.bool).index_fill_(0, green, True)

    def mask(self, window: list[int]) -> torch.Tensor:
        """(V,) bool: the green tokens for `window`."""
        return self._mask(self.seed(window))

    def is_green(self, prefix: list[int], token: int) -> bool:
        """Was `token` green after `prefix`? (selfhash: prefix ends with the token itself.)"""
        return bool(self.mask(prefix)[token])

    def bias(self, logits: torch.Tensor, context: list[int]) -> torch.Tensor:
        """logits (V,) after `context` with delta added to the green tokens (a new tensor)."""
        if len(context) < self.cfg.context_width:
            return logits  # too short to seed: transformers skips such steps too
        if self.cfg.seeding_scheme == "lefthash":
            green = self.mask(context).to(logits.device)
            return torch.where(green, logits + self.cfg.delta, logits)
        out = logits.clone()
        candidates = logits.sort(descending=True).indices[:SELFHASH_CANDIDATES].tolist()
        for c in candidates:
            if self.is_green(context + [c], c):
                out[c] += self.cfg.delta
        return out


def score(
    ids: list[int],
    cfg: WatermarkConfig,
    vocab_size: int,
    bos_id: int | None = None,
    ignore_repeated_ngrams: bool = False,
    lists: GreenLists | None = None,
) -> dict:
    """Detection statistics of one token sequence (as transformers' WatermarkDetector: a
    leading bos_id is dropped; every (width + 1)-gram, or width-gram for selfhash, scores its
    last token; ignore_repeated_ngrams counts each distinct n-gram once)."""
    lists = lists or GreenLists(cfg, vocab_size)
    if bos_id is not None and ids and ids[0] == bos_id:
        ids = ids[1:]
    if len(ids) - cfg.context_width < 1:
        raise ValueError(
            f"a text of {len(ids)} tokens: the watermark needs more than context_width = "
            f"{cfg.context_width} tokens to score one"
        )
    selfhash = cfg.seeding_scheme == "selfhash"
    n = cfg.context_width + 1 - int(selfhash)
    counts = collections.Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    green = {g: lists.is_green(list(g) if selfhash else list(g[:-1]), g[-1]) for g in counts}
    if ignore_repeated_ngrams:
        scored, hits = len(counts), sum(green.values())
    else:
        scored, hits = sum(counts.values()), sum(c * green[g] for g, c in counts.items())
    z = (hits - cfg.gamma * scored) / math.sqrt(scored * cfg.gamma * (1 - cfg.gamma))
    return {"num_tokens_scored": scored, "num_green_tokens": hits,
            "green_fraction": hits / scored, "z_score": z, "p_value": 0.5 * math.erfc(z / math.sqrt(2))}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def read_texts(path: Path) -> list[str]:
    """A .jsonl file (one {"text": ...} per line) or a text file (one text per line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    texts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{i}: expected a JSON object with a \"text\" field") from None
        else:
            texts.append(line)
    return texts


def add_watermark_arguments(parser: argparse.ArgumentParser) -> None:
    d = WatermarkConfig()
    parser.add_argument("--gamma", type=float, default=d.gamma, help="green fraction (0.25)")
    parser.add_argument("--delta", type=float, default=d.delta, help="green logit bias (2.0)")
    parser.add_argument("--hash-key", type=int, default=d.hash_key)
    parser.add_argument("--seeding-scheme", choices=SCHEMES, default=d.seeding_scheme)
    parser.add_argument("--context-width", type=int, default=d.context_width)


def watermark_config(args: argparse.Namespace) -> WatermarkConfig:
    return WatermarkConfig(args.gamma, args.delta, args.hash_key, args.seeding_scheme, args.context_width)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference.watermark", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    det = sub.add_parser("detect", help="z-score and p-value of each text")
    add_run_arguments(det, out_help="write the scores as JSON to FILE (default: print only)")
    det.add_argument("--text", action="append", default=[], help="a text to score (repeatable)")
    det.add_argument("--file", metavar="FILE", type=Path,
                     help='.jsonl with a "text" field, or one text per line')
    det.add_argument("--z-threshold", type=float, default=4.0)
    det.add_argument("--ignore-repeated-ngrams", action="store_true")
    add_watermark_arguments(det)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.text and not args.file:
        parser.error("give --text or --file")
    parse_device(parser, args.device)  # checked; the green lists are hashed on the CPU anyway
    try:
        cfg = watermark_config(args)
        ckpt = find_checkpoint(args.run, args.step) if args.step is not None else resolve_checkpoint(args.run)
        job = load_job_config(ckpt)
        tokenizer = checkpoint_tokenizer(ckpt, job)
        texts = args.text + (read_texts(args.file) if args.file else [])
        lists = GreenLists(cfg, job.model.vocab_size)
        results = []
        for text in texts:
            r = score(tokenizer.encode(text), cfg, job.model.vocab_size, None,
                      args.ignore_repeated_ngrams, lists)  # fmt: skip
            r["watermarked"] = r["z_score"] > args.z_threshold
            results.append(r)
            print(f"z {r['z_score']:8.3f}  p {r['p_value']:.3e}  green {r['num_green_tokens']}/"
                  f"{r['num_tokens_scored']}  {'WATERMARKED' if r['watermarked'] else 'not watermarked'}")  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"python -m inference.watermark: {e}") from None
    if args.out:
        write_json(Path(args.out), {"config": asdict(cfg), "texts": results})
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
