"""PII scrubbing: the `pii` stage.

Finds e-mail addresses, IP addresses (v4 and v6), phone numbers, payment-card numbers and
secrets, and replaces each by a typed placeholder: <EMAIL>, <IP_ADDRESS>, <PHONE>,
<CREDIT_CARD>, <SECRET>. Counts per type; optionally drops a document with too many hits
(Dolma drops above 5; off by default because code files list their authors' addresses).

What is deliberately left alone (each counted under "kept.<type>"):
- e-mail addresses at reserved example domains (RFC 2606 / 6761: example.com/.org/.net,
  *.example, *.test, *.invalid, *.localhost): documentation, not people.
- IP addresses that are not globally routable: private, loopback, link-local, multicast,
  reserved and documentation ranges (10/8, 127/8, 192.168/16, 192.0.2/24, 2001:db8::/32, ::1,
  ...). They identify no one; like datatrove, only public addresses are replaced.
- AWS example keys (AKIA...EXAMPLE, as in AWS's documentation).
Look-alikes that must not match: version numbers (3.11.2.1 after "version", "v", "Python",
"==", ...; 1.2.3.4.5), OIDs, dates, times, hashes, UUIDs, ISBNs, DOIs, slices (a[1::2]),
numbers failing the Luhn check or without a card-network prefix. A bare four-part version
number with no such word before it cannot be told from an IPv4 address and is replaced.
Python matrix products written without spaces look like addresses; `x@self.w` / `x@cls.w` are
skipped, `a@b.weight` is not.

Speed: Python's `re` is slow on patterns that start with a character class (~10 MB/s), fast on
patterns that start with a literal (~400 MB/s). So each detector has a literal-led anchor
pattern (searched in the text, or in its UTF-8 bytes with every digit mapped to "0"), and the
full pattern + validation runs only in a small window around each anchor hit.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE>",
    "credit_card": "<CREDIT_CARD>",
    "secret": "<SECRET>",
}


@dataclass
class PIIConfig:
    """Settings of the pii stage ([data.pii])."""

    email: bool = True
    ip_address: bool = True
    phone: bool = True
    credit_card: bool = True
    secret: bool = True
    drop_above: int = 0  # drop a document with more than this many replacements (0: never)

    def enabled(self) -> list[str]:
        return [t for t in PLACEHOLDERS if getattr(self, t)]


Span = tuple[int, int, str]  # (start, end, type) in characters of the text

# ---------------------------------------------------------------------------------------------
# Validators
# ---------------------------------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of payment-card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_network_ok(digits: str) -> bool:
    """Issuer prefix and length of the major networks (Visa, Mastercard, Amex, Discover, JCB,
    Diners, UnionPay, Maestro)."""
    n = len(digits)
    p2, p4, p6 = int(digits[:2]), int(digits[:4]), int(digits[:6])
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # Amex
    if p4 == 6011 or 644 <= int(digits[:3]) <= 649 or p2 == 65 or 622126 <= p6 <= 622925:
        return 16 <= n <= 19  # Discover
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19  # JCB
    if p2 in (36, 38, 39) or 300 <= int(digits[:3]) <= 305:
        return 14 <= n <= 19  # Diners
    if p2 == 62:
        return 16 <= n <= 19  # UnionPay
    return False  # Maestro's wide ranges (50, 56-69) are left out: too many look-alikes


_RESERVED_EMAIL_DOMAIN = re.compile(
    r"(?:^|\.)(?:example\.(?:com|org|net)|example|test|invalid|localhost)$", re.IGNORECASE
)


def _public_ip(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return addr.is_global and not (addr.is_multicast or addr.is_reserved)


# Words that make a dotted number a version / section number rather than an address, when they
# come just before it: "Python 3.11.2.1", __version__ = "1.2.3.4", "sections 8.2.4.44".
_VERSION_BEFORE = re.compile(
    r"(?:(?:(?:version|release|\bver|\brev(?:ision)?|\bbuild|python|\bpatch|\bupdate|\bupgrade|"
    r"section|\bspec|\brfc|chapter)\w*\.?|\bv|§)\s*[:=]?|[=<>~!]=)\s*[\"'(\[]?\s*$",
    re.IGNORECASE,
)

# ---------------------------------------------------------------------------------------------
# Detectors: each (text, digit_view) -> spans
# ---------------------------------------------------------------------------------------------

_TOKEN_TAIL = re.compile(r"[\w.:+()-]*")


def _window(text: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) clamped, with the end moved past any token it cuts (so that a lookahead at
    the window's end never mistakes a cut number for a whole one)."""
    start = max(0, start)
    end = min(len(text), end)
    return start, _TOKEN_TAIL.match(text, end).end()


