"""A Hugging Face byte-level BPE `tokenizer.json` as tiktoken ranks and a split regex, when
tiktoken computes exactly what the `tokenizers` library computes (data/hf_tokenizer.py uses the
result, and runs `tokenizers` itself when this module says no).

    encoding = tiktoken_encoding(json.loads(text), name="SmolLM2", source="tokenizer.json")
    # or NotExact("...the reason...")

Both libraries split text into pieces with a regex and merge each piece's bytes pairwise. They
differ in which pair merges first: `tokenizers` merges the adjacent pair listed earliest in the
file's `merges`; tiktoken merges the adjacent pair whose concatenation has the lowest id, for
any pair whose concatenation is a token. `check_merges` states when the two agree on every
piece (and proves it); `split_pattern` reads the regex of the two pre-tokenizer shapes the
families use: GPT-2's (`ByteLevel` with its own regex: GPT-2, Pythia, SmolLM2) and Llama 3's
(`Split` with a regex, then `ByteLevel` without one: Llama 3, Qwen2, cl100k / o200k exports).
Anything else (another pre-tokenizer such as `Digits`, a `Split` that is not "isolated", BPE
dropout, sub-word prefixes...) is NotExact: the `tokenizers` library runs it as it is.
"""

from __future__ import annotations

import re

import regex  # tiktoken's own dependency; checks the split regex the way tiktoken's engine reads it
import tiktoken

from data.tokenizer import DEFAULT_PATTERN, bytes_to_unicode

# The regex of `ByteLevel(use_regex=True)` (tokenizers/src/pre_tokenizers/byte_level.rs).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""",
    r"""\s+""",
])
# Patterns known to match every character somewhere (each ends in a catch-all for whitespace and
# has one for letters, numbers and the rest); any other gets `_GAPS` (see tiktoken_pattern).
TOTAL_PATTERNS = {
    GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, CL100K_PATTERN, O200K_PATTERN, DEFAULT_PATTERN,
}


class NotExact(ValueError):
    """tiktoken would not reproduce this tokenizer.json exactly; the message says why."""


# ---------------------------------------------------------------------------------------------
# The split regex
# ---------------------------------------------------------------------------------------------


def split_pattern(pre: dict | None) -> str:
    """The Oniguruma regex that cuts text into pieces, for the two byte-level shapes."""
    if pre and pre.get("type") == "ByteLevel":
        _check_byte_level(pre, use_regex=True)
        return GPT2_PATTERN
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        split = steps[0]
        if str(split.get("behavior", "")).lower() != "isolated" or split.get("invert"):
            raise NotExact(f"Split behavior = {split.get('behavior')!r}, invert = "
                           f"{split.get('invert')}: tiktoken keeps each match as one piece")
        if "Regex" not in split.get("pattern", {}):
            raise NotExact(f"Split pattern {split.get('pattern')}: expected a Regex")
        _check_byte_level(steps[1], use_regex=False)
        return split["pattern"]["Regex"]
    kinds = [s.get("type") for s in steps] if steps else (pre or {}).get("type")
    raise NotExact(f"pre_tokenizer {kinds}: expected ByteLevel, or Split + ByteLevel")


def _check_byte_level(step: dict, use_regex: bool) -> None:
    if step.get("add_prefix_space"):
        raise NotExact("ByteLevel add_prefix_space = true: a space is put before each text")
    if step.get("use_regex", True) != use_regex:
        raise NotExact(f"ByteLevel use_regex = {step.get('use_regex', True)} after this split")


# An interval quantifier followed by "+": "one or more repetitions of the interval" in Oniguruma
# (which `tokenizers` uses), possessive in tiktoken's regex engine (fancy-regex). The atom is
# \p{..}, a [...] class, an escape or a plain character.
_INTERVAL_PLUS = re.compile(
    r"(\\[pP]\{[^}]*\}|\[(?:\\.|[^\]\\])*\]|\\.|[^\\\[\]()])(\{\d+(?:,\d*)?\})\+"
)
_ATOMIC_INTERVAL = re.compile(
    r"\(\?>(\\[pP]\{[^}]*\}|\[(?:\\.|[^\]\\])*\]|\\.|[^\\\[\]()])(\{\d+(?:,\d*)?\})\)"
)
# Text between two matches of the split regex: `tokenizers` keeps it as a piece of its own,
# tiktoken would drop it. The alternative takes the characters at which the regex finds no match.
_GAPS = "(?:{0})|(?:(?!(?:{0}))[\\s\\S])+"


