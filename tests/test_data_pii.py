"""PII scrubbing: every type found in positives, look-alikes left alone, counts per type."""

from __future__ import annotations

import random

import pytest

from data.pii import PIIConfig, PIIScrubber, card_network_ok, find_pii, luhn_ok

POSITIVES = {
    "email": [
        "john.doe@gmail.com",
        "a_b+tag@mail.uni-heidelberg.de",
        "X.Y@sub.domain.co.uk",
    ],
    "ip_address": [
        "8.8.8.8",
        "93.184.216.34",
        "2001:4860:4860::8888",
        "2a00:1450:4001:82b::200e",
    ],
    "phone": [
        "415-555-0132",
        "(212) 555-0199",
        "+1 415 555 0132",
        "+44 20 7946 0958",
        "212.555.0199",
    ],
    "credit_card": [
        "4111 1111 1111 1111",  # Visa test number
        "5500-0000-0000-0004",  # Mastercard
        "378282246310005",  # Amex
        "6011111111111117",  # Discover
    ],
    "secret": [
        "AKIAQWERTYUIOPASDFGH",
        "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1234\nabcd==\n"
        "-----END RSA PRIVATE KEY-----",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
        "-----END OPENSSH PRIVATE KEY-----",
        "xoxb-123456789012-abcdefghijkl",
    ],
}

# Look-alikes that must come through unchanged (no PII type at all).
NEGATIVES = [
    "Python 3.11.2.1 was released",  # version number with a version word
    "__version__ = '1.2.3.4'",
    "requests>=2.31.0.1",
    "the OID 1.3.6.1.4.1.311 names Microsoft",  # more than four parts
    "HTML5 spec section 8.2.4.44 says so",
    "on 2023-10-12 at 12:30:45",  # date and time
    "12/31/2023",
    "sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709",  # hash
    "md5 d41d8cd98f00b204e9800998ecf8427e",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "ISBN 978-3-16-148410-0",  # ISBN-13
    "ISBN 0-306-40615-2",
    "doi:10.1000/182",  # DOI
    "4111 1111 1111 1112",  # fails Luhn
    "1234567890123456",  # fails Luhn and has no network prefix
    "big = 4294967296",
    "x = +4294967296",
    "a[1::2] and b[::3]",  # slices
    "mac 00:1a:2b:3c:4d:5e",  # MAC address
    "1,234,567,890 rows",
    "pi = 3.14159265358979",
    "@property\ndef x(self): ...",  # decorator
    "y = x@self.weight.T",  # matrix product
    "git log --since=2.weeks",
    "127.0.0.1 and 192.168.1.10",  # loopback / private: not PII (counted as kept)
    "fe80::1ff:fe23:4567:890a and 2001:db8::1",  # link-local / documentation range
    "mail user@example.com or admin@test",  # reserved example domains
    "AKIAIOSFODNN7EXAMPLE",  # AWS's documentation example key
    "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",  # public, not a secret
]


@pytest.mark.parametrize("kind", list(POSITIVES))
def test_each_type_found_and_replaced(kind):
    rng = random.Random()
    for value in POSITIVES[kind]:
        # Fresh surrounding text each run.
        before = " ".join(rng.choice(["see", "contact", "value:", "id", "here"]) for _ in range(3))
        text = f"{before} {value} and more text."
        spans = find_pii(text)
        assert [(text[s:e], k) for s, e, k in spans] == [(value, kind)], text
        counts: dict[str, int] = {}
        out = PIIScrubber()(text, None, counts)
        assert out == text.replace(value, f"<{kind.upper()}>"), out
        assert counts.get(kind) == 1


@pytest.mark.parametrize("text", NEGATIVES)
def test_lookalikes_left_alone(text):
    counts: dict[str, int] = {}
    assert PIIScrubber()(text, None, counts) == text
    assert not [k for k in counts if not k.startswith("kept.")], counts


def test_counts_equal_planted_in_one_document():
    rng = random.Random()
    planted = {kind: rng.randint(1, 3) for kind in POSITIVES}
    parts = []
    for kind, n in planted.items():
        parts += [rng.choice(POSITIVES[kind]) for _ in range(n)]
    parts += rng.sample(NEGATIVES[:20], 8)
    rng.shuffle(parts)
    text = "\n".join(f"line {i}: {p} ." for i, p in enumerate(parts))
    counts: dict[str, int] = {}
    out = PIIScrubber()(text, None, counts)
    assert {k: v for k, v in counts.items() if not k.startswith("kept.")} == planted
    for kind, n in planted.items():
        assert out.count(f"<{kind.upper()}>") == n


def test_types_switch_off_and_drop_above():
    text = "mail john.doe@gmail.com, dns 8.8.8.8"
    no_email = PIIScrubber(PIIConfig(email=False))(text, None, {})
    assert no_email == "mail john.doe@gmail.com, dns <IP_ADDRESS>"
    counts: dict[str, int] = {}
    assert PIIScrubber(PIIConfig(drop_above=1))(text, None, counts) is None
    assert counts["dropped_docs"] == 1


def test_luhn_and_networks():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert luhn_ok("79927398713")  # the classic Luhn example
    assert card_network_ok("378282246310005") and not card_network_ok("9781234567897")


def test_non_ascii_offsets():
    text = "Grüße an José — mail josé.x@gmail.com? no: jose.x@gmail.com, café 8.8.4.4"
    out = PIIScrubber()(text, None, {})
    assert out == "Grüße an José — mail <EMAIL>? no: <EMAIL>, café <IP_ADDRESS>"


def test_aws_secret_key_in_an_assignment():
    key = "".join(random.Random().choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij0123456789+/")
                  for _ in range(40))
    text = f'config:\n  aws_secret_access_key = "{key}"\n  region = "eu-west-1"\n'
    assert PIIScrubber()(text, None, {}) == text.replace(key, "<SECRET>")
    assert PIIScrubber()(f"checksum {key}", None, {}) == f"checksum {key}"  # no key name: kept
