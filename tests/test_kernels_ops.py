"""RMSNorm, RoPE, SwiGLU and the fused linear + cross-entropy against float64 references.

Inputs are fresh random tensors each run (the seed is printed). fp32 kernels are compared with
the float64 reference at 1e-5 .. 1e-4 (a handful of fp32 roundings per element, sums over at
most a few hundred terms); fp16 forwards at 1e-2 (fp16 eps 9.8e-4 on O(1) values).
"""


import pytest
import torch

from bench.gpu_correctness import float64_pairs
from kernels.cross_entropy import (
    default_chunk_size,
    fused_linear_cross_entropy,
    reference_linear_cross_entropy,
)
from kernels.rmsnorm import reference_rms_norm, rms_norm
from kernels.rope import apply_rope, reference_apply_rope
from kernels.swiglu import reference_swiglu, swiglu
from model.layers import RMSNorm, rope_tables
from model.layers import apply_rope as model_apply_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def check_grads(fn, ref_fn, inputs, seed, atol, rtol, grad_of=None):
    """Forward and gradients of fn vs ref_fn evaluated in float64 on the same inputs."""
    grad_of = list(range(len(inputs))) if grad_of is None else grad_of
    for name, got, want in float64_pairs(fn, ref_fn, inputs, grad_of):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n} seed={seed}: {m}")  # fmt: skip


# ------------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("shape", [(2, 37, 48), (130, 64)])
def test_rms_norm_fp32(shape, seed):
    x = torch.randn(shape, device=DEVICE)
    w = 1 + 0.3 * torch.randn(shape[-1], device=DEVICE)
    check_grads(lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: reference_rms_norm(x, w, 1e-5),
                [x, w], seed, atol=1e-4, rtol=1e-4)  # fmt: skip


def test_rms_norm_transposed_view_matches_module(seed):
    """qk-norm input: a (B, H, T, D) transposed view; same result as the model's module."""
    x = torch.randn(2, 21, 3, 32, device=DEVICE).transpose(1, 2)
    module = RMSNorm(32, 1e-6).to(DEVICE)
    with torch.no_grad():
        module.weight.copy_(1 + 0.1 * torch.randn(32))
    torch.testing.assert_close(rms_norm(x, module.weight, 1e-6), module(x), atol=1e-5, rtol=1e-5)


def test_rms_norm_fp16(seed):
    x = torch.randn(3, 17, 64, device=DEVICE, dtype=torch.float16)
    w = (1 + 0.3 * torch.randn(64, device=DEVICE)).half()
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float16
    ref = reference_rms_norm(x.double(), w.double(), 1e-5)
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("D,per_batch", [(16, False), (64, True)])
def test_rope(D, per_batch, seed):
    B, H, T = 2, 3, 37
    x = torch.randn(B, T, H, D, device=DEVICE).transpose(1, 2)  # (B, H, T, D) view
    cos, sin = rope_tables(D, 64, 10000.0, device=DEVICE)
    cos, sin = cos[:T], sin[:T]
    if per_batch:  # (B, T, D): each sequence from its own offset
        cos = torch.stack([cos, torch.roll(cos, 5, 0)])
        sin = torch.stack([sin, torch.roll(sin, 5, 0)])
    check_grads(lambda x: apply_rope(x, cos, sin),
                lambda x: reference_apply_rope(x, cos.double(), sin.double()),
                [x], seed, atol=1e-5, rtol=1e-5)  # fmt: skip
    # The same as the model's PyTorch path, and the output keeps the input's memory layout.
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out, model_apply_rope(x, cos, sin), atol=1e-6, rtol=1e-6)
    assert out.stride() == x.stride()


