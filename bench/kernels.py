"""Kernel benchmarks: our Triton attention vs SDPA and flash-attn, and the fused linear +
cross-entropy vs the plain loss.

    python -m bench.kernels                 # on a CUDA GPU: writes bench/results/kernels-<gpu>.md
    python -m bench.kernels --smoke         # no GPU: tiny shapes under TRITON_INTERPRET=1, printed
    python -m bench.kernels --compile-check # no GPU: compile for sm_90, report wgmma / spills

Attention: causal (`--causal on off` adds non-causal), bf16, head dims 64 and 128, T = 512 ..
16k, batch * T = 16k tokens and H * D = 2048 (FlashAttention's benchmark setting); ours next to
SDPA pinned to its flash and cuDNN backends, and flash-attn where installed. FLOPs as in
FlashAttention's benchmarks:
forward 4 * B * H * T^2 * D, halved when causal; backward 2.5x the forward. Peak memory is the
largest allocation above the inputs during one forward + backward.

Fused loss: N = 8192 tokens, dim 2048, vocabularies 32k .. 128k, bf16; time of forward +
backward and peak memory above the inputs, through model.loss.lm_loss (fused=False / True).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.tables import RESULTS_DIR, device_slug
from common.atomic import write_text

ATTENTION_FLOPS_NOTE = (
    "FLOPs: forward 4*B*H*T^2*D, halved when causal; backward 2.5x forward (FlashAttention's "
    "convention). Peak: memory above the inputs during one forward + backward."
)
LOSS_NOTE = "Forward + backward through model.loss.lm_loss; peak above the inputs."


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, mode: str) -> float:
    fwd = 4 * B * H * T * T * D / (2 if causal else 1)
    return fwd if mode == "fwd" else 2.5 * fwd


def bench_ms(fn: Callable[[], object], grad_to_none=None, smoke: bool = False) -> float:
    """Median milliseconds per call (triton.testing.do_bench: flushes L2, warms up)."""
    if smoke:  # the interpreter: one timed call is all we can afford
        import time

        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    import triton.testing

    return triton.testing.do_bench(
        fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"
    )


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated by fn above what was allocated before it (MiB)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _sdpa_backend(backend_name: str, causal: bool) -> Callable:
    """fn(q, k, v) running SDPA on one named backend only (torch.nn.attention.SDPBackend)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def attention_providers(causal: bool = True, smoke: bool = False) -> dict[str, Callable]:
    """name -> fn(q, k, v) for q, k, v (B, H, T, D) (flash-attn: (B, T, H, D)).

    On a GPU: ours, SDPA pinned to its FlashAttention-2 and cuDNN backends, and flash-attn
    where it is installed. --smoke (the CPU): ours and SDPA's CPU flash kernel; cuDNN too, so
    the smoke run shows how a provider that cannot run is reported."""
    from kernels.attention import attention

    providers = {
        "triton (ours)": lambda q, k, v: attention(q, k, v, causal=causal),
        "sdpa flash": _sdpa_backend("FLASH_ATTENTION", causal),
        "sdpa cudnn": _sdpa_backend("CUDNN_ATTENTION", causal),
    }
    if smoke:
        return providers
    try:
        from flash_attn import flash_attn_func

        providers["flash-attn"] = lambda q, k, v: flash_attn_func(q, k, v, causal=causal)
    except ImportError:
        pass
    return providers


def _measure_attention(fn, q, k, v, device, smoke) -> tuple[float, float, float]:
    """(forward ms, backward ms, peak MiB of forward + backward) of fn(q, k, v)."""
    fwd_ms = bench_ms(lambda: fn(q, k, v), smoke=smoke)
    out = fn(q, k, v)
    dout = torch.randn_like(out)
    bwd_ms = bench_ms(
        lambda: out.backward(dout, retain_graph=True), grad_to_none=[q, k, v], smoke=smoke
    )
    out = None  # free the graph before measuring memory
    q.grad = k.grad = v.grad = None
    mem = peak_mib(lambda: fn(q, k, v).backward(dout), device)
    q.grad = k.grad = v.grad = None
    return fwd_ms, bwd_ms, mem


