"""What each tokenizer charges per language, per Unicode script and for code, on the same texts.

    python -m data.tokenizer_report --languages FILE [--code stdlib] --out report.md \
        --tokenizer bpe4k=data_cache/stdlib-bpe4k --tokenizer cl100k_base \
        --tokenizer smollm2=hf:data_cache/hf/SmolLM2-135M-Instruct

Tokenizers (`--tokenizer [LABEL=]SPEC`, repeated): a prepared data dir (the tokenizer its
manifest names), a `.tiktoken` file, a tiktoken name, or `hf:PATH` (a tokenizer.json or the
directory holding one). Texts: `--languages` is BIG-bench's language_identification jsonl
(each query quotes a sentence and lists four language names, `gold` picks one) or a jsonl of
{"text", "language"}; `--code` adds Python sources (data/sources.py specs, e.g. `stdlib`).

Per tokenizer, language and script: bytes per token, tokens per word (whitespace-separated;
meaningless for scripts written without spaces), tokens per character, and the premium: tokens
per character relative to English. BIG-bench's sentences are not translations of each other,
so "the same content" cannot be parallel text; characters stand in for content (bytes would
charge every non-ASCII script for UTF-8's 2-4 bytes per character). A logographic script
packs more content in a character, so its premium overstates its cost; compare tokenizers on
one script rather than scripts on one tokenizer for those. Also: the share of the vocabulary
any text uses, and whether decode(encode(text)) gives back every text exactly.

Writes the markdown tables to --out, the numbers to the same name with .json, and the plot of
cost per script and per language with .png.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_path, write_json, write_text
from data.hf_tokenizer import HFTokenizer
from data.manifest import MANIFEST_FILE, manifest_tokenizer
from data.scripts import script_of
from data.sources import SourceErrors, iter_documents
from data.tokenizer import Tokenizer, load_tokenizer

REFERENCE = "English"
CODE = "code"  # the script (and language) of every code sample
_SENTENCE = re.compile(r"\nSentence:(.*?)\n[A-Z]\. ", re.S)
_CHOICE = re.compile(r"^([A-Z])\. (.*)$", re.M)


@dataclass
class Sample:
    text: str
    language: str
    script: str


def read_language_file(path: str | Path) -> list[Sample]:
    """Sentences and their languages from BIG-bench language_identification (or a jsonl of
    {"text", "language"}); empty sentences are skipped, anything else malformed is an error."""
    path = Path(path)
    samples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            row = json.loads(line)
            if "text" in row and "language" in row:
                text, language = row["text"], row["language"]
            elif "query" in row and "gold" in row:
                text, language = _parse_query(row, where)
            else:
                raise ValueError(f"{where}: expected fields text + language, or query + gold")
            if text.strip():
                samples.append(Sample(text, language, script_of(text)))
    if not samples:
        raise ValueError(f"{path}: no sentences")
    return samples


def _parse_query(row: dict, where: str) -> tuple[str, str]:
    query = row["query"]
    sentence = _SENTENCE.search(query)
    choices = dict(_CHOICE.findall(query))
    if sentence is None or not choices:
        raise ValueError(f"{where}: query: expected 'Sentence: ...' and lines 'A. <language>'")
    gold = row["gold"]
    letters = sorted(choices)
    if not isinstance(gold, int) or not 0 <= gold < len(letters):
        raise ValueError(f"{where}: gold = {gold!r}: expected an index into {letters}")
    return sentence.group(1).strip(), choices[letters[gold]]


def read_code(spec: str, max_bytes: int) -> list[Sample]:
    """Source files of `spec` (data/sources.py), in order, up to `max_bytes` characters."""
    samples, size = [], 0
    for doc in iter_documents(spec, SourceErrors()):
        if size >= max_bytes:
            break
        samples.append(Sample(doc.text, CODE, CODE))
        size += len(doc.text)
    return samples


def open_tokenizer(spec: str) -> Tokenizer | HFTokenizer:
    """A prepared data dir's tokenizer, `hf:PATH`, a .tiktoken file or a tiktoken name."""
    if (Path(spec) / MANIFEST_FILE).exists():
        return manifest_tokenizer(spec)
    if spec.startswith("hf:"):
        return HFTokenizer(spec[3:])
    return load_tokenizer(spec)


def vocab_size(tok: Tokenizer | HFTokenizer) -> int:
    """Ordinary (non-special) ids of a tokenizer, the denominator of its utilisation."""
    ranks = getattr(tok, "mergeable_ranks", None)
    if ranks:
        return len(ranks)
    hf = getattr(tok, "tok", None)  # HFTokenizer: the tokenizers.Tokenizer it wraps
    return hf.get_vocab_size(with_added_tokens=False) if hf is not None else tok.n_vocab


# --- measuring ------------------------------------------------------------------------------


