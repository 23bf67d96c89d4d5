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

    @property
    def key(self) -> tuple:
        """Sequences with equal keys share one batched `distributions` call."""
        p = self.params
        return (p.temperature, p.top_k, p.top_p, p.watermark)

    def uniform(self) -> float:
        return float(torch.rand((), dtype=torch.float64, generator=self.generator))


def distributions(sampler: Sampler, logits: torch.Tensor, contexts: list[list[int]]) -> torch.Tensor:
    """logits (N, V) of rows sharing `sampler.key`, contexts[i] the tokens before row i ->
    (N, V) fp32 probabilities (one-hot rows when greedy)."""
    p = sampler.params
    logits = logits.float()
    if p.temperature > 0:
        logits = filter_logits(logits / p.temperature, p.top_k, p.top_p)
    if sampler.green is not None:
        logits = torch.stack([sampler.green.bias(row, ctx) for row, ctx in zip(logits, contexts)])
    if p.temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return logits.softmax(-1)


def inverse_cdf(probs: torch.Tensor, u: list[float]) -> list[int]:
    """One id per row of probs (N, V) at uniforms u (N,): the first id whose cumulative mass
    exceeds u * total (ids of zero mass are never drawn; torch.multinomial costs ~1 ms per
    call on the CPU, this is one batched search)."""
    cdf = probs.double().cumsum(-1)
    target = torch.tensor(u, dtype=torch.float64, device=cdf.device)[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True)[:, 0]
    return ids.clamp(max=probs.shape[-1] - 1).tolist()


def accept(samplers: list[Sampler], p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor) -> list[list[int]]:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023) for N sequences: their
    draft proposed drafts (N, k) from q (N, k, V); the target's p (N, k + 1, V) at the same
    positions. Draft i is kept with probability min(1, p_i / q_i); the first rejected one is
    replaced by a draw from norm(max(0, p_i - q_i)) and ends the round; if all k are kept, one
    more comes from p_k. The tokens are distributed exactly as sampling from p one at a time."""
    N, k = drafts.shape
    rows, cols = torch.arange(N)[:, None], torch.arange(k)[None, :]
    ratio = (p[rows, cols, drafts] / q[rows, cols, drafts]).tolist()  # q > 0: drawn from q
    out, redraw, uniforms = [], [], []
    for n, sampler in enumerate(samplers):
        kept = 0
        while kept < k and sampler.uniform() < ratio[n][kept]:
            kept += 1
        out.append(drafts[n, :kept].tolist())
        if kept < k:
            residual = (p[n, kept] - q[n, kept]).clamp(min=0)
            redraw.append(residual if float(residual.sum()) > 0 else p[n, kept])
        else:
            redraw.append(p[n, k])
        uniforms.append(sampler.uniform())
    for tokens, t in zip(out, inverse_cdf(torch.stack(redraw), uniforms)):
        tokens.append(t)
    return out


_GREEN_CACHE: dict = {}


def _green_lists(cfg: WatermarkConfig, vocab_size: int) -> GreenLists:
    """One GreenLists per (config, vocabulary) for the process: its table and cache are shared."""
    key = (cfg, vocab_size)
    if key not in _GREEN_CACHE:
        _GREEN_CACHE[key] = GreenLists(cfg, vocab_size)
    return _GREEN_CACHE[key]
