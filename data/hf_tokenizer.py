"""Convert a tiktoken encoding (ours or OpenAI's) to a Hugging Face `tokenizer.json`, and back;
and `HFTokenizer`, any `tokenizer.json` used directly behind our Tokenizer interface.

tiktoken splits text with a regex, then merges each piece's bytes pairwise, always merging the
adjacent pair whose concatenation has the lowest rank. A Hugging Face byte-level BPE does the same
when it is given:

- vocab: every token's bytes mapped through GPT-2's bytes-to-unicode table, id = rank;
- merges: for each token, every split into two tokens, ordered by the rank of the merged token
  (so "lowest merge index first" is "lowest merged rank first");
- a `Split` pre-tokenizer with the encoding's regex, then `ByteLevel` without its own regex;
- `ignore_merges=True`: a piece that is itself a token is emitted whole, as tiktoken does;
- the special tokens as added tokens at their tiktoken ids.

The result is checked by the tests by encoding real text both ways. The saved tokenizer puts the
end-of-text token first (as BOS) when special tokens are added, which is how our documents and
`python -m model.generate` prompts start; `add_special_tokens=False` gives tiktoken's ids alone.
One known difference: Hugging Face tokenizers turn special-token strings found in the text into
the special id, while `Tokenizer.encode` encodes them as ordinary text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import tiktoken

from common.atomic import write_json, write_text
from data.tokenizer import EOT, bytes_to_unicode

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def bpe_vocab_and_merges(
    ranks: dict[bytes, int],
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> (byte-level vocab {token string: id}, merges in priority order)."""
    byte_char = bytes_to_unicode()
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        # Without every single byte some text has no encoding (tiktoken would fail as well).
        raise ValueError(f"tokenizer ranks lack single-byte tokens for bytes {missing[:8]}...")

    def to_str(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []  # (merged rank, left rank, right rank, left, right)
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], to_str(left), to_str(right)))
    merges.sort()
    return vocab, [(left, right) for _, _, _, left, right in merges]


# An interval quantifier followed by "+": possessive in tiktoken's regex engine (fancy-regex), but
# "one or more repetitions of the interval" in Oniguruma, which `tokenizers` uses: cl100k_base's
# `\p{N}{1,3}+` would split "1939" as one piece instead of "193" + "9". An atomic group is the
# possessive form both engines agree on. The atom is \p{..}, a [...] class, an escape or a char.
_POSSESSIVE_INTERVAL = re.compile(
    r"(\\[pP]\{[^}]*\}|\[(?:\\.|[^\]\\])*\]|\\.|[^\\\[\]()])(\{\d+(?:,\d*)?\})\+"
)


_ATOMIC_INTERVAL = re.compile(
    r"\(\?>(\\[pP]\{[^}]*\}|\[(?:\\.|[^\]\\])*\]|\\.|[^\\\[\]()])(\{\d+(?:,\d*)?\})\)"
)


def onig_pattern(pat_str: str) -> str:
    """tiktoken's split regex rewritten so Oniguruma matches exactly the same pieces."""
    return _POSSESSIVE_INTERVAL.sub(r"(?>\1\2)", pat_str)


def tiktoken_pattern(pattern: str) -> str:
    """The inverse of `onig_pattern` (both forms work in tiktoken; this one keeps identities)."""
    return _ATOMIC_INTERVAL.sub(r"\1\2+", pattern)