def _add(acc: dict, key: str, sample: Sample, n_tokens: int) -> None:
    g = acc.setdefault(key, {"texts": 0, "chars": 0, "bytes": 0, "words": 0, "tokens": 0})
    g["texts"] += 1
    g["chars"] += len(sample.text)
    g["bytes"] += len(sample.text.encode("utf-8"))
    g["words"] += len(sample.text.split())
    g["tokens"] += n_tokens


def _finish(groups: dict, ref_tokens_per_char: float) -> dict:
    for g in groups.values():
        g["bytes_per_token"] = g["bytes"] / max(1, g["tokens"])
        g["tokens_per_word"] = g["tokens"] / max(1, g["words"])
        g["tokens_per_char"] = g["tokens"] / max(1, g["chars"])
        g["premium"] = g["tokens_per_char"] / ref_tokens_per_char
    return groups


def measure(tok: Tokenizer | HFTokenizer, samples: list[Sample], reference: str = REFERENCE) -> dict:
    """Token counts of every sample by one tokenizer, summed per language and per script; the
    premium of each relative to `reference`; vocabulary use; round-trip failures."""
    t0 = time.time()
    texts = [s.text for s in samples]
    if hasattr(tok, "encode_batch"):
        ids = tok.encode_batch(texts)
    else:
        ids = [tok.encode(t) for t in texts]
    languages: dict = {}
    scripts: dict = {}
    used: dict[str, set] = defaultdict(set)
    failures = []
    for sample, sample_ids in zip(samples, ids):
        prose = sample.script != CODE
        _add(languages, sample.language, sample, len(sample_ids))
        if prose:
            _add(scripts, sample.script, sample, len(sample_ids))
        used["languages" if prose else "code"].update(sample_ids)
        back = tok.decode(sample_ids)
        if back != sample.text:
            at = next((i for i, (a, b) in enumerate(zip(back, sample.text)) if a != b),
                      min(len(back), len(sample.text)))
            failures.append({"language": sample.language, "at": at,
                             "text": sample.text[max(0, at - 20): at + 20],
                             "decoded": back[max(0, at - 20): at + 20]})
    if reference not in languages:
        raise ValueError(f"no {reference!r} texts to measure the premium against")
    ref = languages[reference]["tokens"] / languages[reference]["chars"]
    size = vocab_size(tok)
    all_used = used["languages"] | used["code"]
    return {
        "vocab_size": size,
        "utilisation": {part: len(s) / size for part, s in
                        [("all", all_used), ("languages", used["languages"]), ("code", used["code"])]
                        if s},
        "texts": len(samples),
        "round_trip_failures": len(failures),
        "round_trip_examples": failures[:3],
        "languages": _finish(languages, ref),
        "scripts": _finish(scripts, ref),
        "seconds": time.time() - t0,
    }


def most_expensive(result: dict, n: int = 10) -> list[tuple[str, dict]]:
    langs = [(k, v) for k, v in result["languages"].items() if k != CODE]
    return sorted(langs, key=lambda kv: -kv[1]["premium"])[:n]


# --- tables and the plot --------------------------------------------------------------------


