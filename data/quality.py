"""Quality heuristics: the `quality` stage.

Two rule sets, because prose rules drop all code (code has few stop words and no terminal
punctuation) and code rules pass junk prose:
- "prose": Gopher (Rae et al. 2021) document rules plus C4-style line rules, thresholds as in
  the papers: word count, mean word length, symbol-to-word ratio, bullet and ellipsis lines,
  words with a letter, stop words, duplicate lines / paragraphs, most frequent 2-4-gram,
  duplicated 5-10-grams, lines ending in punctuation, sentences, "lorem ipsum".
- "code": size, longest line (minified or data blobs), mean line length, letter fraction
  (tables of numbers), duplicate lines, and an auto-generated-file header.
Profile "auto" picks "code" for source files with a code extension and "prose" otherwise.

Each rule is switchable (`disable = ["stop_words", ...]`) and each threshold is a field of
`CodeRules` / `ProseRules`. A dropped document is counted under the first rule it fails, so the
per-rule counts add up to the stage's "removed".
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from data.normalize import combine_ngrams, match_bytes, word_hashes, word_spans


@dataclass
class CodeRules:
    """Thresholds of the code profile ([data.quality.code])."""

    min_chars: int = 20  # non-whitespace characters; empty __init__.py files carry nothing
    max_chars: int = 1_000_000
    max_line_length: int = 1000  # longest line, in characters
    max_mean_line_length: float = 100.0  # mean over non-blank lines
    min_alpha_fraction: float = 0.25  # letters / characters (number tables fall below)
    max_dup_line_fraction: float = 0.8  # repeated non-blank lines (tests repeat a lot)


@dataclass
class ProseRules:
    """Thresholds of the prose profile ([data.quality.prose]); Gopher / C4 values."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # ("#" + "..." + "…") / words
    max_bullet_lines: float = 0.9  # fraction of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # fraction of lines ending with an ellipsis
    min_alpha_words: float = 0.8  # fraction of words with a letter
    min_stop_words: int = 2  # of: the, be, to, of, and, that, have, with
    max_dup_line_fraction: float = 0.3
    max_dup_line_char_fraction: float = 0.2
    max_dup_para_fraction: float = 0.3
    max_dup_para_char_fraction: float = 0.2
    # Most frequent n-gram's share of the characters, n = 2, 3, 4.
    max_top_ngram_char_fraction: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    # Share of characters inside n-grams that occur more than once, n = 5 .. 10.
    max_dup_ngram_char_fraction: list[float] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10]
    )
    min_punct_line_fraction: float = 0.12  # lines ending in . ! ? " (FineWeb's C4-style value)
    min_sentences: int = 3


PROFILES = ("code", "prose", "auto")
CODE_EXTENSIONS = frozenset(
    ".py .pyi .pyx .c .h .cc .cpp .hpp .cu .cuh .rs .go .java .kt .scala .js .jsx .ts .tsx .rb "
    ".php .sh .bash .pl .lua .r .jl .swift .m .cs .sql .toml .yaml .yml .cfg .ini .mk .cmake "
    ".s .asm .f90 .hs .ml .ex .exs .erl .clj .dart .vue .zig .nim .v .sv .vhd".split()
)


@dataclass
class QualityConfig:
    """Settings of the quality stage ([data.quality])."""

    profile: str = "auto"  # "code", "prose", or "auto" (by the source's file extension)
    disable: list[str] = field(default_factory=list)  # rule names to switch off
    code: CodeRules = field(default_factory=CodeRules)
    prose: ProseRules = field(default_factory=ProseRules)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"quality.profile must be one of {PROFILES}, got {self.profile!r}")
        known = set(CODE_RULES) | set(PROSE_RULES)
        unknown = sorted(set(self.disable) - known)
        if unknown:
            raise ValueError(f"quality.disable: unknown rules {unknown}; known: {sorted(known)}")
        for name, n in (("max_top_ngram_char_fraction", 3), ("max_dup_ngram_char_fraction", 6)):
            if len(getattr(self.prose, name)) != n:
                raise ValueError(f"quality.prose.{name} needs {n} values")


# ---------------------------------------------------------------------------------------------
# Code rules: each (CodeDoc, rules) -> True if the document passes
# ---------------------------------------------------------------------------------------------

# Bytes that are not letters: everything but A-Z, a-z and the first byte of a non-ASCII
# character (0xC0-0xFF; every non-ASCII character counts as a letter: fast and close).
_NOT_LETTER = bytes(
    b for b in range(256) if not (65 <= b <= 90 or 97 <= b <= 122 or b >= 0xC0)
)
_AUTOGEN_RE = re.compile(
    r"auto-?generated|automatically generated|do not edit|"
    r"generated (?:from|by|with) ['\"`]?[\w./-]+\.(?:py|txt|c|h|json|xml|proto|in)\b",
    re.IGNORECASE,
)


