"""What one sequence samples from: its parameters, the next-token distribution they make of the
logits, and the speculative-decoding acceptance rule that keeps that distribution exact.

Order of the processing, as transformers applies it: temperature, top-k, top-p
(model.generate.filter_logits), then the watermark's green-list bias; temperature 0 is greedy
(the argmax of the processed logits, as a one-hot distribution so the speculative rule needs no
special case).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference.watermark import GreenLists, WatermarkConfig
from model.generate import filter_logits


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()  # ids that end the sequence (kept in its ids, not its text)
    stop_strings: tuple[str, ...] = ()  # texts that end it (cut from the text)
    seed: int | None = None  # None: a fresh random seed
    watermark: WatermarkConfig | None = None

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1"),
            (self.temperature >= 0, "temperature", ">= 0 (0 is greedy)"),
            (self.top_k >= 0, "top_k", ">= 0 (0 is off)"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r}: expected {expected}")
        self.stop_tokens = tuple(self.stop_tokens)
        self.stop_strings = tuple(s for s in self.stop_strings if s)


@dataclass
class Sampler:
    """Per-sequence sampling state: the parameters, a private generator, the green lists."""

    params: SamplingParams
    vocab_size: int
    generator: torch.Generator = field(init=False)
    green: GreenLists | None = field(init=False)

    def __post_init__(self):
        self.generator = torch.Generator()
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)
        wm = self.params.watermark
        self.green = None if wm is None else _green_lists(wm, self.vocab_size)

    def distribution(self, logits: torch.Tensor, contexts: list[list[int]]) -> torch.Tensor:
        """logits (P, V) at P positions, contexts[i] the tokens before position i -> (P, V)
        fp32 probabilities (one-hot when greedy)."""
        p = self.params
        logits = logits.float()
        if p.temperature > 0:
            logits = filter_logits(logits / p.temperature, p.top_k, p.top_p)
        if self.green is not None:
            logits = torch.stack([self.green.bias(row, ctx) for row, ctx in zip(logits, contexts)])
        if p.temperature == 0:
            return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return logits.softmax(-1)

    def sample(self, probs: torch.Tensor) -> int:
        """One id from probs (V,)."""
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

    def accept(self, p: torch.Tensor, q: torch.Tensor, drafts: list[int]) -> list[int]:
        """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): the draft proposed
        `drafts` (k ids) from q (k, V); the target's p (k + 1, V) at the same positions. Draft i
        is kept with probability min(1, p_i / q_i); the first rejected one is replaced by a draw
        from norm(max(0, p - q)) and ends the round; if all k are kept, one more comes from
        p_k. The tokens returned are distributed exactly as sampling from p one by one."""
        p, q = p.cpu(), q.cpu()
        out: list[int] = []
        for i, d in enumerate(drafts):
            u = float(torch.rand((), generator=self.generator))
            if u < float(p[i, d]) / float(q[i, d]):  # q[i, d] > 0: d was drawn from q
                out.append(d)
                continue
            residual = (p[i] - q[i]).clamp(min=0)
            total = float(residual.sum())
            out.append(self.sample(residual / total if total > 0 else p[i]))
            return out
        out.append(self.sample(p[len(drafts)]))
        return out


_GREEN_CACHE: dict = {}


def _green_lists(cfg: WatermarkConfig, vocab_size: int) -> GreenLists:
    """One GreenLists per (config, vocabulary) for the process: its table and cache are shared."""
    key = (cfg, vocab_size)
    if key not in _GREEN_CACHE:
        _GREEN_CACHE[key] = GreenLists(cfg, vocab_size)
    return _GREEN_CACHE[key]
