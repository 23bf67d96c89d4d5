"""Text normalization: the `normalize` cleaning stage, and the word splitting + hashing that the
matching stages (near-dedup shingles, decontamination n-grams, eval's contamination check) share.

The `normalize` stage makes equal-looking text byte-equal before anything compares it:
Unicode NFC, CRLF / CR -> LF, a leading byte-order mark dropped, and control characters removed
(all of Unicode category Cc except \\n and \\t: C0, DEL and C1).

Word hashing works on UTF-8 bytes with numpy so that no Python code runs per word:
`match_bytes` lowercases ASCII and maps punctuation / digits with one `bytes.translate`, then
`word_spans` finds the words and `word_hashes` gives each one a 64-bit hash from prefix sums of
a polynomial hash. Only ASCII is case-folded and only ASCII punctuation is removed: every kept
byte then maps to one byte of the input (`match_offsets`), so a stage can cut a matched span
out of the original text. Non-ASCII letters keep their case.
"""

from __future__ import annotations

import re
import string
import unicodedata

import numpy as np

# ---------------------------------------------------------------------------------------------
# The normalize stage
# ---------------------------------------------------------------------------------------------

# Category Cc minus \t (0x09) and \n (0x0a). \r (0x0d) is turned into \n before this runs.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class Normalize:
    """Stage: NFC, line endings to LF, leading BOM dropped, control characters removed.

    Counts (documents affected, per type): "line_endings", "bom", "control_chars", "nfc".
    Never drops a document.
    """

    name = "normalize"

    def __call__(self, text: str, doc: object, counts: dict[str, int]) -> str | None:
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            counts["line_endings"] = counts.get("line_endings", 0) + 1
        if text.startswith("\ufeff"):
            text = text[1:]
            counts["bom"] = counts.get("bom", 0) + 1
        if _CONTROL_RE.search(text):
            text = _CONTROL_RE.sub("", text)
            counts["control_chars"] = counts.get("control_chars", 0) + 1
        # isascii() is O(1) in CPython; ASCII text is always NFC.
        if not text.isascii() and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
            counts["nfc"] = counts.get("nfc", 0) + 1
        return text


def normalize_text(text: str) -> str:
    """The `normalize` stage as a plain function (no counters)."""
    out = Normalize()(text, None, {})
    assert out is not None
    return out


# ---------------------------------------------------------------------------------------------
# Word splitting and hashing for matching
# ---------------------------------------------------------------------------------------------

_SPACE = ord(" ")


def _table(digits_to_zero: bool) -> bytes:
    """A 256-byte translate table: ASCII upper -> lower, ASCII whitespace -> space, and
    digits -> "0" if asked. Punctuation is removed by translate's `delete` argument."""
    tab = bytearray(range(256))
    for c in string.ascii_uppercase:
        tab[ord(c)] = ord(c.lower())
    for c in string.whitespace:
        tab[ord(c)] = _SPACE
    if digits_to_zero:
        for c in string.digits:
            tab[ord(c)] = ord("0")
    return bytes(tab)


_PUNCT = string.punctuation.encode()
_TABLE_PLAIN = _table(False)
_TABLE_DIGITS = _table(True)
_IS_PUNCT = np.zeros(256, bool)
_IS_PUNCT[list(_PUNCT)] = True


def match_bytes(text: str, digits_to_zero: bool = False) -> bytes:
    """Matching form of `text` as UTF-8 bytes: ASCII lowercased, ASCII punctuation deleted,
    ASCII whitespace turned into spaces, and digits mapped to "0" if asked (near-dedup does, as
    datatrove / FineWeb do; decontamination does not, as lm-evaluation-harness does not)."""
    table = _TABLE_DIGITS if digits_to_zero else _TABLE_PLAIN
    return text.encode("utf-8", "surrogatepass").translate(table, _PUNCT)


def match_offsets(text: str) -> np.ndarray:
    """For each byte of `match_bytes(text)`, its byte offset in text's UTF-8 -> int64 (len,)."""
    raw = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
    return np.flatnonzero(~_IS_PUNCT[raw])