def attention_row(name: str, fn: Callable, D: int, T: int, causal: bool, tokens: int,
                  width: int, device, dtype, smoke: bool) -> dict:
    """One measurement: provider `name` at head dim D, length T, batch * T = tokens and
    H * D = width. A provider that fails (out of memory, no kernel for this shape) gives a row
    with NaN numbers and the error in `note`; the traceback goes to stderr."""
    H, B = width // D, max(1, tokens // T)
    # flash-attn takes (B, T, H, D); the FLOPs are the same.
    shape = (B, T, H, D) if name == "flash-attn" else (B, H, T, D)
    nan = float("nan")
    fwd_ms = bwd_ms = mem = nan
    err = ""
    try:
        qkv = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        fwd_ms, bwd_ms, mem = _measure_attention(fn, *qkv, device, smoke)
    except torch.OutOfMemoryError:
        err = "OOM"
    except Exception as e:  # report the row and go on with the other providers
        traceback.print_exc()
        err = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    qkv = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row = {
        "provider": name, "D": D, "T": T, "B": B, "H": H, "causal": causal, "dtype": str(dtype),
        "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
        "fwd_tflops": attention_flops(B, H, T, D, causal, "fwd") / fwd_ms / 1e9,
        "bwd_tflops": attention_flops(B, H, T, D, causal, "bwd") / bwd_ms / 1e9,
        "peak_mib": mem, "note": err,
    }  # fmt: skip
    print(attention_line(row), flush=True)
    return row


def bench_attention(device, dtype, seq_lens, head_dims, tokens, width, smoke,
                    causals=(True,)) -> list[dict]:
    rows = []
    for causal in causals:
        providers = attention_providers(causal, smoke)
        for D in head_dims:
            for T in seq_lens:
                for name, fn in providers.items():
                    rows.append(attention_row(name, fn, D, T, causal, tokens, width, device,
                                              dtype, smoke))  # fmt: skip
    return rows


def _measure_loss(hidden, weight, targets, fused, device, smoke) -> tuple[float, float]:
    """(ms, peak MiB) of one forward + backward of lm_loss."""
    from model.loss import lm_loss

    def step():
        lm_loss(hidden, weight, targets, fused=fused).backward()

    ms = bench_ms(step, grad_to_none=[hidden, weight], smoke=smoke)
    hidden.grad = weight.grad = None
    mem = peak_mib(step, device)
    hidden.grad = weight.grad = None
    return ms, mem


def loss_rows(V: int, n_tokens: int, dim: int, device, dtype, smoke: bool) -> list[dict]:
    """The plain and the fused loss at vocabulary V: one row each (ms, peak MiB; NaN and the
    error in `note` when one fails)."""
    rows = []
    hidden = torch.randn(1, n_tokens, dim, device=device, dtype=dtype, requires_grad=True)
    weight = (0.02 * torch.randn(V, dim, device=device, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, V, (1, n_tokens), device=device)
    for fused in (False, True):
        ms = mem = float("nan")
        err = ""
        try:
            ms, mem = _measure_loss(hidden, weight, targets, fused, device, smoke)
        except torch.OutOfMemoryError:
            err = "OOM"
        except Exception as e:  # report the row and go on
            traceback.print_exc()
            err = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        hidden.grad = weight.grad = None
        rows.append({"V": V, "loss": "fused" if fused else "plain", "ms": ms,
                     "peak_mib": mem, "note": err, "N": n_tokens, "dim": dim,
                     "dtype": str(dtype)})  # fmt: skip
        print(f"loss V={V} {rows[-1]['loss']}: {ms:.2f} ms, peak {mem:.0f} MiB {err}", flush=True)
    del hidden, weight
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_loss(device, dtype, vocabs, n_tokens, dim, smoke) -> list[dict]:
    return [r for V in vocabs for r in loss_rows(V, n_tokens, dim, device, dtype, smoke)]


def _ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) that ptxas reports for sm_90a (Triton's own
    ptxas binary; Triton does not keep its -v output)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "kernel.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(src), "-o", str(src) + ".cubin"],
            capture_output=True, text=True,
        )  # fmt: skip
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else -1


