"""Part 1 of bench/gpu_check.py: the GPU-only correctness checks.

Every Triton kernel in kernels/ runs compiled for real (no interpreter) against its pure-PyTorch
reference evaluated in float64 on the same inputs, forward and backward, in bf16 and fp16
(`--smoke`: fp32 and fp16 under the interpreter, whose bf16 tl.dot is wrong); MoE's
torch._grouped_mm path against its loop over experts; and the tiny model trained with
attention = "triton", the fused norm / RoPE / SwiGLU kernels and the fused loss against the same
model on SDPA with the plain loss.

Each check gives one row {check, dtype, shape, err, tol, status, note}. err is the largest
relative error ||got - ref|| / ||ref|| over the output and every input gradient (each listed in
the note). tol is about 8 unit roundoffs of the dtype (fp16 2^-11, bf16 2^-8): outputs and
gradients are rounded to the dtype once and accumulated in fp32, so the error stays a few
roundings; a wrong mask, index or tile gives O(0.1) or more. fp32 gets 1e-5 (sums of at most a
few thousand fp32 terms).
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64; inf if got has a NaN / inf (e.g. an unwritten output)."""
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def poison_allocator(device: torch.device) -> None:
    """Leave NaN-filled blocks in the CUDA caching allocator, so that an output element a
    kernel forgets to write (its buffers come from torch.empty) reads NaN instead of a stale
    right answer from an earlier check."""
    if device.type == "cuda":
        torch.full((64 * 2**20,), float("nan"), device=device)  # 256 MiB, freed at once


