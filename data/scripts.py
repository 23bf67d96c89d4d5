"""The Unicode script a text is written in, and sampling weights that balance scripts (or
languages, or any other grouping) in the corpus a BPE is trained on.

    script_of("Привет, мир")        -> "Cyrillic"
    balance_weights(groups, sizes, alpha=0.3)   # per-text weights for train_bpe(weights=...)

Scripts come from the Unicode Character Database as fontTools ships it (`fontTools.unicodedata`,
installed with matplotlib): a text's script is the most frequent script among its characters,
not counting the Common and Inherited ones (digits, punctuation, combining marks).

Balancing is temperature sampling, as multilingual models sample their training languages
(XLM-R, mT5): a group holding n_g of the corpus's N bytes gets the share
q_g = n_g^alpha / sum_h n_h^alpha. alpha = 1 keeps the corpus as it is; alpha = 0 gives every
group the same share; in between trades the big group's compression (English, code) for the
small groups' (fairness). The weights keep the total number of bytes unchanged.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

from fontTools import unicodedata as ucd

COMMON = "Common"
# ISO 15924 codes of characters shared by many scripts (digits, punctuation, marks) and unknown.
_SHARED = {"Zyyy", "Zinh", "Zzzz"}


@functools.lru_cache(maxsize=65536)
def char_script(ch: str) -> str:
    """The ISO 15924 code of one character ("Latn", "Cyrl", "Zyyy" for Common...)."""
    return ucd.script(ch)


@functools.lru_cache(maxsize=512)
def script_name(code: str) -> str:
    return ucd.script_name(code).replace("_", " ")


def script_counts(text: str) -> Counter:
    """{script name: characters} of `text`, Common and Inherited characters left out."""
    counts: Counter = Counter()
    for ch, n in Counter(text).items():  # each distinct character looked up once
        code = char_script(ch)
        if code not in _SHARED:
            counts[script_name(code)] += n
    return counts


def script_of(text: str) -> str:
    """The script most of the text's letters are written in ("Common" when it has none)."""
    counts = script_counts(text)
    return counts.most_common(1)[0][0] if counts else COMMON


def balance_weights(groups: Sequence[str], sizes: Sequence[int], alpha: float) -> list[float]:
    """Per-text sampling weights giving each group the share n_g^alpha / sum_h n_h^alpha of the
    weighted bytes (n_g: the group's bytes), with the total unchanged.

    groups[i], sizes[i]: text i's group (its script, its language...) and its size in bytes.
    """
    if len(groups) != len(sizes):
        raise ValueError(f"{len(groups)} groups for {len(sizes)} sizes")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"balance alpha = {alpha}: expected a number in [0, 1]")
    totals: Counter = Counter()
    for group, size in zip(groups, sizes):
        totals[group] += size
    totals = Counter({g: n for g, n in totals.items() if n > 0})
    if not totals:
        return [0.0] * len(groups)
    corpus = sum(totals.values())
    norm = sum(n**alpha for n in totals.values())
    factor = {g: (n**alpha / norm) * corpus / n for g, n in totals.items()}
    return [factor.get(g, 0.0) for g in groups]


def group_shares(groups: Sequence[str], sizes: Sequence[int], weights: Sequence[float] | None = None) -> dict[str, float]:
    """{group: share of the (weighted) bytes}, largest first: what a balance does to a corpus."""
    totals: Counter = Counter()
    for i, (group, size) in enumerate(zip(groups, sizes)):
        totals[group] += size * (1.0 if weights is None else weights[i])
    corpus = sum(totals.values()) or 1.0
    return {g: n / corpus for g, n in totals.most_common()}