def onig_pattern(pat_str: str) -> str:
    """tiktoken's split regex rewritten so Oniguruma matches the same pieces (its possessive
    intervals become atomic groups, which both engines read alike)."""
    return _INTERVAL_PLUS.sub(r"(?>\1\2)", pat_str)


def tiktoken_pattern(pattern: str) -> str:
    """An Oniguruma split regex (from a tokenizer.json) for tiktoken, matching the same pieces.

    Intervals followed by "+" are repeated groups, atomic intervals go back to tiktoken's
    possessive form (so a regex exported by `onig_pattern` comes back unchanged), and a pattern
    not known to match every character gets an alternative for the text between its matches.
    """
    if re.search(r"\{\d+(?:,\d*)?\}\+", _INTERVAL_PLUS.sub("", pattern)):
        raise NotExact(f"split regex {pattern!r}: an interval with '+' on a group")
    out = _ATOMIC_INTERVAL.sub(r"\1\2+", _INTERVAL_PLUS.sub(r"(?:\1\2)+", pattern))
    if out in TOTAL_PATTERNS:
        return out
    if re.search(r"(?<!\\)[$^](?![^\[]*\])", out):
        raise NotExact(f"split regex {pattern!r}: '^' / '$' are line anchors in Oniguruma")
    try:
        compiled = regex.compile(out)
    except regex.error as e:
        raise NotExact(f"split regex {pattern!r}: {e}") from None
    if compiled.search("") or any(m.start() == m.end() for m in compiled.finditer(_EMPTY_PROBE)):
        raise NotExact(f"split regex {pattern!r} matches the empty string")
    return _GAPS.format(out)


_EMPTY_PROBE = "Ab 12, x\n\t  y'z\r\n-- é 日本 🙂 "


# ---------------------------------------------------------------------------------------------
# Vocabulary and merges
# ---------------------------------------------------------------------------------------------


def byte_level_ranks(model: dict, added: set[str], source: str) -> dict[bytes, int]:
    """The BPE vocabulary (added tokens left out) as {token bytes: id}; ValueError when a token
    is not written in GPT-2's byte-to-character alphabet (not a byte-level BPE)."""
    if model.get("type") != "BPE":
        raise ValueError(f"{source}: model.type = {model.get('type')!r}: expected a byte-level 'BPE'")
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for text, token_id in model.get("vocab", {}).items():
        if text in added:
            continue
        try:
            ranks[bytes(char_byte[c] for c in text)] = token_id
        except KeyError:
            raise ValueError(
                f"{source}: vocab token {text!r} (id {token_id}) is not byte-level: only "
                "byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style) are supported"
            ) from None
    return ranks


def missing_bytes_pattern(ranks: dict[bytes, int]) -> str | None:
    """A regex class of the characters whose UTF-8 bytes include one with no single-byte token
    (SmolLM2 lacks a few control characters), or None when every byte has a token.

    `tokenizers` drops such a character after the split, so its neighbours may merge; tiktoken
    cannot (it would fail), so text holding one is encoded by `tokenizers` (data/hf_tokenizer.py).
    """
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if not missing:
        return None
    ranges = []
    for b in missing:
        if b < 0x80:
            ranges.append((b, b))
        elif b < 0xC2 or b > 0xF4:
            continue  # never in UTF-8 text (0xC0, 0xC1, 0xF5-0xFF)
        elif b <= 0xBF:
            raise NotExact(f"no token for the UTF-8 continuation byte {b:#x}")
        elif b <= 0xDF:  # lead byte of a 2-byte sequence: 5 payload bits
            ranges.append(((b & 0x1F) << 6, ((b & 0x1F) << 6) | 0x3F))
        elif b <= 0xEF:  # 3 bytes: 4 + 12 bits (E0 starts at U+0800)
            ranges.append((max((b & 0x0F) << 12, 0x800), ((b & 0x0F) << 12) | 0xFFF))
        else:  # 4 bytes: 3 + 18 bits (F0 starts at U+10000, F4 ends at U+10FFFF)
            lo = (b & 0x07) << 18
            ranges.append((max(lo, 0x10000), min(lo | 0x3FFFF, 0x10FFFF)))
    if not ranges:
        return None
    return "[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges) + "]"


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    pairs = []
    for m in model.get("merges", []):
        pair = tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        if len(pair) != 2:
            raise NotExact(f"merge {m!r}: expected two tokens")
        pairs.append(pair)
    return pairs