def float64_pairs(fn: Callable, ref_fn: Callable, inputs: list[torch.Tensor],
                  grad_of: list[int]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """[(name, got, float64 reference)] for fn's output ("out") and the gradients of
    inputs[i], i in grad_of ("d{i}"): fn on the inputs, ref_fn on float64 copies of them, the
    same random upstream gradient for both. (Also the kernel tests' comparison.)"""
    xs = [x.clone().requires_grad_(i in grad_of) for i, x in enumerate(inputs)]
    out = fn(*xs)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_xs = [x.detach().double().requires_grad_(i in grad_of) for i, x in enumerate(inputs)]
    ref = ref_fn(*ref_xs)
    ref.backward(dout.double())
    return [("out", out, ref)] + [(f"d{i}", xs[i].grad, ref_xs[i].grad) for i in grad_of]


def parity(fn: Callable, ref_fn: Callable, inputs: list[torch.Tensor], grad_of: list[int],
           device: torch.device) -> dict[str, float]:
    """Relative error of each of float64_pairs, with the allocator poisoned first."""
    poison_allocator(device)
    return {name: rel_err(got, ref) for name, got, ref in float64_pairs(fn, ref_fn, inputs, grad_of)}


# ------------------------------------------------------------------------------- the checks
# Each returns (shape text, {tensor name: error}); its dtype and tolerance come from the caller.


def doc_ids_for(B: int, T: int, device) -> torch.Tensor:
    """Row 0: packed documents numbered in order (block skipping applies); other rows: ids that
    alternate at random, so a document reappears (every block must be visited)."""
    rows = [torch.cumsum((torch.rand(T) < 0.004 * 1000 / T).long(), 0)]
    rows += [torch.randint(0, 2, (T,)) for _ in range(B - 1)]
    return torch.stack(rows).to(device)


def check_attention(B, H, Hkv, T, D, doc, causal):
    from kernels.attention import attention, reference_attention

    def run(dtype, device):
        # q as a transposed view of (B, T, H, D), like the model's projections.
        q = torch.randn(B, T, H, D, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Hkv, T, D, device=device, dtype=dtype)
        v = torch.randn(B, Hkv, T, D, device=device, dtype=dtype)
        docs = doc_ids_for(B, T, device) if doc else None
        errs = parity(lambda q, k, v: attention(q, k, v, causal=causal, doc_ids=docs),
                      lambda q, k, v: reference_attention(q, k, v, causal=causal, doc_ids=docs),
                      [q, k, v], [0, 1, 2], device)  # fmt: skip
        return dict(zip(["out", "dq", "dk", "dv"], errs.values()))

    mask = ("doc " if doc else "") + ("causal" if causal else "non-causal")
    return f"attention GQA {H}/{Hkv} {mask}", f"B={B} T={T} D={D}", run


def check_rms_norm(shape):
    from kernels.rmsnorm import reference_rms_norm, rms_norm

    def run(dtype, device):
        x = torch.randn(shape, device=device, dtype=dtype)
        w = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
        errs = parity(lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: reference_rms_norm(x, w, 1e-5),
                      [x, w], [0, 1], device)  # fmt: skip
        return dict(zip(["out", "dx", "dw"], errs.values()))

    return "RMSNorm", "x".join(map(str, shape)), run


def check_rope(B, H, T, D):
    from kernels.rope import apply_rope, reference_apply_rope
    from model.layers import rope_tables

    def run(dtype, device):
        x = torch.randn(B, T, H, D, device=device, dtype=dtype).transpose(1, 2)  # (B, H, T, D)
        cos, sin = rope_tables(D, T, 10000.0, device=device)
        errs = parity(lambda x: apply_rope(x, cos, sin),
                      lambda x: reference_apply_rope(x, cos.double(), sin.double()),
                      [x], [0], device)  # fmt: skip
        return dict(zip(["out", "dx"], errs.values()))

    return "RoPE", f"B={B} H={H} T={T} D={D}", run


def check_swiglu(shape):
    from kernels.swiglu import reference_swiglu, swiglu

    def run(dtype, device):
        gate = 3 * torch.randn(shape, device=device, dtype=dtype)  # past SiLU's knee
        up = torch.randn(shape, device=device, dtype=dtype)
        errs = parity(swiglu, reference_swiglu, [gate, up], [0, 1], device)
        return dict(zip(["out", "dgate", "dup"], errs.values()))

    return "SwiGLU", "x".join(map(str, shape)), run


def check_cross_entropy(N, dim, V):
    from kernels.cross_entropy import fused_linear_cross_entropy, reference_linear_cross_entropy

    def run(dtype, device):
        hidden = torch.randn(N, dim, device=device, dtype=dtype)
        weight = (dim**-0.5 * torch.randn(V, dim, device=device)).to(dtype)
        targets = torch.randint(0, V, (N,), device=device)
        targets[torch.rand(N, device=device) < 0.1] = -100  # ignored positions
        errs = parity(
            lambda h, w: fused_linear_cross_entropy(h, w, targets, -100, 1e-4),
            lambda h, w: reference_linear_cross_entropy(h, w, targets, -100, 1e-4),
            [hidden, weight], [0, 1], device,
        )  # fmt: skip
        return dict(zip(["loss", "dhidden", "dweight"], errs.values()))

    return "fused linear + CE (z-loss)", f"N={N} dim={dim} V={V}", run


def check_moe_grouped_mm(B, T, dim, hidden, E, k):
    """The torch._grouped_mm path against the loop over experts, both in `dtype` (autocast on
    the GPU, where grouped GEMM needs bf16), outputs and input / expert-weight gradients."""
    from model.config import model_config
    from model.moe import MoE

    def run(dtype, device):
        cfg = model_config(vocab_size=64, dim=dim, n_layers=1, n_heads=1, n_experts=E,
                           moe_top_k=k, expert_hidden=hidden, n_shared_experts=1)  # fmt: skip
        moe = MoE(cfg).to(device)
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
        with torch.no_grad():
            for p, fan_in in ((moe.w_gate, dim), (moe.w_up, dim), (moe.w_down, hidden)):
                p.copy_(torch.randn(p.shape, generator=gen) * fan_in**-0.5)
            for p in [moe.router.weight, *moe.shared.parameters()]:
                p.normal_(0.0, p.shape[1] ** -0.5)
        x = torch.randn(B, T, dim, device=device)
        autocast = device.type == "cuda" and dtype != torch.float32
        results = []
        for grouped in (True, False):
            moe.use_grouped_mm = grouped
            moe.zero_grad(set_to_none=True)
            xg = (x if autocast else x.to(dtype)).clone().requires_grad_()
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                out = moe(xg)
            out.float().square().sum().backward()
            results.append((out, xg.grad, moe.w_gate.grad))
        return {n: rel_err(a, b) for n, a, b in zip(["out", "dx", "dw_gate"], *results)}

    return "MoE grouped GEMM vs loop", f"{B}x{T} tokens dim={dim} E={E} top-{k}", run


def stdlib_bytes(n_bytes: int) -> torch.Tensor:
    """Real text for a training check: the Python standard library's source, as byte ids."""
    data = bytearray()
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= n_bytes:
            break
    return torch.frombuffer(data[:n_bytes], dtype=torch.uint8).long()


def check_tiny_model(steps, batch, T, size_overrides, fall):
    """The tiny model, attention = "triton" + fused kernels + fused loss, against SDPA + plain
    PyTorch + plain loss from the same weights on the same batches of real text (bytes of the
    standard library): the first loss and gradients agree, and `steps` AdamW steps lower the
    loss (the mean of the last 10 below `fall` times the first)."""
    from model.config import model_config
    from model.loss import lm_loss
    from model.transformer import build_model

    def train(dtype, device, attention, fused, batches):
        cfg = model_config(vocab_size=256, max_seq_len=T, attention=attention,
                           fused_kernels=fused, **size_overrides)  # fmt: skip
        model = build_model(cfg, device, seed=3)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
        autocast = device.type == "cuda" and dtype != torch.float32
        losses, grads = [], None
        for tokens in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                hidden = model(tokens[:, :-1], return_hidden=True)
                loss = lm_loss(hidden, model.output_weight, tokens[:, 1:], fused=fused)
            loss.backward()
            if grads is None:
                grads = torch.cat([p.grad.flatten().float() for p in model.parameters()])
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, grads

    def run(dtype, device):
        text = stdlib_bytes(2_000_000).to(device)
        starts = torch.randint(0, text.numel() - T - 1, (steps, batch))
        batches = [torch.stack([text[s : s + T + 1] for s in row.tolist()]) for row in starts]
        ours, g_ours = train(dtype, device, "triton", True, batches)
        ref, g_ref = train(dtype, device, "sdpa", False, batches)
        tail = sum(ours[-10:]) / len(ours[-10:])
        errs = {"loss step 1": abs(ours[0] - ref[0]) / ref[0], "grads step 1": rel_err(g_ours, g_ref)}
        note = (f"loss {ours[0]:.3f} -> {tail:.3f} (SDPA {ref[0]:.3f} -> "
                f"{sum(ref[-10:]) / len(ref[-10:]):.3f})")  # fmt: skip
        if not tail < fall * ours[0]:
            errs["loss did not fall"] = math.inf
        return errs, note

    return f"tiny model {steps} steps, triton + fused", f"{batch}x{T} bytes", run


# ------------------------------------------------------------------------------- the part


def checks(smoke: bool) -> list[tuple[str, str, Callable, list[torch.dtype]]]:
    """(name, shape, run(dtype, device), dtypes), cheap ones first. Attention on the GPU: odd T
    with GQA 4 and document masking, GQA 2 non-causal, and the exact kernel variants part 2
    times (bf16, hd 128 causal and hd 64 non-causal at T % 16 == 0), so that no benchmark
    number comes from an unchecked kernel; each new variant costs Triton compiles."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    half = [fp32, fp16] if smoke else [bf16, fp16]  # the interpreter's bf16 tl.dot is wrong
    moe_dtype = [fp32] if smoke else [bf16]  # grouped GEMM: bf16 on sm90
    if smoke:
        attn = [((2, 4, 2, 37, 32, True, True), half), ((1, 2, 1, 33, 16, False, False), half)]
        others = [check_rms_norm((3, 17, 64)), check_rope(2, 2, 21, 16),
                  check_swiglu((3, 41, 96)), check_cross_entropy(100, 64, 200)]  # fmt: skip
        moe = check_moe_grouped_mm(2, 5, 16, 24, 6, 2)
        model = check_tiny_model(3, 2, 32, dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1), 1.0)
    else:
        attn = [((2, 8, 2, 999, 128, True, True), half), ((2, 8, 4, 1024, 64, False, False), half),
                ((1, 16, 16, 2048, 128, False, True), [bf16])]  # fmt: skip
        others = [check_rms_norm((4, 999, 2048)), check_rope(2, 16, 999, 128),
                  check_swiglu((4, 999, 2816)), check_cross_entropy(4096, 1024, 50257)]  # fmt: skip
        moe = check_moe_grouped_mm(4, 1024, 1024, 1024, 16, 2)
        model = check_tiny_model(100, 16, 256, dict(size="tiny"), 0.7)
    out = [(*c, half) for c in others] + [(*moe, moe_dtype), (*model, moe_dtype)]
    return out + [(*check_attention(*a), dtypes) for a, dtypes in attn]


def run_correctness(device: torch.device, smoke: bool, emit: Callable[[dict], None],
                    time_left: Callable[[], float]) -> None:
    """Run every check in every dtype, emitting one row each; a failing check is a FAIL row
    (traceback on stderr) and the others still run; once the budget is spent, SKIP rows."""
    for name, shape, run, dtypes in checks(smoke):
        for dtype in dtypes:
            row = {"check": name, "dtype": SHORT[dtype], "shape": shape, "tol": TOL[dtype],
                   "err": math.nan, "note": ""}  # fmt: skip
            if time_left() <= 0:
                emit({**row, "status": "SKIP", "note": "time budget spent"})
                continue
            seed = int(torch.randint(0, 2**31, ()).item())
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            try:
                result = run(dtype, device)
                errs, extra = result if isinstance(result, tuple) else (result, "")
                row["err"] = max(errs.values())
                row["status"] = "PASS" if row["err"] <= row["tol"] else "FAIL"
                detail = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
                row["note"] = "; ".join(x for x in (detail, extra) if x)
            except Exception as e:
                traceback.print_exc()
                row["status"] = "FAIL"
                row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            row["note"] += f"; seed {seed}; {time.perf_counter() - t0:.1f} s"
            print(f"{row['status']} {name} {row['dtype']} {shape}: error {row['err']:.1e} "
                  f"(tol {row['tol']:.0e}) {row['note']}", flush=True)  # fmt: skip
            emit(row)
