"""Generation speed: tokens/s and time to first token of our engine (fp32, int8, int4,
speculative decoding) next to transformers' `generate` on the same weights, in one run.

    python -m bench.generate --run runs/smollm2 [--hf DIR] [--batch-sizes 1 8] [--new-tokens 64]
                             [--compiled int8 int8+spec int8+ngram] [--eagle DIR --compiled int8+eagle]

The transformers model is the run exported by model.hf (a temporary directory), or --hf DIR
when it already is one. Every measurement is greedy, with prompts of equal length cut from the
standard library's text (no padding in either library), and the implementations take turns
round after round so that a busy machine slows them alike; the table gives the median round.
tok/s counts generated tokens over the whole call (prefill included) for all sequences of the
batch; TTFT is the time of a call for one new token. "same ids" compares each row's tokens with
transformers' (exact for fp32 and for speculative decoding with an fp32 target; quantized
models compute other numbers). The draft model for speculative decoding is the same run
quantized to int4 (--draft int4): it shares the tokenizer and every weight's shape, costs no
extra file, and agrees with the target far more often than a truncated stack of its first
layers does (untrained early exits, measured in the README's table). "+ngram" rows draft by
n-gram lookup in the sequence itself (inference/ngram.py, k = --ngram-k); "+eagle" rows with
the EAGLE head in --eagle DIR (inference/eagle.py, trained for this run; k = --eagle-k; not
among the default rows, which need no file). --compiled adds rows of the same engines with torch.compile'd decode steps (one engine per batch size: a compiled step
runs every slot); their warm-up compiles each graph before any timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from bench.tables import RESULTS_DIR, write_table
from bench.throughput import device_name
from common.atomic import write_text
from common.cli import add_run_arguments, parse_device
from common.errors import run_cli
from inference.eagle import load_eagle
from inference.engine import Engine
from inference.ngram import NgramDraft
from inference.sampling import SamplingParams
from model.load import load_model
from model.quant import GROUP_SIZES, MODES, weight_bytes

IMPLEMENTATIONS = ("transformers", "fp32", "int8", "int4", "fp32+spec", "int8+spec", "fp32+ngram", "int8+ngram",
                   "fp32+eagle", "int8+eagle")
DEFAULT_ROWS = [i for i in IMPLEMENTATIONS if not i.endswith("+eagle")]  # the rows that need no --eagle


def prompts_from_stdlib(tokenizer, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens from consecutive stretches of the standard library."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    ids: list[int] = []
    for f in files:
        ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= n * length * 4:
            break
    step = len(ids) // n
    return [ids[i * step : i * step + length] for i in range(n)]


def hf_tokenizer_and_model(hf_dir: Path, device: torch.device):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return tok, model.to(device).eval()


def hf_generate(model, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float]:
    x = torch.tensor(prompts, device=model.device)
    t0 = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)  # fmt: skip
    return out[:, x.shape[1] :].tolist(), time.perf_counter() - t0


def ours_generate(engine: Engine, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float]:
    t0 = time.perf_counter()
    seqs = engine.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0))
    return [s.generated for s in seqs], time.perf_counter() - t0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, out_help="the results table (default: bench/results/generate-<device>.md)")
    parser.add_argument("--hf", metavar="DIR", default=None, help="the run as a Hugging Face directory")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=IMPLEMENTATIONS, default=DEFAULT_ROWS)
    parser.add_argument("--draft", choices=MODES, default="int4", help="the draft: the run quantized so")
    parser.add_argument("--speculate-k", type=int, default=3)
    parser.add_argument("--ngram-k", type=int, default=4, help="tokens an n-gram draft proposes")
    parser.add_argument("--eagle", metavar="DIR", default=None, help="an EAGLE head for the +eagle rows")
    parser.add_argument("--eagle-k", type=int, default=4, help="tokens the EAGLE head proposes")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--compiled", nargs="+", choices=IMPLEMENTATIONS[1:], default=[], metavar="IMPL",
                        help="also time these of ours with torch.compile'd decode steps (Engine(compile=True))")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)
    if args.eagle is None and any(i.endswith("+eagle") for i in args.only + args.compiled):
        parser.error("the +eagle rows need --eagle DIR (a head from python -m inference.eagle train)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(args.hf) if args.hf else None
        if hf_dir is None:
            from model.hf import export_run

            hf_dir = Path(tmp) / "hf"
            export_run(args.run, hf_dir, args.step)
        tok, hf = hf_tokenizer_and_model(hf_dir, device)
        table = run(args, device, tok, hf)
    print(table)
    path = Path(args.out) if args.out else None
    if path is not None:
        write_text(path, table)
    else:
        path = write_table(RESULTS_DIR, "generate", device_name(device), table)
    print(f"wrote {path}", file=sys.stderr)


def run(args, device, tok, hf) -> str:
    max_batch = max(args.batch_sizes)
    max_k = max(args.speculate_k, args.ngram_k, args.eagle_k)
    max_len = args.prompt_tokens + args.new_tokens + max_k + 2
    models = {"fp32": load_model(args.run, device, args.step)[0]}
    for mode in {"int8", "int4", args.draft} & set(MODES):
        models[mode] = load_model(args.run, device, args.step, mode, args.group_size)[0]

    def engine(impl: str, batch: int, compile: bool) -> Engine:
        model, _, how = impl.partition("+")
        draft, k = None, 1
        if how == "spec":
            draft, k = models[args.draft], args.speculate_k
        elif how == "ngram":
            draft, k = NgramDraft(), args.ngram_k
        elif how == "eagle":
            draft, k = load_eagle(args.eagle, models[model]), args.eagle_k
        return Engine(models[model], None, batch, max_len, draft, k, compile=compile)

    engines: dict[str, dict[int, Engine]] = {}  # implementation -> batch size -> engine
    for impl in args.only:  # one engine for every batch: its eager steps run the slots in use
        if impl != "transformers":
            engines[impl] = dict.fromkeys(args.batch_sizes, engine(impl, max_batch, compile=False))
    for impl in args.compiled:  # one engine per batch size: a compiled step runs every slot
        engines[f"{impl} compiled"] = {b: engine(impl, b, compile=True) for b in args.batch_sizes}
    prompts = prompts_from_stdlib(tok, max_batch, args.prompt_tokens)
    impls = [i for i in args.only if i == "transformers"] + list(engines)
    # warm-up (and compilation: every batch size, each compiled length): a short call each, on
    # prompts that repeat themselves so that an n-gram draft proposes (and its verification runs)
    warm = [p[: len(p) // 2] * 2 for p in prompts]
    for impl in impls:
        for b in args.batch_sizes:
            t0 = time.perf_counter()
            call(impl, hf, engines, warm[:b], max_k + 3)
            print(f"warm-up {impl} b{b}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    times = {(i, b): [] for i in impls for b in args.batch_sizes}
    ttft = {(i, b): [] for i in impls for b in args.batch_sizes}
    ids: dict = {}
    accept: dict = {}
    for r in range(args.rounds):
        for b in args.batch_sizes:
            for impl in impls:
                if impl in engines:  # the acceptance of this call only (not the warm-up's)
                    engines[impl][b].stats.clear()
                out, seconds = call(impl, hf, engines, prompts[:b], args.new_tokens)
                times[impl, b].append(b * args.new_tokens / seconds)
                if impl in engines and engines[impl][b].draft is not None:
                    accept[impl, b] = engines[impl][b].acceptance_rate()
                ttft[impl, b].append(call(impl, hf, engines, prompts[:b], 1)[1])
                ids[impl, b] = out
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{i} b{b} {times[i, b][-1]:.1f} tok/s" for i in impls for b in args.batch_sizes), file=sys.stderr)  # fmt: skip
    return format_table(args, device, impls, times, ttft, ids, accept, models)


def call(impl, hf, engines, prompts, n):
    if impl == "transformers":
        return hf_generate(hf, prompts, n)
    return ours_generate(engines[impl][len(prompts)], prompts, n)


def format_table(args, device, impls, times, ttft, ids, accept, models) -> str:
    ref_b1 = statistics.median(times["transformers", 1]) if ("transformers", 1) in times else None
    lines = [
        f"# Generation speed, {device_name(device)}, torch {torch.__version__}",
        "",
        f"Run `{args.run}`; greedy; {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens; "
        f"median of {args.rounds} interleaved rounds; draft {args.draft}, k = {args.speculate_k}; "
        f"n-gram draft k = {args.ngram_k}; " + (f"EAGLE head {args.eagle}, k = {args.eagle_k}; " if args.eagle else "") +
        f"int4 group {args.group_size}. Weights: "
        + ", ".join(f"{m} {weight_bytes(model) / 1e6:.0f} MB" for m, model in models.items()),
        "",
        "| implementation | batch | tok/s | TTFT (ms) | vs transformers b1 | vs own b1 | acceptance | same ids as transformers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for impl in impls:
        b1 = statistics.median(times[impl, 1]) if (impl, 1) in times else None
        for b in args.batch_sizes:
            tps = statistics.median(times[impl, b])
            ms = 1000 * statistics.median(ttft[impl, b])
            vs_hf = f"{tps / ref_b1:.2f}x" if ref_b1 else "-"
            vs_own = f"{tps / b1:.2f}x" if b1 else "-"
            same = "-"
            if ("transformers", b) in ids and impl != "transformers":
                rows = sum(a == c for a, c in zip(ids[impl, b], ids["transformers", b]))
                same = f"{rows}/{b}"
            acc = f"{accept[impl, b]:.2f}" if (impl, b) in accept else "-"
            lines.append(f"| {impl} | {b} | {tps:.1f} | {ms:.0f} | {vs_hf} | {vs_own} | {acc} | {same} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(main)
