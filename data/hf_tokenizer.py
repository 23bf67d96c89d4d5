"""Hugging Face tokenizers, both ways: our tiktoken encodings written as a `tokenizer.json`
(export), and a Hugging Face tokenizer directory behind our Tokenizer interface (`HFTokenizer`,
`load_tokenizer("hf:DIR")`: an imported model's, for data.prepare, generate, eval and export).

Export. tiktoken splits text with a regex, then merges each piece's bytes pairwise, always
merging the adjacent pair whose concatenation has the lowest rank. A Hugging Face byte-level BPE
does the same when it is given:

- vocab: every token's bytes mapped through GPT-2's bytes-to-unicode table, id = rank;
- merges: for each token, every split into two tokens, ordered by the rank of the merged token
  (so "lowest merge index first" is "lowest merged rank first");
- a `Split` pre-tokenizer with the encoding's regex, then `ByteLevel` without its own regex;
- `ignore_merges=True`: a piece that is itself a token is emitted whole, as tiktoken does;
- the special tokens as added tokens at their tiktoken ids.

The saved tokenizer puts the end-of-text token first (as BOS) when special tokens are added,
which is how our documents and `python -m model.generate` prompts start.

Import (`HFTokenizer`). The rule for special-token strings inside text is transformers': each
added token's string becomes its id (our own tokenizers keep such text as text, see
data/tokenizer.py). Ids equal AutoTokenizer's for the directory's files; data/hf_bpe.py decides
whether tiktoken can compute them exactly (then it does, faster) or `tokenizers` runs them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import tiktoken

from common.atomic import write_bytes, write_json, write_text
from common.errors import FileFormatError, read_json
from data.hf_bpe import (
    NotExact,
    byte_level_ranks,
    missing_bytes_pattern,
    onig_pattern,
    tiktoken_encoding,
)
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


# ---------------------------------------------------------------------------------------------
# A Hugging Face tokenizer directory behind our Tokenizer interface
# ---------------------------------------------------------------------------------------------

# Files that make up a tokenizer (and its generation defaults); copied with an imported run.
TOKENIZER_FILES = (
    TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)
# Pretraining documents end with these (GPT-2 / SmolLM2 / Qwen2, Llama 3), even when the chat
# models' eos_token is another (<|im_end|>, <|eot_id|>).
DOCUMENT_END = ("<|endoftext|>", "<|end_of_text|>")
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
# Text that exercises the split regex, merges, added tokens and decoding: the converted
# tokenizer must encode it exactly as `tokenizers` does, or it is not used.
PROBE = "\n".join([
    "Hello, world! It's 2024: DON'T SHOUT, we'll've 3.14159 and 1234567890 ⁴²½ ٣٤.",
    "Größe naïve café déjà-vu «ok» 東京は日本の首都です 한국어 Привет мир Ελληνικά עברית العربية हिन्दी",
    "Emoji 🙂🚀👩‍👩‍👧‍👦 🇫🇷 ∀x∈ℝ: x²≥0; e\u0301 a\u0308 \u00a0\u2003\u200b\u3000\u2028\u0085",
    "\x1c\x1d\x1e\x1f\x0b\x0c tabs\t\tend \r\n\r\n  \n    indented():\n\treturn {'a': [1, 2]}   ",
    "<|endoftext|><|im_start|>user\n<|im_end|> <s></s>[INST]<|begin_of_text|>x<|eot_id|>",
])


class HFTokenizer:
    """A Hugging Face tokenizer directory (tokenizer.json; tokenizer_config.json, chat template
    and generation_config.json when present) with our Tokenizer interface; its ids are
    transformers' `AutoTokenizer` ids for the same files.

    Encoding follows `tokenizer.encode(text, add_special_tokens=False)`: every added token's
    string in the text (special or not, e.g. "<|im_start|>") becomes its id, as Hugging Face
    does unless tokenizer_config.json says `split_special_tokens`. `bos_ids` are the ids
    `add_special_tokens=True` puts first (Llama 3's <|begin_of_text|>; none for SmolLM2), and
    the end-of-text token is the document end (DOCUMENT_END, else the config's eos_token).

    The work is done by tiktoken when data/hf_bpe.py shows it exact for this file (GPT-2 and
    Llama 3 shaped files usually are; `backend` says which), otherwise by `tokenizers` itself.
    Decoding gives the exact text back (as `decode(ids)` with clean_up_tokenization_spaces off).
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        self.path = path.parent if path.name == TOKENIZER_FILE else path
        self.source = f"hf:{self.path}"
        file = self.path / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: an hf: tokenizer is a directory holding "
                                    "tokenizer.json (and tokenizer_config.json)")
        self.file_bytes = file.read_bytes()
        self.config = _read_json(self.path / TOKENIZER_CONFIG_FILE)
        self.generation_config = _read_json(self.path / "generation_config.json")
        self.special_token_strings = _special_token_strings(self.config, self.path)
        try:
            self.hf = RustTokenizer.from_str(self.file_bytes.decode("utf-8"))
        except Exception as e:  # the Rust library's own error names no file
            raise FileFormatError(file, "a tokenizer.json the tokenizers library reads",
                                  str(e)[:200]) from None
        self.hf.no_truncation()  # transformers truncates / pads only when a call asks
        self.hf.no_padding()
        self._as_transformers_loads()
        self.split_special = bool(self.config.get("split_special_tokens", False))
        self.hf.encode_special_tokens = self.split_special

        added = self.hf.get_added_tokens_decoder()  # {id: AddedToken}
        self.added_tokens = {t.content: i for i, t in added.items()}
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        data = json.loads(self.hf.to_str())
        self.mergeable_ranks = byte_level_ranks(data["model"], set(self.added_tokens), str(file))
        self.n_vocab = 1 + max([*self.mergeable_ranks.values(), *self.added_tokens.values()])
        where = self.path.resolve()  # an imported run's <run>/tokenizer is named by its run
        self.name = where.parent.name if where.name == "tokenizer" else where.name
        self.eot_id = self._document_end(file)
        self.bos_ids, self.eos_ids = self._special_ids_around()
        self.chat_template = _chat_template(self.path, self.config)

        self.encoding = None
        self.backend, self.not_tiktoken = "tokenizers", ""
        try:
            self._use_tiktoken(data, added, str(file))
            self.backend = "tiktoken"
        except NotExact as e:
            self.encoding, self.not_tiktoken = None, str(e)

    # --- the Tokenizer interface ------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self.encoding is None:
            return self.hf.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for piece in self._pieces(text):
            if isinstance(piece, int):
                ids.append(piece)
            elif self._odd(piece):
                ids.extend(self._encode_with_tokenizers(piece))
            else:
                ids.extend(self.encoding.encode_ordinary(piece))
        return ids

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        if self.encoding is None:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        pieces = [self._pieces(t) for t in texts]
        plain = [p for ps in pieces for p in ps if isinstance(p, str) and not self._odd(p)]
        encoded = iter(self.encoding.encode_ordinary_batch(plain, num_threads=num_threads))
        out = []
        for ps in pieces:
            ids: list[int] = []
            for p in ps:
                if isinstance(p, int):
                    ids.append(p)
                elif self._odd(p):
                    ids.extend(self._encode_with_tokenizers(p))
                else:
                    ids.extend(next(encoded))
            out.append(ids)
        return out

    def decode(self, ids) -> str:
        ids = list(ids)
        if self.encoding is not None and self._plain_added:
            return self.encoding.decode_bytes(ids).decode("utf-8", errors="replace")
        return self.hf.decode(ids, skip_special_tokens=False)

    def identity(self) -> dict:
        """What makes two tokenizers the same: the tokenizer.json bytes and what we read from
        tokenizer_config.json (added tokens, templates, the document end)."""
        digest = hashlib.sha256(self.file_bytes)
        digest.update(json.dumps([sorted(self.added_tokens.items()), self.eot_id, self.bos_ids,
                                  self.eos_ids, self.split_special]).encode())
        return {"name": self.name, "n_vocab": self.n_vocab, "eot_id": self.eot_id,
                "sha256": digest.hexdigest(), "kind": "hf"}

    def save(self, out_dir: str | Path) -> None:
        """Copy the tokenizer's files (as they are) into `out_dir`, each written atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                write_bytes(out_dir / name, (self.path / name).read_bytes())

    # --- internals ---------------------------------------------------------------------------

    def _as_transformers_loads(self) -> None:
        """What transformers adds on loading: added_tokens_decoder entries and named special
        tokens missing from tokenizer.json (appended at new ids), and the BOS / EOS template
        when tokenizer_config.json sets add_bos_token / add_eos_token."""
        from tokenizers import AddedToken

        have = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        extra = []
        for _, entry in sorted(self.config.get("added_tokens_decoder", {}).items(),
                               key=lambda kv: int(kv[0])):
            if entry["content"] not in have:
                flags = {k: entry[k] for k in ("lstrip", "rstrip", "normalized", "single_word",
                                               "special") if k in entry}
                extra.append(AddedToken(entry["content"], **flags))
                have.add(entry["content"])
        for text in self.special_token_strings.values():
            if text not in have:
                extra.append(AddedToken(text, special=True))
                have.add(text)
        if extra:
            self.hf.add_tokens(extra)
        if "add_bos_token" in self.config or "add_eos_token" in self.config:
            self._template(self.config.get("add_bos_token"), self.config.get("add_eos_token"))

    def _use_tiktoken(self, data: dict, added: dict, source: str) -> None:
        """Encode with tiktoken, or NotExact: the conditions of data/hf_bpe.py, added tokens
        that tiktoken's splitting here can match, and the probe text encoded alike."""
        if self.split_special:
            raise NotExact("split_special_tokens = true")
        odd = [t.content for t in added.values() if t.lstrip or t.rstrip or t.single_word]
        if odd:
            raise NotExact(f"added tokens {odd[:3]} strip spaces or match single words")
        self._set_tiktoken(tiktoken_encoding(data, self.name, source), added)
        for line in PROBE.splitlines(keepends=True):
            if self.encode(line) != self.hf.encode(line, add_special_tokens=False).ids:
                raise NotExact(f"tiktoken encodes {line[:40]!r} differently")

    def _set_tiktoken(self, encoding: tiktoken.Encoding, added: dict) -> None:
        """Split added tokens as `tokenizers` does (AddedVocabulary): first the ones matched on
        the raw text, then the normalizer on the text between them, then the ones matched on
        normalized text; each time the leftmost, longest match."""
        norm = self.hf.normalizer
        self._normalize = norm.normalize_str if norm is not None else None
        raw = [t.content for t in added.values() if not t.normalized and not
               (self.split_special and t.special)]
        normalized = [t.content for t in added.values() if t.normalized and not
                      (self.split_special and t.special)]
        if self._normalize is not None:
            normalized = [self._normalize(t) for t in normalized]
        self._raw_re, self._norm_re = _alternation(raw), _alternation(normalized)
        self._norm_ids = {(self._normalize(t.content) if self._normalize and t.normalized
                           else t.content): i for i, t in added.items()}
        char_byte = {c: b for b, c in bytes_to_unicode().items()}
        # `tokenizers` decodes an added token through the ByteLevel map when every character
        # of it is in the map; tiktoken gives its UTF-8 bytes. Plain ASCII tokens agree.
        self._plain_added = all(
            not all(c in char_byte for c in t) or bytes(char_byte[c] for c in t) == t.encode()
            for t in self.added_tokens
        )
        missing = missing_bytes_pattern(self.mergeable_ranks)
        self._missing_re = re.compile(missing) if missing else None
        self.encoding = encoding

    def _odd(self, piece: str) -> bool:
        """Holds a character with a byte the vocabulary has no token for."""
        return self._missing_re is not None and self._missing_re.search(piece) is not None

    def _encode_with_tokenizers(self, normalized: str) -> list[int]:
        """Text between added tokens, already normalized, through `tokenizers`' own split and
        BPE model (it drops the bytes with no token before merging)."""
        pieces = self.hf.pre_tokenizer.pre_tokenize_str(normalized)
        return [t.id for piece, _ in pieces for t in self.hf.model.tokenize(piece)]

    def _pieces(self, text: str) -> list[str | int]:
        """`text` as added-token ids and the (normalized) text between them."""
        out: list[str | int] = []
        for part in _split(text, self._raw_re, self.added_tokens):
            if isinstance(part, int):
                out.append(part)
                continue
            if self._normalize is not None:
                part = self._normalize(part)
            out.extend(p for p in _split(part, self._norm_re, self._norm_ids) if p != "")
        return out

    def _template(self, add_bos: bool | None, add_eos: bool | None) -> None:
        """transformers' update_post_processor: [bos] $A [eos] from the config's flags."""
        from tokenizers import processors

        bos, eos = (self.special_token_strings.get(k) for k in ("bos_token", "eos_token"))
        add_bos, add_eos = bool(add_bos and bos), bool(add_eos and eos)
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = (f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1"
                f"{' ' + eos + ':1' if add_eos else ''}")
        specials = [(t, self.hf.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self.hf.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )

    def _special_ids_around(self) -> tuple[list[int], list[int]]:
        """(ids before, ids after) the text when special tokens are added (the post-processor)."""
        probe = "a"
        core = self.hf.encode(probe, add_special_tokens=False).ids
        full = self.hf.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(core) + 1):
            if full[start : start + len(core)] == core:
                return full[:start], full[start + len(core) :]
        raise ValueError(f"{self.path}: the post-processor changes the text's own ids")

    def _document_end(self, file: Path) -> int:
        for text in DOCUMENT_END:
            if text in self.special_tokens:
                return self.special_tokens[text]
        eos = self.special_token_strings.get("eos_token")
        if eos is not None and eos in self.added_tokens:
            return self.added_tokens[eos]
        raise ValueError(f"{file}: no end-of-text token: expected one of {DOCUMENT_END} as an "
                         f"added special token, or tokenizer_config.json eos_token")


def _split(text: str, pattern: re.Pattern | None, ids: dict[str, int]) -> list[str | int]:
    if pattern is None:
        return [text]
    out: list[str | int] = []
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append(text[pos : m.start()])
        out.append(ids[m.group()])
        pos = m.end()
    if pos < len(text) or not out:
        out.append(text[pos:])
    return out


def _alternation(tokens: list[str]) -> re.Pattern | None:
    """Leftmost-longest matching of fixed strings (longest first in a leftmost-first regex)."""
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(set(tokens), key=len, reverse=True)))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = read_json(path, "a JSON object")
    if not isinstance(data, dict):
        raise FileFormatError(path, "a JSON object", f"got {type(data).__name__}")
    return data


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_token_strings(config: dict, directory: Path) -> dict[str, str]:
    """{"bos_token": "<|im_start|>", ...}: the named special tokens (tokenizer_config.json,
    then the legacy special_tokens_map.json), as chat templates see them."""
    legacy = _read_json(directory / "special_tokens_map.json")
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name)) or _token_text(legacy.get(name))
        if text is not None:
            out[name] = text
    return out