def _tiktoken_merge(piece: bytes, ranks: dict[bytes, int]) -> tuple[list[bytes], tuple | None]:
    """tiktoken's merge loop on `piece` without its whole-piece shortcut: (final parts, the
    last pair joined). Each step joins the adjacent pair whose concatenation has the lowest
    rank, the leftmost on ties (tiktoken's byte_pair_merge)."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    last = None
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best):
                best, at = rank, i
        if best is None:
            break
        last = (parts[at], parts[at + 1])
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts, last


def check_merges(
    ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]], ignore_merges: bool
) -> None:
    """NotExact unless tiktoken with `ranks` merges every piece as `tokenizers` does.

    `tokenizers` joins, at each step, the adjacent pair listed first in `merges` (the leftmost
    on ties); tiktoken joins the adjacent pair whose concatenation has the lowest rank, among
    all pairs whose concatenation is a token (the leftmost on ties). They agree when:

    (a) every merge's concatenation is a token, and the merged ids never decrease along `merges`;
    (b) for every token t, tiktoken's merge loop on t's own bytes ends in t by joining a pair
        (l, r) that `merges` lists.

    Why, by induction over tiktoken's steps on a piece: suppose two symbols a, b with a + b = t
    are adjacent. No merge so far crossed the borders of their span (t's bytes), so the merges
    inside it were those of the loop on t's bytes alone, in the same order: that loop reaches
    [a, b] and then joins them, so (a, b) = (l, r) by (b). So the only pairs of any token that
    ever meet are listed ones, one pair per token. tiktoken's step joins the pair of the lowest
    concatenated id; it is listed, and by (a) no listed pair present comes before it in
    `merges`; both libraries take its leftmost occurrence. So both make the same steps.

    (c) tiktoken emits a piece that is a token whole; `tokenizers` does so with `ignore_merges`,
    and otherwise merges it, which by the above ends in the token when (b)'s loop does.
    """
    listed = set(merges)
    last_id = -1
    if len(listed) != len(merges):  # `tokenizers` would rank such a pair by its last place
        raise NotExact("a merge is listed twice")
    for left, right in merges:
        token_id = ranks.get(left + right)
        if token_id is None:
            raise NotExact(f"merge {left!r} + {right!r}: the concatenation is not a token")
        if token_id < last_id:
            raise NotExact(f"merge {left!r} + {right!r} (id {token_id}) is listed after a "
                           f"merge to id {last_id}: merge order differs from id order")
        last_id = token_id
    for token, token_id in ranks.items():
        if len(token) < 2:
            continue
        parts, pair = _tiktoken_merge(token, ranks)
        if len(parts) != 1:
            if ignore_merges:
                continue  # emitted whole by both when a piece equals it, never built by merges
            raise NotExact(f"token {token!r} (id {token_id}) cannot be built by merges")
        if pair not in listed:
            raise NotExact(f"token {token!r} (id {token_id}): tiktoken joins {pair}, which the "
                           "file does not list as a merge")


# ---------------------------------------------------------------------------------------------
# The whole file
# ---------------------------------------------------------------------------------------------


def tiktoken_encoding(data: dict, name: str, source: str = "tokenizer.json") -> tiktoken.Encoding:
    """A tiktoken Encoding that encodes every text between added tokens exactly as the
    `tokenizers` model of `data` (the parsed tokenizer.json) does after its normalizer; the
    added tokens are its special tokens. NotExact says why when no such encoding exists."""
    model = data.get("model") or {}
    for key, ok in (("dropout", None), ("continuing_subword_prefix", ""),
                    ("end_of_word_suffix", ""), ("byte_fallback", False)):
        if model.get(key) not in (ok, None, 0.0 if key == "dropout" else ok):
            raise NotExact(f"model.{key} = {model.get(key)!r}")
    decoder = data.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise NotExact(f"decoder {decoder.get('type')!r}: expected ByteLevel")
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    ranks = byte_level_ranks(model, set(added), source)
    pattern = tiktoken_pattern(split_pattern(data.get("pre_tokenizer")))
    by_text = {text: token for token, text in _token_texts(ranks).items()}
    merges = []
    for left, right in _merge_pairs(model):
        if left in added or right in added or left + right in added:
            raise NotExact(f"merge {left!r} + {right!r} involves an added token")
        merges.append((by_text[left], by_text[right]))
    check_merges(ranks, merges, bool(model.get("ignore_merges", False)))
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)


def _token_texts(ranks: dict[bytes, int]) -> dict[bytes, str]:
    byte_char = bytes_to_unicode()
    return {token: "".join(byte_char[b] for b in token) for token in ranks}
