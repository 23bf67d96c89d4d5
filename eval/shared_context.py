"""Scoring the choices of an item from one forward of their shared context.

lm-evaluation-harness forwards context + choice once per choice, so a 10-shot item with four
choices runs its thousand-token context four times. Here the requests of one item (a *group*)
are scored together: the longest token prefix common to all their model inputs is forwarded
once (`prefill`, keeping the KV cache), the cache rows are copied to one per request
(`select`), and only each request's remainder is forwarded on top of it (`extend`). Groups are
pooled by prefix length, 2 x `batch_size` groups per prefill; a pool's requests are extended
`batch_size` at a time, sorted by the length of their remainder.

The scores are the ones lm-eval's `_loglikelihood_tokens` gives (eval/models.py's standard path):
the same tokens are predicted from the same tokens at the same positions, only in two forwards
instead of one (fp32 results agree to rounding). Requests whose input is longer than the
model's window are truncated per request in lm-eval, which no shared prefix can express: such
a group, a group of one request, and a group with no shared prefix go to the standard path.

Any model plugs in through `CachedLM` (eval/models.py: our Transformer and a Hugging Face causal
LM); greedy generation (eval/generation.py) decodes through the same four methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

TokenRequest = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


class CachedLM(Protocol):
    """A causal LM that can continue from a KV cache, rows of different lengths in one batch.

    prefill(tokens (B, P), extra) -> (cache, hidden (B, P, dim)): tokens right-padded (pads
      are harmless: a causal model never lets a real position see a later pad); room is left
      for `extra` more tokens per row.
    select(cache, rows (R,), lengths (R,)) -> state: cache row rows[r] for output row r, of
      which only the first lengths[r] slots are real (the rest is padding no query may see);
      a copy: the prefill's cache serves several selections and is never changed.
    extend(state, tokens (R, S), positions (R, S)) -> hidden (R, S, dim): append the tokens at
      their absolute positions (RoPE) and return their hidden states.
    project(hidden (N, dim)) -> logits (N, V).
    """

    def prefill(self, tokens: torch.Tensor, extra: int) -> tuple[Any, torch.Tensor]: ...

    def select(self, cache: Any, rows: torch.Tensor, lengths: torch.Tensor) -> Any: ...

    def extend(self, state: Any, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def project(self, hidden: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def score_positions(
    logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, n_rows: int
) -> list[tuple[float, bool]]:
    """logits (N, V) predicting target (N,), position k belonging to request rows[k] ->
    per request (summed log-likelihood, every target token the argmax). One log_softmax and
    one device -> host copy for the whole block."""
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    picked = logprobs.gather(1, target[:, None]).squeeze(1).double()  # (N,)
    missed = (logprobs.argmax(-1) != target).double()  # (N,) 1 where not greedy
    zeros = torch.zeros(n_rows, dtype=torch.float64, device=logits.device)
    sums = zeros.index_add(0, rows, picked)
    misses = zeros.index_add(0, rows, missed)
    return [(ll, miss == 0) for ll, miss in zip(sums.tolist(), misses.tolist())]


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


def shared_context_loglikelihood(
    lm: CachedLM,
    requests: Sequence[TokenRequest],
    groups: Sequence[int],
    max_seq_len: int,
    batch_size: int,
    device: torch.device,
    fallback: Callable[[list[TokenRequest]], list[tuple[float, bool]]],
) -> list[tuple[float, bool]]:
    """(summed log-likelihood, greedy) per request, as lm-eval scores them; requests with the
    same `groups` id (one item's choices) share one forward of their common prefix.
    `fallback` scores the requests that cannot share (see the module docstring)."""
    if len(groups) != len(requests):
        raise ValueError(f"{len(groups)} group ids for {len(requests)} requests")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    # The model input of a request is (context + continuation)[:-1]: position t predicts t + 1.
    inputs = [list(ctx) + list(cont[:-1]) for ctx, cont in requests]
    shared: list[tuple[list[int], int]] = []  # (request indices, shared prefix length)
    alone: list[int] = []
    for idx in members.values():
        fits = all(len(inputs[i]) <= max_seq_len for i in idx)
        # The prefix ends before the first scored position (the last context token), so
        # every position whose logits are needed is in the extension.
        p = min(common_prefix_length([inputs[i] for i in idx]),
                min(len(requests[i][0]) - 1 for i in idx)) if len(idx) > 1 and fits else 0
        if p > 0:
            shared.append((idx, p))
        else:
            alone += idx
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    if alone:
        for i, r in zip(alone, fallback([requests[i] for i in alone])):
            results[i] = r
    # A pool of 2 x batch_size groups shares one prefill, their prefixes padded to the longest:
    # sorted by prefix length (longest first: an out-of-memory shows at once), the padding is
    # small. The pool's requests are then extended `batch_size` at a time, sorted by the
    # length of their remainder, so the choices of one item (often of very different lengths)
    # need not all be padded to its longest. HellaSwag 0-shot, 200 items on SmolLM2: 19.7k
    # tokens forwarded (16.7k without padding), against 26.3k when each batch held whole
    # items and 34.1k for lm-eval. The pool's cache (2 x batch_size rows of its longest
    # input) stays below the (batch_size, T, V) logits lm-eval's batch holds.
    pool = 2 * batch_size
    shared.sort(key=lambda g: (-g[1], -max(len(inputs[i]) for i in g[0])))
    for start in range(0, len(shared), pool):
        _score_pool(lm, shared[start : start + pool], requests, inputs, results, batch_size,
                    device)  # fmt: skip
    return results  # type: ignore[return-value]


@torch.inference_mode()
def _score_pool(lm, pool, requests, inputs, results, batch_size, device) -> None:
    """One prefill of the pool's prefixes (G, width), then its requests in chunks of
    `batch_size`, each from a copy of its groups' cache rows."""
    width = max(p for _, p in pool)
    # The cache holds the longest input (<= max_seq_len: longer groups went to the fallback).
    longest = max(len(inputs[i]) for idx, _ in pool for i in idx)
    prefix = torch.zeros(len(pool), width, dtype=torch.long)
    for g, (idx, p) in enumerate(pool):
        prefix[g, :p] = torch.tensor(inputs[idx[0]][:p])
    cache, _ = lm.prefill(prefix.to(device), longest - width)

    # (group row, request, prefix length), longest remainder first
    order = sorted(((g, i, p) for g, (idx, p) in enumerate(pool) for i in idx),
                   key=lambda r: -(len(inputs[r[1]]) - r[2]))  # fmt: skip
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        suffix_width = len(inputs[chunk[0][1]]) - chunk[0][2]
        suffix = torch.zeros(len(chunk), suffix_width, dtype=torch.long)
        positions = torch.zeros(len(chunk), suffix_width, dtype=torch.long)
        rows, cols, target = [], [], []
        for r, (_, i, p) in enumerate(chunk):
            rest = inputs[i][p:]
            # A row shorter than suffix_width is padded with copies of its last token at its
            # last position: a pad then writes the very keys and values that token writes, so
            # it can clobber no entry, even in a row that fills the whole cache.
            suffix[r] = rest[-1]
            suffix[r, : len(rest)] = torch.tensor(rest)
            positions[r] = p + len(rest) - 1
            positions[r, : len(rest)] = torch.arange(p, p + len(rest))
            cont = requests[i][1]
            # Input position t predicts token t + 1: the continuation's n tokens are predicted
            # by the last n input positions, i.e. suffix positions len(rest) - n .. len(rest) - 1.
            rows += [r] * len(cont)
            cols += range(len(rest) - len(cont), len(rest))
            target += cont
        group_rows = torch.tensor([g for g, _, _ in chunk], device=device)
        lengths = torch.tensor([p for _, _, p in chunk], device=device)
        state = lm.select(cache, group_rows, lengths)
        hidden = lm.extend(state, suffix.to(device), positions.to(device))  # (R, S, dim)
        rows_t = torch.tensor(rows, device=device)
        logits = lm.project(hidden[rows_t, torch.tensor(cols, device=device)])  # (N, V)
        scores = score_positions(logits, torch.tensor(target, device=device), rows_t, len(chunk))
        for (_, i, _), score in zip(chunk, scores):
            results[i] = score