def compile_check(head_dims: list[int], all_configs: bool = False) -> list[dict]:
    """Compile the kernels for Hopper (sm_90) without a GPU, using the ptxas that
    ships with Triton, and report what the code generator did: wgmma instructions (Hopper
    tensor cores), registers and spill stores (from ptxas -v) and shared memory. Catches kernels
    that only the interpreter accepts, and tiles that spill, before a GPU is at hand.
    Must run without TRITON_INTERPRET (the kernels must be real JIT functions)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import attention as A

    def arg_type(name: str) -> str:
        if name in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"):
            return "*bf16"
        if name in ("LSE", "DELTA"):
            return "*fp32"
        if name in ("DOC", "SEG_START", "SEG_END"):
            return "*i32"
        return "fp32" if name in ("qk_scale", "sm_scale") else "i32"

    jobs = []  # (kernel, configs)
    pick = (lambda cs: cs) if all_configs else (lambda cs: cs[:1])
    jobs.append((A._attn_fwd_kernel, pick(A._FWD_CONFIGS)))
    jobs.append((A._attn_bwd_dkdv_kernel, pick(A._attn_bwd_dkdv.gpu_configs)))
    jobs.append((A._attn_bwd_dq_kernel, pick(A._attn_bwd_dq.gpu_configs)))
    rows = []
    for D in head_dims:
        for fn, configs in jobs:
            for cfg in configs:
                consts = {"HEAD_DIM": D, "CAUSAL": True, "HAS_DOC": True, "PREC": "tf32"}
                consts.update(cfg.kwargs)
                sig = {n: "constexpr" if n in consts else arg_type(n) for n in fn.arg_names}
                options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                row = {"kernel": fn.__name__, "D": D, "config": f"{cfg.kwargs} {options}"}
                try:
                    k = triton.compile(ASTSource(fn, sig, constexprs=consts),
                                       target=GPUTarget("cuda", 90, 32), options=options)
                    ptx = k.asm["ptx"]
                    regs, spills = _ptxas_usage(ptx)
                    row.update(wgmma=ptx.count("wgmma.mma_async"), regs=regs, spills=spills,
                               shared=k.metadata.shared, error="")
                except Exception as e:  # report and go on: one bad config must not hide others
                    err = f"{type(e).__name__}: {e}"[:200]
                    row.update(wgmma=0, regs=0, spills=0, shared=0, error=err)
                rows.append(row)
                print(f"{row['kernel']} D={D} {row['config']}: wgmma {row['wgmma']}, "
                      f"registers {row['regs']}, spill stores {row['spills']} B, "
                      f"shared {row['shared']} B {row['error']}", flush=True)  # fmt: skip
    rows += _compile_other_kernels(triton, GPUTarget, ASTSource)
    return rows


def _compile_other_kernels(triton, GPUTarget, ASTSource) -> list[dict]:
    """The norm / RoPE / SwiGLU / cross-entropy / delta kernels at typical bf16 shapes: they
    must compile (no tensor cores involved)."""
    from kernels import attention, cross_entropy, rmsnorm, rope, swiglu

    bf, f32 = "*bf16", "*fp32"
    jobs = [  # (kernel, pointer/float argument types, constexprs, warps)
        (rmsnorm._rms_norm_fwd_kernel, {"X": bf, "W": f32, "Y": f32, "RSTD": f32, "eps": "fp32"},
         {"BLOCK_R": 1, "BLOCK_D": 4096}, 8),
        (rmsnorm._rms_norm_bwd_kernel, {"DY": bf, "X": bf, "W": bf, "RSTD": f32, "DX": bf,
                                        "DW_PARTIAL": f32}, {"BLOCK_R": 32, "BLOCK_D": 128}, 8),
        (rope._rope_kernel, {"X": bf, "COS": f32, "SIN": f32, "Y": bf},
         {"HALF": 64, "BLOCK_T": 32, "BLOCK_HALF": 64, "BACKWARD": True}, 4),
        (swiglu._swiglu_fwd_kernel, {"G": bf, "U": bf, "Y": bf}, {"BLOCK": 1024}, 4),
        (swiglu._swiglu_bwd_kernel, {"DY": bf, "G": bf, "U": bf, "DG": bf, "DU": bf},
         {"BLOCK": 1024}, 4),
        (cross_entropy._ce_rows_kernel, {"LOGITS": bf, "TARGETS": "*i64", "LOSS": f32,
                                         "N_VALID": f32, "z_loss": "fp32"},
         {"BLOCK_R": 1, "BLOCK_V": 4096, "COMPUTE_GRAD": True}, 8),
        (attention._bwd_delta_kernel, {"OUT": bf, "DO": bf, "DELTA": f32},
         {"HEAD_DIM": 128, "BLOCK_M": 64}, 4),
    ]  # fmt: skip
    rows = []
    for fn, types, consts, warps in jobs:
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        try:
            triton.compile(ASTSource(fn, sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": 3})  # fmt: skip
            err = ""
        except Exception as e:
            err = f"{type(e).__name__}: {e}"[:200]
        rows.append({"kernel": fn.__name__, "config": str(consts), "error": err})
        print(f"{fn.__name__} {consts}: {'compiled' if not err else err}", flush=True)
    return rows


ATTENTION_HEADER = [
    "| provider | causal | D | T | BxH | fwd TFLOP/s | bwd TFLOP/s | fwd ms | bwd ms | peak MiB "
    "| note |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
LOSS_HEADER = [
    "| V | loss | ms | peak MiB | fused / plain peak | note |",
    "|---|---|---|---|---|---|",
]


def attention_line(r: dict) -> str:
    return (
        f"| {r['provider']} | {'yes' if r['causal'] else 'no'} | {r['D']} | {r['T']} | "
        f"{r['B']}x{r['H']} | {r['fwd_tflops']:.1f} | {r['bwd_tflops']:.1f} | "
        f"{r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {r['peak_mib']:.0f} | {r['note']} |"
    )


def loss_ratio(rows: list[dict], V: int) -> float:
    """Peak memory of the fused loss over the plain loss's at vocabulary V (NaN if missing)."""
    peak = {r["loss"]: r["peak_mib"] for r in rows if r["V"] == V}
    plain, fused = peak.get("plain", float("nan")), peak.get("fused", float("nan"))
    return fused / plain if plain > 0 else float("nan")


