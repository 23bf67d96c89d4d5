"""One command for a short GPU lease: check and measure everything in this repository that
needs a GPU, in at most 8 minutes on one H200.

    bash scripts/gpu_check.sh                       # on the device machine: everything under $OUT
    python -m bench.gpu_check --out-dir DIR         # the same on any CUDA machine
    python -m bench.gpu_check --parts attention     # some parts only (a rerun)
    python -m bench.gpu_check --smoke               # this CPU: interpreter, tiny shapes (tested)

Four parts, each in its own process with its own time budget, so that a kernel fault (which
poisons the CUDA context) or a hang costs one part and not the run:
  1. correctness (bench/gpu_correctness.py): every Triton kernel compiled for real against its
     float64 reference, forward and backward, bf16 and fp16 (attention with GQA, document
     masking, odd T; RMSNorm, RoPE, SwiGLU, fused linear + cross-entropy); MoE's grouped GEMM
     against its loop; the tiny model trained 100 steps with the Triton kernels vs SDPA.
  2. attention (bench/kernels.py): forward and backward TFLOP/s, causal and not, head dim 64 /
     128, T = 1k / 4k / 8k / 16k, bf16, ours next to SDPA's flash and cuDNN backends and
     flash-attn where installed; the target shape (hd 128, T = 8k, causal) first.
  3. loss (bench/kernels.py): fused linear + cross-entropy vs the plain loss, time and peak
     memory at vocabularies 32k and 128k (8192 tokens, dim 2048, bf16).
  4. throughput (bench/throughput_gpu.py): llama-1b and gpt2-124m tokens/s, MFU and memory peak
     over 20 steps, bf16, compile on (llama-1b also with attention = triton and the fused loss),
     next to the bf16 matmul peak measured in the same run (bench/throughput.py).
A part starts no new measurement once its budget is spent (SKIP rows), is killed 30 s after
it, and nothing starts after --deadline; a failure is a FAIL row with its traceback in the log,
and the other parts still run. Autotuning keeps the first --autotune-configs configs of each
kernel (KERNELS_AUTOTUNE_CONFIGS, kernels/_common.py) so compilation fits; the log says which
config won (TRITON_PRINT_AUTOTUNING=1).

Writes gpu-check-<device>.md (targets, parts, tables) and gpu-check-<device>.jsonl (every row)
to --results-dir (default bench/results/), and copies both, with the log gpu-check.log, to
--out-dir (default $OUT). --smoke writes only to --out-dir or a new temporary directory, never to
the repo.

Device procedure (a session whose device `status` says can_start_another: true):
  1. Here first: `python -m pytest -x -q tests/test_gpu_check.py` (the smoke run passes).
  2. One `run` call: command `bash scripts/gpu_check.sh`, timeout_s 540. It ends within ~8 min
     and leaves ~5 of the 15 device minutes for one rerun of what failed, after fixing it here:
     `bash scripts/gpu_check.sh --parts NAME ...` (timeout_s to match its budgets).
  3. give_back; copy gpu-check-<device>.md and .jsonl from the reply's files_at into
     bench/results/, commit them, and report the Targets table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 30  # a part is killed this long after its budget


@dataclass
class Part:
    title: str
    budget_s: float  # on one H200, compilation included; the four sum to ~7 min
    run: Callable  # (device, smoke, emit, time_left) -> None, in the part's own process


# ------------------------------------------------------------------------- the parts (child)


def part_correctness(device, smoke, emit, time_left) -> None:
    from bench.gpu_correctness import run_correctness

    run_correctness(device, smoke, emit, time_left)


def part_attention(device, smoke, emit, time_left) -> None:
    import torch

    from bench import kernels as K

    if smoke:
        dtype, seq_lens, head_dims, tokens, width = torch.float32, [40], [32], 40, 64
    else:
        dtype, seq_lens, head_dims = torch.bfloat16, [1024, 4096, 8192, 16384], [64, 128]
        tokens, width = 16384, 2048  # FlashAttention's benchmark setting
    items = [(c, D, T) for c in (True, False) for D in head_dims for T in seq_lens]
    items.sort(key=lambda item: item != (True, 128, 8192))  # the target shape first
    for causal, D, T in items:
        for name, fn in K.attention_providers(causal, smoke).items():
            if time_left() > 0:
                emit(K.attention_row(name, fn, D, T, causal, tokens, width, device, dtype, smoke))
                continue
            nan = math.nan
            emit({"provider": name, "D": D, "T": T, "B": max(1, tokens // T), "H": width // D,
                  "causal": causal, "fwd_ms": nan, "bwd_ms": nan, "fwd_tflops": nan,
                  "bwd_tflops": nan, "peak_mib": nan, "note": "SKIP: time budget spent"})  # fmt: skip


def part_loss(device, smoke, emit, time_left) -> None:
    import torch

    from bench import kernels as K

    if smoke:
        dtype, vocabs, n_tokens, dim = torch.float32, [300], 48, 32
    else:
        dtype, vocabs, n_tokens, dim = torch.bfloat16, [32768, 131072], 8192, 2048
    for V in vocabs:
        if time_left() <= 0:
            print(f"loss V={V}: time budget spent, skipped", flush=True)
            continue
        for row in K.loss_rows(V, n_tokens, dim, device, dtype, smoke):
            emit(row)


def part_throughput(device, smoke, emit, time_left) -> None:
    import torch.distributed as dist

    from bench import throughput_gpu as TG
    from bench.throughput import matmul_peak
    from model.config import model_config

    device, world = TG.init_device(smoke)
    peak = matmul_peak(device, seconds=0.2 if smoke else 2.0)
    emit({"kind": "matmul_peak", "flops": peak})
    print(f"matmul peak measured: {peak / 1e12:.1f} TFLOP/s", flush=True)
    if smoke:  # (size, attention, fused loss); compile off: Inductor takes minutes on 2 cores
        variants, steps, compile_ = [("tiny", "sdpa", False)], 1, False
    else:
        variants = [("llama-1b", "sdpa", False), ("gpt2-124m", "sdpa", False),
                    ("llama-1b", "triton", True)]  # fmt: skip
        steps, compile_ = 20, True
    for size, attention, fused in variants:
        argv = ["--attention", attention, "--steps", str(steps), "--warmup", "1" if smoke else "3"]
        args = TG.build_parser().parse_args(argv + (["--fused-loss"] if fused else []))
        if time_left() <= 0:
            emit({"size": size, "attention": attention, "fused_loss": fused,
                  "compile": compile_, "error": "SKIP: time budget spent"})  # fmt: skip
            continue
        result = TG.run_variant(size, compile_, "none", args, device, world)
        if "error" not in result:
            flops = model_config(size).flops_per_token(result["seq_len"])
            result["mfu_measured_peak"] = flops * result["tokens_per_s_per_gpu"] / peak
        print(TG.result_line(result), flush=True)
        emit(result)
    dist.destroy_process_group()


PARTS = {
    # Correctness pays most Triton compiles (~36 attention variants x configs); the Triton
    # cache on disk hands the shared ones to part 2, which then mostly measures.
    "correctness": Part("1. Correctness (compiled kernels vs float64 references)", 150,
                        part_correctness),
    "attention": Part("2. Attention", 90, part_attention),
    "loss": Part("3. Fused linear + cross-entropy", 30, part_loss),
    "throughput": Part("4. Training throughput", 150, part_throughput),
}  # fmt: skip


def env_row(device) -> dict:
    import torch
    import triton

    from kernels._common import AUTOTUNE_CONFIGS_ENV, interpreting

    row = {"kind": "env", "device": "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda,
           "interpreter": interpreting(), "autotune_configs":
           os.environ.get(AUTOTUNE_CONFIGS_ENV, "all")}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        row.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30))
    return row


def run_part_here(args) -> None:
    """Child mode (--part): run one part in this process, appending rows to --rows."""
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check needs a CUDA GPU (--smoke runs on the CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")  # the interpreter runs on the CPU
    end = time.monotonic() + args.budget
    with open(args.rows, "a") as rows:

        def emit(row: dict) -> None:  # one JSON line per row, flushed: a killed part keeps them
            rows.write(json.dumps({"part": args.part, **row}) + "\n")
            rows.flush()

        emit(env_row(device))
        PARTS[args.part].run(device, args.smoke, emit, lambda: end - time.monotonic())
    if args.inject_failure == args.part:
        raise RuntimeError(f"injected failure in part {args.part!r} (--inject-failure)")


# ------------------------------------------------------------------------ the driver (parent)


def run_child(cmd: list[str], env: dict, timeout: float, log) -> tuple[int | None, float]:
    """Run cmd in its own process group, copying its output line by line to stdout and `log`;
    after `timeout` seconds kill the group (Triton / Inductor compile workers included).
    Returns (exit code, None if killed; seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1,
                            preexec_fn=os.setpgrp)  # fmt: skip

    def pump() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    rc = None
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:  # the group: the child if it still runs, and any worker it left behind
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    reader.join(timeout=10)
    sys.stdout.flush()
    return rc, time.monotonic() - t0