def word_spans(buf: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start and end byte offsets (int64, each shape (W,)) of the space-separated words."""
    arr = np.frombuffer(buf, np.uint8)
    is_word = np.zeros(len(arr) + 2, bool)  # padded with a non-word on each side
    np.not_equal(arr, _SPACE, out=is_word[1:-1])
    # Changes of is_word alternate: a word starts, the word ends, the next one starts, ...
    edges = np.flatnonzero(is_word[1:] != is_word[:-1])
    return edges[0::2], edges[1::2]


# Polynomial hash base and its inverse modulo 2**64 (the base is odd, so the inverse exists).
_BASE = 0x100000001B3
_BASE_INV = pow(_BASE, -1, 1 << 64)
_POWERS: list[np.ndarray] = [np.ones(0, np.uint64), np.ones(0, np.uint64)]


_POWERS_KEPT = 1 << 21  # entries kept between calls (32 MB for both tables)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**k and BASE**-k mod 2**64 for k < n (at least; uint64 arithmetic wraps, which is the
    mod). Grown by doubling and kept up to _POWERS_KEPT entries, so long documents pay for it
    once per process; longer inputs get tables of their own, freed with them."""
    if len(_POWERS[0]) < n:
        size = 1 << max(16, (n - 1).bit_length())
        fwd = np.full(size, _BASE, np.uint64)
        inv = np.full(size, _BASE_INV, np.uint64)
        fwd[0] = inv[0] = 1
        tables = [np.cumprod(fwd), np.cumprod(inv)]
        if size > _POWERS_KEPT:
            return tables[0], tables[1]
        _POWERS[:] = tables
    return _POWERS[0], _POWERS[1]


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64: spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def word_hashes(buf: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """64-bit hash of each word buf[starts[i]:ends[i]] -> uint64 (W,); equal words, equal hashes.

    prefix[k] = sum_{j<k} byte[j] * BASE**j, so a word's polynomial hash is
    (prefix[e] - prefix[s]) * BASE**-s; the length is mixed in so that zero bytes count.
    """
    if len(starts) == 0:
        return np.zeros(0, np.uint64)
    arr = np.frombuffer(buf, np.uint8)
    fwd, inv = _powers(len(arr) + 1)
    prefix = np.zeros(len(arr) + 1, np.uint64)
    np.cumsum(arr.astype(np.uint64) * fwd[: len(arr)], out=prefix[1:])
    poly = (prefix[ends] - prefix[starts]) * inv[starts]
    return mix64(poly + (ends - starts).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def combine_ngrams(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every run of n consecutive word hashes -> uint64 (W-n+1,), or (0,) if W < n.

    The same prefix-sum trick as `word_hashes`, over words: a few passes whatever n is.
    """
    count = len(hashes) - n + 1
    if count <= 0 or n <= 0:
        return np.zeros(0, np.uint64)
    fwd, inv = _powers(len(hashes) + 1)
    prefix = np.zeros(len(hashes) + 1, np.uint64)
    np.cumsum(hashes * fwd[: len(hashes)], out=prefix[1:])
    poly = (prefix[n:] - prefix[:count]) * inv[:count]  # sum_k hashes[i+k] * BASE**k
    return mix64(poly + np.uint64(n))


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes (uint64, in text order, with repeats) of the word n-grams of `text`.

    Words as in lm-evaluation-harness's decontamination: lowercased, ASCII punctuation
    removed, split on whitespace. Shared by the decontaminate stage and eval's contamination
    check, so both sides of a comparison hash the same way. Fewer than n words -> empty array.
    """
    buf = match_bytes(text)
    starts, ends = word_spans(buf)
    return combine_ngrams(word_hashes(buf, starts, ends), n)


def word_count(text: str) -> int:
    """Number of words as `ngram_hashes` splits them."""
    return len(word_spans(match_bytes(text))[0])