def loss_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        ratio = f"{loss_ratio(rows, r['V']):.3f}" if r["loss"] == "fused" else ""
        lines.append(f"| {r['V']} | {r['loss']} | {r['ms']:.2f} | {r['peak_mib']:.0f} | {ratio} | "
                     f"{r['note']} |")  # fmt: skip
    return lines


def render(device_name: str, att_rows: list[dict], loss_rows: list[dict], args) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import triton

    causal = "/".join(args.causal)
    lines = [
        f"# Kernel benchmarks on {device_name}",
        "",
        f"{now}; torch {torch.__version__}, triton {triton.__version__}; "
        f"`python -m bench.kernels {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"## Attention (causal {causal}, {args.dtype}, B*T = {args.tokens} tokens, "
        f"H*D = {args.width})",
        "",
        ATTENTION_FLOPS_NOTE,
        "",
        *ATTENTION_HEADER,
        *(attention_line(r) for r in att_rows),
        "",
        f"## Fused linear + cross-entropy ({args.dtype}, N = {args.loss_tokens} tokens, "
        f"dim = {args.loss_dim})",
        "",
        LOSS_NOTE,
        "",
        *LOSS_HEADER,
        *loss_lines(loss_rows),
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.kernels", description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true",
                   help="no GPU needed: tiny shapes under TRITON_INTERPRET=1, nothing written")
    p.add_argument("--seq-lens", type=int, nargs="+",
                   default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--causal", nargs="+", choices=["on", "off"], default=["on"])
    p.add_argument("--tokens", type=int, default=16384, help="batch * seq_len per measurement")
    p.add_argument("--width", type=int, default=2048, help="heads * head_dim")
    p.add_argument("--vocabs", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--loss-tokens", type=int, default=8192)
    p.add_argument("--loss-dim", type=int, default=2048)
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--skip-loss", action="store_true")
    p.add_argument("--out", metavar="FILE", type=Path, default=None,
                   help="the results table (default: bench/results/kernels-<device>.md)")
    p.add_argument("--compile-check", action="store_true",
                   help="no GPU needed: compile the attention kernels for sm_90 and report "
                   "wgmma use and register spills (add --all-configs for every autotune config)")
    p.add_argument("--all-configs", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.compile_check:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("--compile-check needs TRITON_INTERPRET unset")
            return 2
        rows = compile_check(args.head_dims, args.all_configs)
        bad = [r for r in rows if r["error"] or r.get("wgmma") == 0]
        return 1 if bad else 0

    if args.smoke:
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before kernels/ is imported
        args.seq_lens, args.head_dims, args.tokens, args.width = [40], [32], 40, 64
        args.vocabs, args.loss_tokens, args.loss_dim, args.dtype = [300], 48, 32, "float16"
        if not torch.cuda.is_available():
            args.dtype = "float32"  # the interpreter has no bf16 matmul; fp32 is cheapest there
    elif not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (run with --smoke for an interpreter check).")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    att = [] if args.skip_attention else bench_attention(
        device, dtype, args.seq_lens, args.head_dims, args.tokens, args.width, args.smoke,
        causals=[c == "on" for c in args.causal],
    )  # fmt: skip
    loss = [] if args.skip_loss else bench_loss(
        device, dtype, args.vocabs, args.loss_tokens, args.loss_dim, args.smoke
    )  # fmt: skip
    text = render(device_name + (" (interpreter smoke run)" if args.smoke else ""), att, loss, args)
    print(text)
    if not args.smoke or args.out:
        path = args.out or RESULTS_DIR / f"kernels-{device_slug(device_name)}.md"
        write_text(path, text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