def _search_windows(
    text: str, anchors: Iterator[int], pattern: re.Pattern, back: int, ahead: int
) -> Iterator[re.Match]:
    """Matches of `pattern` in windows around anchor positions, each match once."""
    seen: set[tuple[int, int]] = set()
    for pos in anchors:
        start, end = _window(text, pos - back, pos + ahead)
        for m in pattern.finditer(text, start, end):
            if m.span() not in seen:
                seen.add(m.span())
                yield m


class _DigitView:
    """Anchor search in the text's UTF-8 bytes with every digit mapped to "0", so that anchor
    patterns like b"0000" start with a literal; byte offsets mapped back to characters."""

    _TABLE = bytes(48 if 48 <= i < 58 else i for i in range(256))

    def __init__(self, text: str):
        self.raw = text.encode("utf-8", "surrogatepass")
        self.view = self.raw.translate(self._TABLE)
        self.ascii = text.isascii()
        self._char_of: np.ndarray | None = None

    def char_offset(self, byte_offset: int) -> int:
        if self.ascii:
            return byte_offset
        if self._char_of is None:
            raw = np.frombuffer(self.raw, np.uint8)
            # Character index of each byte: count of non-continuation bytes before it.
            self._char_of = np.cumsum((raw & 0xC0) != 0x80) - 1
        return int(self._char_of[byte_offset])

    def find(self, anchor: re.Pattern) -> Iterator[int]:
        for m in anchor.finditer(self.view):
            yield self.char_offset(m.start())


# --- e-mail: anchored on "@" -------------------------------------------------------------------
_EMAIL_DOMAIN = re.compile(r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24})"
                           r"(?![\w-]|\.\w)")
# The local part may hold non-ASCII letters (RFC 6531), hence \w.
_EMAIL_LOCAL = re.compile(r"(?<![\w.%+-])\w[\w.%+-]{0,63}\Z")


def _find_emails(text: str, digits: _DigitView, kept: dict[str, int]) -> Iterator[Span]:
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        local = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
        if local is None or text[at - 1] == "." or m.group(1).startswith(("self.", "cls.")):
            continue
        if _RESERVED_EMAIL_DOMAIN.search(m.group(1)):
            kept["email"] = kept.get("email", 0) + 1
            continue
        yield local.start(), m.end(), "email"


# --- IPv4: anchored on ".d.d" after the first octet; IPv6 on ":h:" or "::" ---------------------
_IPV4_ANCHOR = re.compile(rb"0\.0{1,3}\.0{1,3}\.0")  # in the digit view: "d.d.d.d" as "0.0.0.0"
_IPV4 = re.compile(r"(?<![\w.-])(?:\d{1,3}\.){3}\d{1,3}(?![\w-]|\.\d)")
_IPV6_ANCHOR = re.compile(r":[0-9A-Fa-f]{1,4}:|::")
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)[0-9A-Fa-f:]{3,39}(?![\w:]|\.\w)")