def test_rope_fp16(seed):
    x = torch.randn(1, 2, 33, 32, device=DEVICE, dtype=torch.float16)
    cos, sin = rope_tables(32, 33, 10000.0, device=DEVICE)
    out = apply_rope(x, cos, sin)
    ref = reference_apply_rope(x.double(), cos.double(), sin.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------- SwiGLU


def test_swiglu(seed):
    gate, up = torch.randn(3, 41, 96, device=DEVICE) * 3, torch.randn(3, 41, 96, device=DEVICE)
    check_grads(swiglu, reference_swiglu, [gate, up], seed, atol=1e-5, rtol=1e-5)
    g16, u16 = gate.half(), up.half()
    out = swiglu(g16, u16)
    torch.testing.assert_close(out.double(), reference_swiglu(g16.double(), u16.double()),
                               atol=1e-2, rtol=1e-2)  # fmt: skip


# ------------------------------------------------------------------ fused linear cross-entropy


def ce_inputs(N=100, dim=64, V=200):
    hidden = torch.randn(N, dim, device=DEVICE)
    weight = 0.3 * torch.randn(V, dim, device=DEVICE)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    targets[torch.rand(N, device=DEVICE) < 0.2] = -100  # ignored positions (padding, masks)
    return hidden, weight, targets


@pytest.mark.parametrize("z_loss,chunk", [(0.0, None), (1e-3, 7)])
def test_fused_linear_cross_entropy(z_loss, chunk, seed):
    # V = 200 is not a multiple of the row kernel's block; chunk 7 leaves a partial last chunk.
    hidden, weight, targets = ce_inputs()
    check_grads(
        lambda h, w: fused_linear_cross_entropy(h, w, targets, -100, z_loss, chunk_size=chunk),
        lambda h, w: reference_linear_cross_entropy(h, w, targets, -100, z_loss),
        [hidden, weight], seed, atol=1e-5, rtol=1e-5,
    )  # fmt: skip


def test_fused_linear_cross_entropy_no_grad_and_edge_cases(seed):
    hidden, weight, targets = ce_inputs(N=40, V=130)
    with torch.no_grad():  # forward-only path (no gradient matmuls) gives the same loss
        loss = fused_linear_cross_entropy(hidden, weight, targets)
    ref = reference_linear_cross_entropy(hidden.double(), weight.double(), targets)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    # Only ignored targets: 0 (PyTorch returns nan), with zero gradients.
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, torch.full_like(targets, -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max().item() == 0.0
    # fp16 forward against the float64 loss of the same fp16 inputs.
    loss16 = fused_linear_cross_entropy(hidden.half(), weight.half(), targets)
    ref16 = reference_linear_cross_entropy(hidden.half().double(), weight.half().double(), targets)
    torch.testing.assert_close(loss16.double(), ref16, atol=1e-2, rtol=1e-2)
    assert 1 <= default_chunk_size(8192, 131072, 4096) <= 8192


def test_fused_linear_cross_entropy_autocast(seed):
    """Under autocast the matmuls run in the autocast dtype (like F.linear) and the gradients
    come back in the parameters' fp32."""
    hidden, weight, targets = ce_inputs(N=40, V=130)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss = fused_linear_cross_entropy(h, w, targets)
        ref = reference_linear_cross_entropy(hidden, weight, targets)  # autocast F.linear too
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)  # same fp16 logits both ways


@gpu
@needs_cuda
def test_ops_bf16_gpu(seed):
    # bf16 (eps 7.8e-3) on realistic widths: 3e-2 relative/absolute.
    x = torch.randn(4, 300, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(rms_norm(x, w, 1e-5).double(),
                               reference_rms_norm(x.double(), w.double(), 1e-5),
                               atol=3e-2, rtol=3e-2)  # fmt: skip
    g, u = x, torch.randn_like(x)
    torch.testing.assert_close(swiglu(g, u).double(), reference_swiglu(g.double(), u.double()),
                               atol=3e-2, rtol=3e-2)  # fmt: skip
    hidden = torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16)
    weight = 0.05 * torch.randn(32000, 512, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 32000, (1000,), device="cuda")
    loss = fused_linear_cross_entropy(hidden, weight, targets)
    ref = reference_linear_cross_entropy(hidden.double(), weight.double(), targets)
    torch.testing.assert_close(loss.double(), ref, atol=3e-2, rtol=1e-2)
