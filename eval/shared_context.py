"""Scoring the choices of an item from one forward of their shared context.

lm-evaluation-harness forwards context + choice once per choice, so a 10-shot item with four
choices runs its thousand-token context four times. Here the requests of one item (a *group*)
are scored together: the longest token prefix common to all their model inputs is forwarded
once (`prefill`, keeping the KV cache), the cache rows are copied to one per request
(`select`), and only each request's remainder is forwarded on top of it (`extend`). Groups are
pooled by prefix length, 2 x `batch_size` groups per prefill; a pool's requests are extended
`batch_size` at a time, sorted by the length of their remainder.

A group of at most PACK_WIDTH tokens in all (its prefix once, then each request's remainder: a
zero-shot item) needs no cache: groups are packed whole into rows of PACK_WIDTH tokens and
forwarded once, each remainder seeing its group's prefix and itself only, at the positions it
has alone (`packed`). Nothing is padded but the end of a row: on HellaSwag 0-shot (200 items,
SmolLM2, batch 16) 17.1k tokens are forwarded where prefill + extend forwards 19.7k (16.7k
real) and lm-eval 34.1k. Long groups (few-shot prompts) keep the cache path: a dense mask over
a long prefix would cost more attention than its causal prefill.

The scores are the ones lm-eval's `_loglikelihood_tokens` gives (eval/models.py's standard path):
the same tokens are predicted from the same tokens at the same positions, only in two forwards
instead of one (fp32 results agree to rounding). Requests whose input is longer than the
model's window are truncated per request in lm-eval, which no shared prefix can express: such
a group, a group of one request, and a group with no shared prefix go to the standard path.

Any model plugs in through `CachedLM` (eval/models.py: our Transformer and a Hugging Face causal
LM); greedy generation (eval/generation.py) decodes through the same four methods.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

TokenRequest = tuple[list[int], list[int]]  # (context tokens, continuation tokens)
# Tokens per packed row. Attention over a packed row is dense (W x W whatever the mask): on
# HellaSwag 0-shot with SmolLM2 (576 wide) that is 8% of the matmuls at 256 and 16% at 512, while
# rows of 256 hold all its items (about 80 tokens each) with 2% padding.
PACK_WIDTH = 256


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
    packed(tokens (R, W), positions (R, W), visible (R, W, W) bool) -> hidden (R, W, dim): one
      forward with no cache, token t of row r at positions[r, t] seeing the tokens u of its
      row with visible[r, t, u] (several sequences packed in one row); used when `packs`.
    """

    packs: bool  # packed() honours any mask (else every group takes the cache path)

    def prefill(self, tokens: torch.Tensor, extra: int) -> tuple[Any, torch.Tensor]: ...

    def select(self, cache: Any, rows: torch.Tensor, lengths: torch.Tensor) -> Any: ...

    def extend(self, state: Any, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def project(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def packed(self, tokens: torch.Tensor, positions: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor: ...


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
    width = min(PACK_WIDTH, max_seq_len) if getattr(lm, "packs", False) else 0
    fits = [_group_length(g, inputs) <= width for g in shared]
    packable = [g for g, f in zip(shared, fits) if f]
    shared = [g for g, f in zip(shared, fits) if not f]
    if packable:
        _score_packed(lm, packable, requests, inputs, results, batch_size, width, device)
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


def _group_length(group: tuple[list[int], int], inputs: list[list[int]]) -> int:
    """Tokens of a packed group: its prefix once, then each request's remainder."""
    idx, p = group
    return p + sum(len(inputs[i]) - p for i in idx)


def _pack(lengths: list[int], width: int) -> list[list[int]]:
    """Items of `lengths` (each <= width) into rows of `width`: best fit, longest first (a
    row's end is all that is padded). -> the items of each row."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for g in sorted(range(len(lengths)), key=lambda g: -lengths[g]):
        k = bisect.bisect_left(free, (lengths[g], -1))
        if k == len(free):
            rows.append([g])
            room, row = width - lengths[g], len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(g)
            room -= lengths[g]
        bisect.insort(free, (room, row))
    return rows


@torch.inference_mode()
def _score_packed(lm, groups, requests, inputs, results, batch_size, width, device) -> None:
    """Whole groups packed into rows of `width` tokens, `batch_size` rows per forward, no cache.

    Row layout: [prefix of group a][remainder 1 of a][remainder 2 of a]...[prefix of b]...[pad].
    A token sees the earlier tokens of its own segment and its group's prefix; a remainder's
    positions continue its prefix's (p, p + 1, ...), as if it followed the prefix alone. Pads
    (group -1) see only earlier pads: no row of the mask is empty, and no real token sees one.
    """
    lengths = [_group_length(g, inputs) for g in groups]
    rows = _pack(lengths, width)
    rows.sort(key=lambda r: -sum(lengths[g] for g in r))  # chunk widths fall: little padding
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        W = sum(lengths[g] for g in chunk[0])
        tokens = torch.zeros(len(chunk), W, dtype=torch.long)
        positions = torch.zeros(len(chunk), W, dtype=torch.long)
        group_of = torch.full((len(chunk), W), -1, dtype=torch.long)
        segment = torch.zeros(len(chunk), W, dtype=torch.long)  # 0: a prefix, k: remainder k
        rows_s, cols, target, owners = [], [], [], []
        for r, row in enumerate(chunk):
            o = 0
            for g in row:
                idx, p = groups[g]
                tokens[r, o : o + p] = torch.tensor(inputs[idx[0]][:p])
                positions[r, o : o + p] = torch.arange(p)
                group_of[r, o : o + p] = g
                o += p
                for k, i in enumerate(idx, start=1):
                    rest, n_cont = inputs[i][p:], len(requests[i][1])
                    span = slice(o, o + len(rest))
                    tokens[r, span] = torch.tensor(rest)
                    positions[r, span] = torch.arange(p, p + len(rest))
                    group_of[r, span], segment[r, span] = g, k
                    # input position t predicts token t + 1 (as in _score_pool)
                    rows_s += [len(owners)] * n_cont
                    cols_r = range(o + len(rest) - n_cont, o + len(rest))
                    cols += [(r, c) for c in cols_r]
                    target += requests[i][1]
                    owners.append(i)
                    o += len(rest)
        causal = torch.ones(W, W, dtype=torch.bool).tril()
        same_group = group_of[:, :, None] == group_of[:, None, :]
        seen_segment = (segment[:, None, :] == 0) | (segment[:, :, None] == segment[:, None, :])
        visible = causal & same_group & seen_segment  # (R, W, W)
        hidden = lm.packed(tokens.to(device), positions.to(device), visible.to(device))
        at = torch.tensor(cols, device=device)
        logits = lm.project(hidden[at[:, 0], at[:, 1]])  # (N, V)
        rows_t = torch.tensor(rows_s, device=device)
        scores = score_positions(logits, torch.tensor(target, device=device), rows_t, len(owners))
        for i, score in zip(owners, scores):
            results[i] = score


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