def child_env(args) -> dict:
    from kernels._common import AUTOTUNE_CONFIGS_ENV

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if args.autotune_configs:
        env[AUTOTUNE_CONFIGS_ENV] = str(args.autotune_configs)
    else:
        env.pop(AUTOTUNE_CONFIGS_ENV, None)
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
        env["TRITON_PRINT_AUTOTUNING"] = "1"
    return env


def run_parts(args, log, work: Path) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Run the selected parts one after another; (rows by part, status by part)."""
    env = child_env(args)
    start = time.monotonic()
    rows, status = {}, {}
    for name in args.parts:
        part = PARTS[name]
        left = args.deadline - (time.monotonic() - start)
        if left < 15:
            status[name] = {"budget": part.budget_s, "used": 0.0, "status": "SKIP (deadline)"}
            rows[name] = []
            continue
        budget = min(part.budget_s, left - GRACE_S) if left > 2 * GRACE_S else left / 2
        timeout = min(budget + GRACE_S, left)
        banner = f"\n=== part {name}: budget {budget:.0f} s (killed after {timeout:.0f} s)"
        print(banner, flush=True)
        log.write(banner + "\n")
        rows_file = work / f"rows-{name}.jsonl"
        cmd = [sys.executable, "-m", "bench.gpu_check", "--part", name, "--rows", str(rows_file),
               "--budget", f"{budget:.1f}"]  # fmt: skip
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--inject-failure", args.inject_failure] if args.inject_failure else []
        rc, used = run_child(cmd, env, timeout, log)
        rows[name] = part_rows = read_rows(rows_file)
        failed = [r for r in part_rows if row_failed(r)]
        labels = ", ".join(dict.fromkeys(
            str(r.get("check") or r.get("provider") or r.get("size") or r.get("loss"))
            for r in failed))  # fmt: skip
        if rc is None:
            state = f"FAIL (killed after {used:.0f} s)"
        elif rc != 0:
            state = f"FAIL (exit {rc}; traceback in the log)"
        else:
            state = f"FAIL ({len(failed)} rows: {labels})" if failed else "PASS"
        status[name] = {"budget": budget, "used": used, "status": state}
        line = f"=== part {name}: {state}, {used:.0f} s of {budget:.0f} s"
        print(line, flush=True)
        log.write(line + "\n")
    return rows, status


def read_rows(path: Path) -> list[dict]:
    """The JSON lines a part wrote; a line cut short by a kill is dropped."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def row_failed(r: dict) -> bool:
    """A correctness FAIL, a measurement whose note says FAIL, or a training variant's error."""
    error = str(r.get("error", ""))
    return (r.get("status") == "FAIL" or str(r.get("note", "")).startswith("FAIL")
            or bool(error and not error.startswith("SKIP")))  # fmt: skip