def to_hf_tokenizer(encoding: tiktoken.Encoding, prepend_eot: bool = False):
    """A `tokenizers.Tokenizer` that encodes exactly like `encoding` (ordinary text).

    prepend_eot: put the end-of-text token in front of every encoded text (when special tokens
    are added), as a BOS: our documents follow an end-of-text token, and model.generate starts
    its prompts with one.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    vocab, merges = bpe_vocab_and_merges(encoding._mergeable_ranks)
    specials = encoding._special_tokens
    for text, token_id in specials.items():
        # Placed in the BPE vocab so that add_special_tokens keeps the tiktoken id (it would
        # otherwise append). No merge produces them, and the Split regex never yields them whole.
        vocab[text] = token_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(onig_pattern(encoding._pat_str)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in sorted(specials, key=specials.get)]
    )
    for text, token_id in specials.items():
        if tok.token_to_id(text) != token_id:
            got = tok.token_to_id(text)
            raise RuntimeError(f"special token {text!r} got id {got}, expected {token_id}")
    if prepend_eot:
        eot = (EOT, specials[EOT])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{EOT}:0 $A:0", pair=f"{EOT}:0 $A:0 {EOT}:1 $B:1", special_tokens=[eot]
        )
    return tok


def save_hf_tokenizer(
    encoding: tiktoken.Encoding, out_dir: str | Path, model_max_length: int
) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` (end-of-text as bos/eos/pad)."""
    out_dir = Path(out_dir)
    if EOT not in encoding._special_tokens:
        raise ValueError(f"tokenizer {encoding.name}: no {EOT} special token to use as eos")
    tok = to_hf_tokenizer(encoding, prepend_eot=True)
    specials = encoding._special_tokens
    config = {
        # The generic fast tokenizer: a model-specific class (LlamaTokenizerFast...) may rebuild
        # the pipeline its own way instead of reading tokenizer.json as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "add_bos_token": True,  # end-of-text first, as in training (transformers 5 reads this)
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decode must give back the exact text
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t, i in sorted(specials.items(), key=lambda kv: kv[1])
        },
    }
    write_text(out_dir / TOKENIZER_FILE, tok.to_str())
    write_json(out_dir / TOKENIZER_CONFIG_FILE, config, indent=2)


def from_hf_tokenizer(path: str | Path, name: str = "hf") -> tiktoken.Encoding:
    """A `tokenizer.json` (byte-level BPE as written by `save_hf_tokenizer`) -> tiktoken Encoding.

    Exact only when merge order agrees with id order (true for files converted from tiktoken,
    e.g. ours or Llama 3's); otherwise a ValueError says why, since tiktoken merges by id.
    """
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model.type = {model.get('type')!r}: expected 'BPE'")
    pat_str = _split_regex(data.get("pre_tokenizer"))
    if pat_str is None:
        raise ValueError(f"{path}: pre_tokenizer: expected a Split regex followed by ByteLevel")
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    ranks: dict[bytes, int] = {}
    for text, token_id in model["vocab"].items():
        if text in specials:
            continue
        try:
            ranks[bytes(char_byte[c] for c in text)] = token_id
        except KeyError as e:
            raise ValueError(f"{path}: vocab token {text!r} is not byte-level") from e
    vocab = {text: token_id for text, token_id in model["vocab"].items() if text not in specials}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    order = _merge_order(merges, vocab)
    if order != sorted(order):
        raise ValueError(
            f"{path}: merge order differs from token-id order; tiktoken cannot reproduce it"
        )
    pat_str = tiktoken_pattern(pat_str)
    return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)


class HFTokenizer:
    """Any Hugging Face `tokenizer.json` behind our Tokenizer interface (encode / decode /
    eot_id / n_vocab), e.g. to score an exported model with the tokenizer exported with it.
    Encodes without special tokens, as `Tokenizer.encode` does."""

    def __init__(self, path: str | Path, eot_token: str = EOT):
        from tokenizers import Tokenizer  # optional dependency ([hf] extra)

        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found (an exported model has a tokenizer.json)")
        self.tok = Tokenizer.from_file(str(file))
        self.name = file.parent.name
        self.n_vocab = self.tok.get_vocab_size(with_added_tokens=True)
        eot = self.tok.token_to_id(eot_token)
        if eot is None:
            raise ValueError(f"{file}: no {eot_token} token")
        self.eot_id = eot

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def _merge_order(merges: list[tuple[str, str]], vocab: dict[str, int]) -> list[int]:
    """Merged-token ids in the order of first appearance: what decides BPE's merge priority."""
    seen, order = set(), []
    for left, right in merges:
        token_id = vocab.get(left + right)
        if token_id is not None and token_id not in seen:
            seen.add(token_id)
            order.append(token_id)
    return order


def _split_regex(pre: dict | None) -> str | None:
    if not pre or pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers", [])
    if len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
        return None
    pattern = steps[0].get("pattern", {})
    return pattern.get("Regex")