def _find_ips(text: str, digits: _DigitView, kept: dict[str, int]) -> Iterator[Span]:
    for m in _search_windows(text, digits.find(_IPV4_ANCHOR), _IPV4, 3, 18):
        try:
            addr = ipaddress.IPv4Address(m.group())
        except ValueError:  # octet above 255 or with a leading zero: not an address
            continue
        if _VERSION_BEFORE.search(text, max(0, m.start() - 24), m.start()):
            continue  # a version number
        if not _public_ip(addr):
            kept["ip_address"] = kept.get("ip_address", 0) + 1
            continue
        yield m.start(), m.end(), "ip_address"
    anchors = (m.start() for m in _IPV6_ANCHOR.finditer(text))
    for m in _search_windows(text, anchors, _IPV6, 40, 40):
        groups = [g for g in m.group().split(":") if g]
        if len(groups) < 3:  # slices (a[1::2]), times, "::": too few groups to be an address
            continue
        try:
            addr6 = ipaddress.IPv6Address(m.group())
        except ValueError:
            continue
        if not _public_ip(addr6):
            kept["ip_address"] = kept.get("ip_address", 0) + 1
            continue
        yield m.start(), m.end(), "ip_address"


# --- phone numbers: NANP (555-123-4567, (555) 123-4567) and international (+44 20 7946 0958) ---
_NANP_ANCHOR = re.compile(rb"00[.-]0000")
_INTL_ANCHOR = re.compile(rb"\+0")
_NANP = re.compile(
    r"(?<![\w.+-])(?:\+?1[ .-]?)?(?:\([2-9]\d\d\) ?|[2-9]\d\d([.-]))[2-9]\d\d[.-]\d{4}"
    r"(?![\w-]|\.\d)"
)
# International: "+", country code, then groups split by spaces / dashes / parentheses (at least
# one split: "+4294967296" in code is a number, not a phone).
_INTL = re.compile(
    r"(?<![\w+])\+[1-9]\d{0,2}(?:[ -]?\(?\d{1,4}\)?){2,6}(?![\w-]|[.,]\d)"
)


def _find_phones(text: str, digits: _DigitView, kept: dict[str, int]) -> Iterator[Span]:
    for m in _search_windows(text, digits.find(_NANP_ANCHOR), _NANP, 14, 12):
        sep = m.group(1)
        if sep and text[m.end() - 5] != sep:
            continue  # 555-123.4567: mixed separators, not a phone number
        yield m.start(), m.end(), "phone"
    for m in _search_windows(text, digits.find(_INTL_ANCHOR), _INTL, 0, 48):
        n_digits = sum(ch.isdigit() for ch in m.group())
        if 8 <= n_digits <= 15 and any(ch in " -(" for ch in m.group()):
            yield m.start(), m.end(), "phone"


# --- payment cards: 13-19 digits, plain or in groups of 4 (Amex 4-6-5), Luhn + network -------
_CARD_ANCHOR = re.compile(rb"0000[ -]?0000")
_CARD = re.compile(
    r"(?<![\w.-])(?:\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{5}|\d{13,19})"
    r"(?![\w-]|\.\d)"
)


def _find_cards(text: str, digits: _DigitView, kept: dict[str, int]) -> Iterator[Span]:
    for m in _search_windows(text, digits.find(_CARD_ANCHOR), _CARD, 20, 24):
        number = re.sub(r"[ -]", "", m.group())
        if 13 <= len(number) <= 19 and card_network_ok(number) and luhn_ok(number):
            yield m.start(), m.end(), "credit_card"


# --- secrets -----------------------------------------------------------------------------------
_PRIVATE_KEY = re.compile(
    r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----"
    r"(?:.*?-----END \1-----|(?:\n[A-Za-z0-9+/=:, -]*)*)",
    re.DOTALL,
)
# Token formats, matched where _SECRET_ANCHOR finds one of their prefixes.
_SECRET_TOKENS = re.compile(
    r"A[KS]IA[0-9A-Z]{16}(?![0-9A-Za-z])"  # AWS access key id
    r"|AIza[0-9A-Za-z_-]{35}(?![\w-])"  # Google API key
    r"|gh[pousr]_[A-Za-z0-9]{36,255}(?!\w)"  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{82}(?!\w)"
    r"|xox[abprs]-[A-Za-z0-9-]{10,100}(?![\w-])"  # Slack
)
# The token formats' prefixes in one pattern: `re` scans for their first characters in C.
_SECRET_ANCHOR = re.compile(r"AKIA|ASIA|AIza|gh[pousr]_|github_pat_|xox")