def _chat_template(directory: Path, config: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list of
    named templates: "default"), else the older chat_template.json."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        template = _read_json(directory / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) else None


def transformers_differences(tok: HFTokenizer, reference, texts: list[str] | None = None) -> str:
    """The first text (PROBE's lines by default) on which `tok` and a transformers tokenizer
    disagree (ids without and with special tokens, decoding), or "" when none."""
    for text in texts if texts is not None else PROBE.splitlines(keepends=True):
        ours = tok.encode(text)
        theirs = reference(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            return f"{text[:40]!r}: ids {ours[:8]}... vs {theirs[:8]}..."
        with_special = reference(text)["input_ids"]
        if tok.bos_ids + ours + tok.eos_ids != with_special:
            return f"{text[:40]!r} with special tokens: {with_special[:4]}... vs ours"
        if tok.decode(ours) != reference.decode(theirs, clean_up_tokenization_spaces=False):
            return f"{text[:40]!r}: decoded differently"
    return ""


def token_ids(tok) -> dict:
    """bos_token_id / eos_token_id / pad_token_id for a model's config.json and
    generation_config.json: an imported model's own (its generation_config.json, else its
    tokenizer's named tokens), or our end-of-text for all three."""
    if not isinstance(tok, HFTokenizer):
        return {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "pad_token_id": tok.eot_id}
    named = {k: tok.added_tokens.get(v) for k, v in tok.special_token_strings.items()}
    out = {
        "bos_token_id": tok.bos_ids[0] if tok.bos_ids else named.get("bos_token"),
        "eos_token_id": named.get("eos_token", tok.eot_id),
        "pad_token_id": named.get("pad_token"),
    }
    out.update({k: tok.generation_config[k] for k in out if k in tok.generation_config})
    return out


def load_hf_tokenizer(path: str | Path) -> HFTokenizer:
    """The HFTokenizer of directory `path`, read once per process while its files stay the
    same (checking a large vocabulary for tiktoken takes seconds)."""
    path = Path(path).resolve()
    directory = path.parent if path.name == TOKENIZER_FILE else path
    stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None
                  for f in (directory / name for name in TOKENIZER_FILES))
    key = (directory, stamp)
    if key not in _LOADED:
        while len(_LOADED) >= 3:  # a large vocabulary takes a few hundred MB in both libraries
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = HFTokenizer(directory)
    return _LOADED[key]


_LOADED: dict[tuple, HFTokenizer] = {}
