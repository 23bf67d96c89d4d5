"""SwiGLU activation in Triton: out = silu(gate) * up, silu(g) = g * sigmoid(g).

One elementwise pass forward (fp32 math, cast to the input dtype) instead of PyTorch's three
kernels and one intermediate tensor. Backward, with s = sigmoid(gate):

    dgate = dout * up * s * (1 + gate * (1 - s)),   dup = dout * silu(gate)

recomputing s from gate rather than saving it. gate and up: same shape, dtype and device; they
are flattened (a copy only if not contiguous).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_device, check_tensor, interpreting


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=ok)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=ok)


def _block() -> int:
    return 8192 if interpreting() else 1024  # the interpreter pays per program


WHERE = "kernels.swiglu.swiglu"


def _check_inputs(gate, up) -> None:
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES, where=WHERE)
    check_tensor("up", up, dtypes=FLOAT_DTYPES, device=gate.device, where=WHERE)
    check_device(WHERE, gate)
    if gate.shape != up.shape:
        raise ValueError(f"{WHERE}: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if gate.dtype != up.dtype:
        raise TypeError(f"{WHERE}: gate is {gate.dtype} but up is {up.dtype}")


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, _block()),)](gate, up, y, n, BLOCK=_block())
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, _block()),)](
                dy, gate, up, dgate, dup, n, BLOCK=_block()
            )
        return dgate, dup


# Run eagerly under torch.compile: Dynamo does not trace the lazily autotuned launches.
@torch.compiler.disable
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up of the same shape and dtype."""
    _check_inputs(gate, up)
    return _SwiGLU.apply(gate, up)


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up