_AWS_SECRET = re.compile(
    r"(?i:aws_?secret_?(?:access_?)?key)[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+=]{40})(?![\w/+=])"
)


def _find_secrets(text: str, digits: _DigitView, kept: dict[str, int]) -> Iterator[Span]:
    if "-----BEGIN " in text:
        for m in _PRIVATE_KEY.finditer(text):
            yield m.start(), m.end(), "secret"
    for anchor in _SECRET_ANCHOR.finditer(text):
        pos = anchor.start()
        m = _SECRET_TOKENS.match(text, pos)
        if m is None:
            continue
        before = text[pos - 1 : pos]
        if before.isalnum() or before == "_":
            continue  # inside a longer word
        if "EXAMPLE" in m.group():
            kept["secret"] = kept.get("secret", 0) + 1
            continue
        yield m.start(), m.end(), "secret"
    # _AWS_SECRET starts case-insensitively (slow to scan for): search only around "ecret"/"ECRET".
    for literal in ("ecret", "ECRET"):
        pos = text.find(literal)
        while pos != -1:
            m = _AWS_SECRET.search(text, max(0, pos - 12), pos + 80)
            if m is not None:
                yield m.start(1), m.end(1), "secret"
            pos = text.find(literal, pos + 1)


# Priority when spans overlap: earlier wins.
DETECTORS: dict[str, Callable[[str, _DigitView, dict[str, int]], Iterator[Span]]] = {
    "secret": _find_secrets,
    "email": _find_emails,
    "credit_card": _find_cards,
    "ip_address": _find_ips,
    "phone": _find_phones,
}


def find_pii(
    text: str, types: list[str] | None = None, kept: dict[str, int] | None = None
) -> list[Span]:
    """Non-overlapping PII spans in `text`, sorted; `kept` collects the look-alikes left alone."""
    kept = kept if kept is not None else {}
    digits = _DigitView(text)
    spans: list[Span] = []
    for kind, detect in DETECTORS.items():
        if types is None or kind in types:
            spans.extend(detect(text, digits, kept))
    # Highest priority first, then leftmost; keep a span only if it overlaps nothing kept.
    order = {kind: i for i, kind in enumerate(DETECTORS)}
    spans.sort(key=lambda s: (order[s[2]], s[0]))
    taken: list[Span] = []
    for span in spans:
        if all(span[1] <= t[0] or span[0] >= t[1] for t in taken):
            taken.append(span)
    return sorted(taken)


def scrub(text: str, spans: list[Span]) -> str:
    """`text` with each span replaced by its type's placeholder."""
    out, pos = [], 0
    for start, end, kind in spans:
        out.append(text[pos:start])
        out.append(PLACEHOLDERS[kind])
        pos = end
    out.append(text[pos:])
    return "".join(out)


class PIIScrubber:
    """Stage: replace PII by typed placeholders; counts per type and "kept.<type>"."""

    name = "pii"

    def __init__(self, cfg: PIIConfig | None = None):
        self.cfg = cfg or PIIConfig()
        self.types = self.cfg.enabled()

    def __call__(self, text: str, doc: object, counts: dict[str, int]) -> str | None:
        kept: dict[str, int] = {}
        spans = find_pii(text, self.types, kept)
        for kind, n in kept.items():
            counts[f"kept.{kind}"] = counts.get(f"kept.{kind}", 0) + n
        if not spans:
            return text
        for _, _, kind in spans:
            counts[kind] = counts.get(kind, 0) + 1
        if self.cfg.drop_above and len(spans) > self.cfg.drop_above:
            counts["dropped_docs"] = counts.get("dropped_docs", 0) + 1
            return None
        return scrub(text, spans)