def gpu_state() -> str:
    """nvidia-smi's view (clocks, temperature, memory, processes) for the log, if it exists."""
    if shutil.which("nvidia-smi") is None:
        return ""
    res = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    return res.stdout + res.stderr


# ------------------------------------------------------------------------------- the tables


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def targets_lines(rows: dict[str, list[dict]]) -> list[str]:
    """The issue's targets against what was measured, with the next lever where one is missed."""
    from bench.kernels import loss_ratio

    def attn(provider):
        return next((r for r in rows.get("attention", []) if r.get("provider") == provider
                     and r.get("causal") and r.get("D") == 128 and r.get("T") == 8192), None)  # fmt: skip

    ours = attn("triton (ours)") or {}
    others = [(p, attn(p)) for p in ("sdpa flash", "sdpa cudnn", "flash-attn")]
    context = ", ".join(f"{p} {_fmt(r['fwd_tflops'])} / {_fmt(r['bwd_tflops'])}"
                        for p, r in others if r)  # fmt: skip
    loss = [r for r in rows.get("loss", []) if r.get("V") == 131072]
    ratio = loss_ratio(loss, 131072) if loss else math.nan
    llama = [r["mfu"] for r in rows.get("throughput", [])
             if r.get("size") == "llama-1b" and r.get("mfu")]  # fmt: skip
    checks = [r for r in rows.get("correctness", []) if "status" in r]
    passed = sum(r["status"] == "PASS" for r in checks)
    targets = [  # (target, measured value, holds, how to read it, next lever if missed)
        ("attention fwd >= 450 TFLOP/s (hd 128, T 8k, causal, bf16)", ours.get("fwd_tflops"),
         lambda v: v >= 450, f"ours; fwd / bwd of {context}" if context else "ours",
         "full autotune sweep (KERNELS_AUTOTUNE_CONFIGS unset: python -m bench.kernels "
         "--causal on off), then TMA loads and warp specialization (FA3-style) in the fwd"),
        ("attention bwd >= 320 TFLOP/s (same shape)", ours.get("bwd_tflops"), lambda v: v >= 320,
         "ours", "full autotune sweep, then one fused dK/dV + atomic dQ kernel or a persistent "
         "grid over key blocks"),
        ("fused loss peak <= 1/4 of plain at V = 128k", ratio, lambda v: v <= 0.25,
         "fused / plain peak memory", "smaller chunks (kernels/cross_entropy.default_chunk_size)"),
        ("llama-1b >= 50% MFU (989 TFLOP/s dense bf16)", max(llama) if llama else None,
         lambda v: v >= 0.5, "best variant, as a fraction", "bigger micro-batch (--batch), "
         "fused loss, whole-model compile; then a torch.profiler trace for the non-matmul share"),
        ("correctness: every check passes", passed if checks else None,
         lambda v: v == len(checks), f"of {len(checks)} checks", "the FAIL rows below"),
    ]  # fmt: skip
    lines = ["| target | measured | holds | what the number is | next lever if missed |",
             "|---|---|---|---|---|"]  # fmt: skip
    for target, value, ok, what, lever in targets:
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        holds = "not measured" if missing else ("yes" if ok(value) else "**no**")
        shown = "-" if missing else (f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append(f"| {target} | {shown} | {holds} | {what} | "
                     f"{lever if holds != 'yes' else ''} |")  # fmt: skip
    return lines


def shape_note(rows: list[dict], part: str) -> str:
    """The sizes every row of a kernel table shares, read off its first measured row."""
    r = next((r for r in rows if "dtype" in r), None)
    if r is None:
        return ""
    dtype = r["dtype"].replace("torch.", "")
    if part == "attention":
        return f"B*T = {r['B'] * r['T']} tokens, H*D = {r['H'] * r['D']}, {dtype}."
    return f"{r['N']} tokens, dim {r['dim']}, {dtype}."


def throughput_lines(rows: list[dict]) -> list[str]:
    lines = ["| model | attention | loss | compile | batch x seq | tokens/s | MFU (989) "
             "| MFU (measured peak) | peak GiB | step s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r.get("kind"):
            continue
        mfu = "-" if not r.get("mfu") else f"{100 * r['mfu']:.1f}%"
        mfu_m = "-" if not r.get("mfu_measured_peak") else f"{100 * r['mfu_measured_peak']:.1f}%"
        shape = f"{r['micro_batch']}x{r['seq_len']}" if "seq_len" in r else "-"
        lines.append(
            f"| {r['size']} | {r.get('attention')} | {'fused' if r.get('fused_loss') else 'plain'} "
            f"| {'on' if r.get('compile') else 'off'} | {shape} | "
            f"{_fmt(r.get('tokens_per_s'), ',.0f')} | {mfu} | {mfu_m} | "
            f"{_fmt(r.get('peak_mem_gib'))} | {_fmt(r.get('step_s'), '.3f')} | "
            f"{r.get('error', '')} |"
        )
    return lines


def render(rows: dict[str, list[dict]], status: dict[str, dict], args, total_s: float) -> str:
    from bench import kernels as K

    envs = [r for part in rows.values() for r in part if r.get("kind") == "env"]
    env = next((e for e in envs if e["device"] != "cpu"), envs[0] if envs else {})
    peak = next((r["flops"] for r in rows.get("throughput", []) if r.get("kind") == "matmul_peak"),
                None)  # fmt: skip
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    smoke = " (interpreter smoke run on the CPU: no measurement)" if args.smoke else ""
    lines = [
        f"# GPU check on {env.get('device', 'unknown')}{smoke}", "",
        f"{now}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
        f"compute capability {env.get('capability', '-')}, {env.get('sms', '-')} SMs, "
        f"{env.get('memory_gib', '-')} GiB; autotune configs per kernel: "
        f"{env.get('autotune_configs')}; `{' '.join(['python -m bench.gpu_check', *args.argv])}`"
        f" took {total_s:.0f} s.",
        "", "## Targets", "", *targets_lines(rows), "",
        "## Parts", "", "| part | budget s | used s | status | rows |", "|---|---|---|---|---|",
        *(f"| {n} | {s['budget']:.0f} | {s['used']:.0f} | {s['status']} | "
          f"{sum(1 for r in rows.get(n, []) if not r.get('kind'))} |" for n, s in status.items()),
    ]  # fmt: skip
    attn = [r for r in rows.get("attention", []) if "provider" in r]
    loss = [r for r in rows.get("loss", []) if "V" in r]
    sections = {
        "correctness": [
            "Relative error ||got - ref|| / ||ref|| against float64 on the same inputs, the "
            "largest over the output and the gradients (each in the note); see "
            "bench/gpu_correctness.py for the tolerances.", "",
            "| check | dtype | shape | error | tol | status | note |", "|---|---|---|---|---|---|---|",
            *(f"| {r['check']} | {r['dtype']} | {r['shape']} | {_fmt(r['err'], '.1e')} | "
              f"{r['tol']:.0e} | {r['status']} | {r['note']} |"
              for r in rows.get("correctness", []) if "check" in r),
        ],
        "attention": [K.ATTENTION_FLOPS_NOTE + f" {shape_note(attn, 'attention')}", "",
                      *K.ATTENTION_HEADER, *(K.attention_line(r) for r in attn)],
        "loss": [K.LOSS_NOTE + f" {shape_note(loss, 'loss')}", "", *K.LOSS_HEADER,
                 *K.loss_lines(loss)],
        "throughput": [
            f"One GPU, FSDP2 (bf16 parameters), no activation checkpointing, AdamW, random "
            f"tokens (bench/throughput_gpu.py). bf16 matmul peak measured in the same run: "
            f"{_fmt(peak and peak / 1e12)} TFLOP/s.", "",
            *throughput_lines(rows.get("throughput", [])),
        ],
    }  # fmt: skip
    for name in status:
        lines += ["", f"## {PARTS[name].title}", "", *sections[name]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="the CPU: interpreter, tiny shapes")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--out-dir", metavar="DIR", type=Path, default=None,
                   help="log and copies of the tables (default $OUT; --smoke: a temporary dir)")
    p.add_argument("--results-dir", metavar="DIR", type=Path, default=None,
                   help="where the tables go (default bench/results/; --smoke: --out-dir)")
    p.add_argument("--autotune-configs", type=int, default=2,
                   help="configs each kernel autotunes over (0: all of them)")
    p.add_argument("--deadline", type=float, default=450, help="seconds: no part starts after")
    p.add_argument("--inject-failure", choices=list(PARTS), default=None,
                   help="make that part fail after its work (checks the failure reporting)")
    p.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # child mode
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.part:
        run_part_here(args)
        return 0

    import torch

    from bench.tables import RESULTS_DIR, device_slug
    from common.atomic import write_text

    if not args.smoke and not torch.cuda.is_available():
        print("bench.gpu_check needs a CUDA GPU; --smoke checks the script on the CPU")
        return 2
    env_out = os.environ.get("OUT")
    out = args.out_dir or (Path(env_out) if env_out else None)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.smoke else RESULTS_DIR
    results = args.results_dir or (out if args.smoke else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(out / "gpu-check.log", "w") as log, tempfile.TemporaryDirectory() as work:
        header = (f"bench.gpu_check {' '.join(argv)}: parts {args.parts}, budgets "
                  f"{ {n: PARTS[n].budget_s for n in args.parts} } s, deadline {args.deadline} s, "
                  f"autotune configs {args.autotune_configs or 'all'}; python {sys.version.split()[0]}, "
                  f"torch {torch.__version__}; out {out}, results {results}")  # fmt: skip
        print(header, flush=True)
        log.write(header + "\n" + gpu_state())
        rows, status = run_parts(args, log, Path(work))
        log.write(gpu_state())
    text = render(rows, status, args, time.monotonic() - t0)
    device = next((r["device"] for part in rows.values() for r in part
                   if r.get("kind") == "env" and r["device"] != "cpu"), "cpu")  # fmt: skip
    name = f"gpu-check-{device_slug(device)}"
    jsonl = "".join(json.dumps(r) + "\n" for part in rows.values() for r in part)
    for folder in dict.fromkeys([results, out]):  # each folder once
        write_text(Path(folder) / f"{name}.md", text)
        write_text(Path(folder) / f"{name}.jsonl", jsonl)
    print("\n" + text)
    summary = text.split("\n## ")[1:3]  # Targets and Parts, last so a short tail shows them
    print("\n".join("## " + s for s in summary))
    print(f"wrote {name}.md / .jsonl to {results}" + (f" and {out}" if out != results else ""))
    return 0 if all(s["status"] == "PASS" for s in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