def _letter_fraction(text: str) -> float:
    """Letters / characters (see _NOT_LETTER)."""
    letters = len(text.encode("utf-8", "surrogatepass").translate(None, _NOT_LETTER))
    return letters / max(len(text), 1)


class CodeDoc:
    """Pieces of one document that several code rules share, computed once (C-level calls)."""

    def __init__(self, text: str):
        self.text = text
        self.lines = text.split("\n")
        self.lengths = list(map(len, self.lines))
        self.stripped = list(map(str.strip, self.lines))
        self.blank = self.stripped.count("")


def _code_rules() -> dict[str, Callable[[CodeDoc, CodeRules], bool]]:
    def min_chars(d, r):
        return len(d.text) - sum(map(d.text.count, " \n\t")) >= r.min_chars

    def max_chars(d, r):
        return len(d.text) <= r.max_chars

    def max_line_length(d, r):
        return max(d.lengths, default=0) <= r.max_line_length

    def mean_line_length(d, r):
        nonblank = len(d.lines) - d.blank
        return not nonblank or sum(d.lengths) / nonblank <= r.max_mean_line_length

    def alpha_fraction(d, r):
        return _letter_fraction(d.text) >= r.min_alpha_fraction

    def dup_lines(d, r):
        nonblank = len(d.lines) - d.blank
        if not nonblank:
            return True
        distinct = len(set(d.stripped)) - (d.blank > 0)
        return 1 - distinct / nonblank <= r.max_dup_line_fraction

    def autogenerated(d, r):
        head = d.text[:1000].lower()  # substring pre-check: the regex is slow per position
        if "generated" not in head and "do not edit" not in head:
            return True
        return _AUTOGEN_RE.search(head) is None

    return {f.__name__: f for f in (min_chars, max_chars, autogenerated, max_line_length,
                                    mean_line_length, alpha_fraction, dup_lines)}


CODE_RULES = _code_rules()

# ---------------------------------------------------------------------------------------------
# Prose rules: each (ProseDoc, rules) -> True if the document passes
# ---------------------------------------------------------------------------------------------

_STOP_WORDS = frozenset("the be to of and that have with".split())
_BULLETS = ("•", "-", "*", "‣", "◦", "⁃", "·", "▪", "●")
_LETTER_WORD_RE = re.compile(r"\S*[^\W\d_]\S*")
_SENTENCE_END_RE = re.compile(r"[.!?]+(?:[\"')\]]*)(?:\s|$)")
_PARA_RE = re.compile(r"\n\s*\n")


class ProseDoc:
    """Pieces of one document that several prose rules share, computed once."""

    def __init__(self, text: str):
        self.text = text
        self.words = text.split()
        self.lines = [s for s in (line.strip() for line in text.split("\n")) if s]
        buf = match_bytes(text)
        starts, ends = word_spans(buf)
        self.word_lens = (ends - starts).astype(np.int64)  # (W,) for the n-gram rules
        self.word_hashes = word_hashes(buf, starts, ends)


def _dup_fractions(items: list[str]) -> tuple[float, float]:
    """(duplicate items / items, characters in duplicate items / characters)."""
    seen: set[str] = set()
    dup = dup_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            dup += 1
            dup_chars += len(item)
        seen.add(item)
    return dup / max(len(items), 1), dup_chars / max(total_chars, 1)


def _ngram_char_fractions(doc: ProseDoc, n: int) -> tuple[float, float]:
    """(most frequent n-gram's character share, share of characters in repeated n-grams)."""
    grams = combine_ngrams(doc.word_hashes, n)  # (G,) with G = W - n + 1
    total = int(doc.word_lens.sum())
    if len(grams) == 0 or total == 0:
        return 0.0, 0.0
    _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
    # Character length of every n-gram: windowed sum of word lengths.
    csum = np.concatenate([[0], np.cumsum(doc.word_lens)])
    gram_chars = csum[n:] - csum[:-n]
    top = int(np.argmax(counts))
    top_frac = 0.0
    if counts[top] > 1:
        first = int(np.argmax(inverse == top))
        top_frac = counts[top] * gram_chars[first] / total
    # Words covered by any repeated n-gram, counted once (difference array over word indices).
    starts = np.flatnonzero(counts[inverse] > 1)
    cover = np.zeros(len(doc.word_lens) + 1, np.int64)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    covered = np.cumsum(cover[:-1]) > 0
    return top_frac, float(doc.word_lens[covered].sum()) / total


