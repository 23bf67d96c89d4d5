"""A draft without a model for speculative decoding: n-gram lookup in the sequence itself.

Prompt-lookup decoding (Saxena 2023; vLLM's "ngram" speculative method, transformers'
`prompt_lookup_num_tokens`): the draft for a sequence continues the latest earlier occurrence
of its last n tokens, trying n = max_n down to min_n. It costs no forward, so every accepted
token is a target step saved; where the text repeats (code, lists, quoted context, a small
model's loops) most proposals hold. Its proposals are certain (q is one-hot), which the
rejection rule of inference/sampling.py `accept` takes as it is: a draft x is kept with
probability p(x) and a rejection redraws from p without x, so sampled output stays exactly the
target's distribution, and greedy output is the target's greedy tokens.

    engine = Engine(model, tokenizer, draft=NgramDraft(), speculate_k=4)
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramDraft:
    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram draft: min_n = {min_n}, max_n = {max_n}: expected 1 <= min_n <= max_n")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """k tokens continuing the latest earlier match of the longest suffix that has one, or
        [] when no suffix of min_n tokens occurred before. A continuation that runs into the
        end of the sequence goes on copying the proposals themselves (a loop repeats)."""
        L = len(tokens)
        t = np.asarray(tokens)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            windows = sliding_window_view(t[:-1], n)  # (L - n, n): every n-gram but the suffix
            hits = np.flatnonzero((windows == t[L - n :]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n  # the token after the latest match (< L)
                out: list[int] = []
                for j in range(start, start + k):
                    out.append(tokens[j] if j < L else out[j - L])
                return out
        return []

    def __repr__(self) -> str:
        return f"NgramDraft(max_n={self.max_n}, min_n={self.min_n})"
