"""Shared helpers for the tests/test_eval_*.py files: a small offline BPE tokenizer with the
data/tokenizer.py interface (encode / decode / eot_id) and tiny models."""

from __future__ import annotations

import collections
import functools
from pathlib import Path

import tiktoken
import torch

from model.config import model_config
from model.transformer import build_model

BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


class SmallTokenizer:
    """The data/tokenizer.py Tokenizer interface over a tiktoken Encoding built offline."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        self.name = enc.name
        self.eot_id = enc.eot_token
        self.n_vocab = enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))


def _train_ranks(text: str, merges: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes, then the most frequent adjacent pair, repeatedly,
    inside GPT-2 pre-tokens. tiktoken applies merges by rank, i.e. in this training order."""
    import regex

    ranks = {bytes([i]): i for i in range(256)}
    words = collections.Counter(regex.findall(GPT2_PATTERN, text))
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    for _ in range(merges):
        pairs: collections.Counter = collections.Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return ranks


@functools.lru_cache(maxsize=1)
def small_tokenizer() -> SmallTokenizer:
    """~380-token BPE trained on LAMBADA passages (merges like ' the', 'ing' exist, so
    tokenizing context and continuation together differs from tokenizing them apart)."""
    import json

    lines = (BENCHMARKS / "lambada" / "lambada_test.jsonl").read_text().splitlines()[:150]
    text = " ".join(json.loads(line)["text"] for line in lines)
    ranks = _train_ranks(text, merges=120)
    enc = tiktoken.Encoding(
        name="test-bpe",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )
    return SmallTokenizer(enc)


def tiny_model(vocab_size: int, seed: int = 0, max_seq_len: int = 512, **overrides):
    cfg = model_config(
        vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
        max_seq_len=max_seq_len, multiple_of=16, **overrides,
    )
    return build_model(cfg, "cpu", seed).eval()


def train_briefly(model, tokenizer: SmallTokenizer, texts: list[str], steps: int = 40) -> None:
    """A few AdamW steps of next-token prediction so the model's predictions are not flat."""
    ids = []
    for t in texts:
        ids += tokenizer.encode(t) + [tokenizer.eot_id]
    data = torch.tensor(ids)
    T = 64
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (8,), generator=gen)
        x = torch.stack([data[s : s + T] for s in starts])
        y = torch.stack([data[s + 1 : s + T + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