def markdown(results: dict[str, dict], samples: list[Sample], top: int = 10,
             reference: str = REFERENCE) -> str:
    names = list(results)
    language_script = {s.language: s.script for s in samples}
    n_langs = len({s.language for s in samples if s.script != CODE})
    lines = [
        f"{len(samples):,} texts: {n_langs} languages"
        + (f" and {sum(s.script == CODE for s in samples):,} code files" if CODE in language_script else ""),
        "",
        f"Premium: tokens per character relative to {reference} texts of the same file (no parallel "
        "translations: characters stand in for content); a tokenizer poor at English has smaller "
        "premiums, so compare tokenizers by bytes per token. Bytes per token: UTF-8 bytes / tokens.",
        "",
        f"| tokenizer | vocab | ids used | round trips exact | {reference} bytes/token | "
        f"{reference} tokens/word | code bytes/token | median premium | worst language (premium) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        prem = [v["premium"] for k, v in r["languages"].items() if k != CODE]
        ref = r["languages"][reference]
        code = r["languages"].get(CODE)
        worst_name, worst = most_expensive(r, 1)[0]
        lines.append(
            f"| {name} | {r['vocab_size']:,} | {r['utilisation']['all']:.1%} | "
            f"{r['texts'] - r['round_trip_failures']:,} / {r['texts']:,} | "
            f"{ref['bytes_per_token']:.2f} | {ref['tokens_per_word']:.2f} | "
            + (f"{code['bytes_per_token']:.2f}" if code else "-")
            + f" | {statistics.median(prem):.2f} | {worst_name} ({worst['premium']:.2f}) |"
        )
    first = results[names[0]]["scripts"]
    scripts = sorted(first, key=lambda s: -first[s]["texts"])
    lines += ["", "Premium per script (bytes per token); a text's script is that of most of its letters:",
              "",
              "| script | texts | " + " | ".join(names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    for s in scripts:
        cells = []
        for name in names:
            g = results[name]["scripts"].get(s)
            cells.append(f"{g['premium']:.2f} ({g['bytes_per_token']:.2f})" if g else "-")
        lines.append(f"| {s} | {first[s]['texts']} | " + " | ".join(cells) + " |")
    for name, r in results.items():
        lines += ["", f"The {top} most expensive languages for {name}:", "",
                  "| # | language | script | premium | bytes/token | tokens/word |",
                  "|---:|---|---|---:|---:|---:|"]
        for i, (lang, g) in enumerate(most_expensive(r, top), 1):
            lines.append(f"| {i} | {lang} | {language_script.get(lang, '?')} | {g['premium']:.2f} | "
                         f"{g['bytes_per_token']:.2f} | {g['tokens_per_word']:.2f} |")
    failed = {n: r["round_trip_examples"] for n, r in results.items() if r["round_trip_failures"]}
    if failed:
        lines += ["", "Round-trip failures (first examples):", ""]
        lines += [f"- {n}: {json.dumps(ex, ensure_ascii=False)}" for n, ex in failed.items()]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path, max_scripts: int = 24) -> None:
    """Left: premium per script (bars per tokenizer); right: every language's premium, sorted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    first = results[names[0]]["scripts"]
    scripts = sorted(first, key=lambda s: -first[s]["texts"])[:max_scripts]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 0.32 * len(scripts) + 2.5))
    height = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [results[name]["scripts"].get(s, {}).get("premium", 0.0) for s in scripts]
        left.barh([k + i * height for k in range(len(scripts))], vals, height=height, label=name)
        prem = sorted((v["premium"] for k, v in results[name]["languages"].items() if k != CODE),
                      reverse=True)
        right.plot(range(1, len(prem) + 1), prem, label=name)
    left.set_yticks([k + 0.4 - height / 2 for k in range(len(scripts))], scripts)
    left.invert_yaxis()
    left.axvline(1.0, color="gray", lw=0.8)
    left.set_xlabel(f"tokens per character / {REFERENCE}'s")
    left.set_title("cost per script")
    right.set_yscale("log")
    right.axhline(1.0, color="gray", lw=0.8)
    right.set_xlabel("languages, most expensive first")
    right.set_ylabel(f"tokens per character / {REFERENCE}'s")
    right.set_title("cost per language")
    right.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(results: dict[str, dict], samples: list[Sample], out: str | Path,
                 top: int = 10) -> Path:
    out = Path(out)
    write_text(out, markdown(results, samples, top))
    write_json(out.with_suffix(".json"), results, indent=1)
    plot(results, out.with_suffix(".png"))
    return out


# --- command line ---------------------------------------------------------------------------


def parse_tokenizer_arg(arg: str) -> tuple[str, str]:
    """'LABEL=SPEC' or 'SPEC' (labelled by the spec's last path part)."""
    label, sep, spec = arg.partition("=")
    if not sep:
        spec = arg
        label = Path(arg.removeprefix("hf:")).name or arg
    return label, spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.tokenizer_report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tokenizer", action="append", required=True, metavar="[LABEL=]SPEC",
                        help="a data dir, .tiktoken file, tiktoken name or hf:PATH (repeat)")
    parser.add_argument("--languages", metavar="FILE", required=True,
                        help="BIG-bench language_identification jsonl, or jsonl of text + language")
    parser.add_argument("--code", metavar="SOURCE", default=None,
                        help="also code: a data source (e.g. stdlib)")
    parser.add_argument("--code-bytes", type=int, default=4_000_000,
                        help="characters of code to read (default 4M)")
    parser.add_argument("--top", type=int, default=10, help="most expensive languages listed")
    parser.add_argument("--out", metavar="FILE", required=True,
                        help="markdown tables; FILE.json and FILE.png beside it")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    samples = read_language_file(args.languages)
    if args.code:
        samples += read_code(args.code, args.code_bytes)
    results = {}
    for arg in args.tokenizer:
        label, spec = parse_tokenizer_arg(arg)
        results[label] = r = measure(open_tokenizer(spec), samples)
        worst, g = most_expensive(r, 1)[0]
        print(f"{label}: {r['texts']:,} texts in {r['seconds']:.1f}s, round trips exact "
              f"{r['texts'] - r['round_trip_failures']:,}/{r['texts']:,}, ids used "
              f"{r['utilisation']['all']:.1%}, worst {worst} x{g['premium']:.2f}")
    out = write_report(results, samples, args.out, args.top)
    print(f"wrote {out}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