def _prose_rules() -> dict[str, Callable[[ProseDoc, ProseRules], bool]]:
    def word_count(d, r):
        return r.min_words <= len(d.words) <= r.max_words

    def mean_word_length(d, r):
        mean = sum(map(len, d.words)) / max(len(d.words), 1)
        return r.min_mean_word_length <= mean <= r.max_mean_word_length

    def symbol_ratio(d, r):
        symbols = d.text.count("#") + d.text.count("...") + d.text.count("…")
        return symbols / max(len(d.words), 1) <= r.max_symbol_word_ratio

    def bullet_lines(d, r):
        bullets = sum(line.startswith(_BULLETS) for line in d.lines)
        return bullets / max(len(d.lines), 1) <= r.max_bullet_lines

    def ellipsis_lines(d, r):
        ell = sum(line.endswith(("...", "…")) for line in d.lines)
        return ell / max(len(d.lines), 1) <= r.max_ellipsis_lines

    def alpha_words(d, r):
        return len(_LETTER_WORD_RE.findall(d.text)) / max(len(d.words), 1) >= r.min_alpha_words

    def stop_words(d, r):
        found = 0
        for word in d.words:
            found += word.lower().strip(".,;:!?\"'()") in _STOP_WORDS
            if found >= r.min_stop_words:
                return True
        return found >= r.min_stop_words

    def dup_lines(d, r):
        frac, char_frac = _dup_fractions(d.lines)
        return frac <= r.max_dup_line_fraction and char_frac <= r.max_dup_line_char_fraction

    def dup_paragraphs(d, r):
        paras = [p.strip() for p in _PARA_RE.split(d.text) if p.strip()]
        frac, char_frac = _dup_fractions(paras)
        return frac <= r.max_dup_para_fraction and char_frac <= r.max_dup_para_char_fraction

    def top_ngrams(d, r):
        return all(
            _ngram_char_fractions(d, n)[0] <= limit
            for n, limit in zip((2, 3, 4), r.max_top_ngram_char_fraction)
        )

    def dup_ngrams(d, r):
        return all(
            _ngram_char_fractions(d, n)[1] <= limit
            for n, limit in zip(range(5, 11), r.max_dup_ngram_char_fraction)
        )

    def punct_lines(d, r):
        ends = sum(line.endswith((".", "!", "?", '"', "'", "”")) for line in d.lines)
        return ends / max(len(d.lines), 1) >= r.min_punct_line_fraction

    def sentences(d, r):
        return len(_SENTENCE_END_RE.findall(d.text)) >= r.min_sentences

    def lorem_ipsum(d, r):
        return "lorem ipsum" not in d.text.lower()

    return {f.__name__: f for f in (word_count, mean_word_length, symbol_ratio, bullet_lines,
                                    ellipsis_lines, alpha_words, stop_words, dup_lines,
                                    dup_paragraphs, top_ngrams, dup_ngrams, punct_lines,
                                    sentences, lorem_ipsum)}


PROSE_RULES = _prose_rules()


class QualityFilter:
    """Stage: drop documents failing a rule of their profile; counts "<profile>.<rule>"."""

    name = "quality"

    def __init__(self, cfg: QualityConfig | None = None):
        self.cfg = cfg or QualityConfig()
        off = set(self.cfg.disable)
        # Rule names only: the stage is pickled to worker processes, the functions are looked
        # up in the module's tables.
        self.code_rules = [n for n in CODE_RULES if n not in off]
        self.prose_rules = [n for n in PROSE_RULES if n not in off]

    def profile_of(self, doc: object) -> str:
        if self.cfg.profile != "auto":
            return self.cfg.profile
        source = str(getattr(doc, "source", "") or "")
        return "code" if os.path.splitext(source)[1].lower() in CODE_EXTENSIONS else "prose"

    def failed_rule(self, text: str, profile: str) -> str | None:
        """Name of the first rule `text` fails under `profile`, or None if it passes."""
        if profile == "code":
            code = CodeDoc(text)
            for name in self.code_rules:
                if not CODE_RULES[name](code, self.cfg.code):
                    return name
            return None
        doc = ProseDoc(text)
        for name in self.prose_rules:
            if not PROSE_RULES[name](doc, self.cfg.prose):
                return name
        return None

    def __call__(self, text: str, doc: object, counts: dict[str, int]) -> str | None:
        profile = self.profile_of(doc)
        failed = self.failed_rule(text, profile)
        if failed is None:
            return text
        key = f"{profile}.{failed}"
        counts[key] = counts.get(key, 0) + 1
        return None
