"""Fused RMSNorm in Triton, with the semantics of model.layers.RMSNorm (Hugging Face Llama):

    y = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)

The output dtype follows PyTorch's promotion of (weight.dtype, x.dtype), as in the module.
Forward: each program keeps BLOCK_R whole rows (D <= 65536) in registers and saves the per-row
rstd (fp32) for the backward. Backward, with x_hat = x * rstd and g = dy * weight:

    dx = rstd * (g - x_hat * mean(g * x_hat)),   dweight = sum over rows of dy * x_hat

(the cast of x_hat to x.dtype is treated as the identity). dweight is reduced in two steps:
each of P persistent programs sums its rows into a (P, D) fp32 buffer, then torch sums the P
partials, which avoids atomics and is deterministic.

x may have any shape (..., D) and layout; it is flattened to (N, D) rows (a copy only when the
rows are not evenly strided).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (
    FLOAT_DTYPES,
    check_device,
    check_tensor,
    interpreting,
    num_programs_hint,
)

MAX_DIM = 65536


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD, stride_x, stride_y, N, D, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows per program: a (BLOCK_R, BLOCK_D) tile, whole rows in registers."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols[None, :] < D)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)  # (BLOCK_R,)
    # Round the normalized row to x's dtype before the weight, like the PyTorch module.
    x_hat = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = w[None, :] * x_hat
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, N, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program p handles row tiles p, p + P, p + 2P, ...; writes its dweight partial to row p."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(N, BLOCK_R), n_prog):
        rows = (tile * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # int64: N * D may pass 2^31
        row_ok = rows < N
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x.to(tl.float32) * rstd[:, None]
        dy = dy.to(tl.float32)
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, 1) / D)[:, None])
        dx_ptrs = DX + rows[:, None] * stride_dx + cols[None, :]
        tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * x_hat  # rows past N were loaded as 0
    tl.store(DW_PARTIAL + pid.to(tl.int64) * D + cols, tl.sum(dw, 0), mask=col_ok)


def _tiles(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): whole rows, several per program when rows are short (the
    interpreter runs programs one at a time, so it gets big tiles)."""
    block_d = triton.next_power_of_2(D)
    budget = 1 << 14 if interpreting() else 1 << 12  # elements per tile
    block_r = max(1, min(64, budget // block_d))
    warps = min(max(block_r * block_d // 512, 1), 16)
    return block_r, block_d, warps


WHERE = "kernels.rmsnorm.rms_norm"


def _check_inputs(x, weight, eps) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, where=WHERE)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device, where=WHERE)
    check_device(WHERE, x)
    if x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"{WHERE}: x's last dimension ({tuple(x.shape)}) must equal weight's length "
            f"({weight.shape[0]})"
        )
    if weight.shape[0] > MAX_DIM:
        raise ValueError(f"{WHERE}: dimension {weight.shape[0]} exceeds the supported {MAX_DIM}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{WHERE}: eps must be a non-negative number, got {eps!r}")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        D = x.shape[-1]
        x2 = x.reshape(-1, D)  # (N, D)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        N = x2.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(N, D, dtype=out_dtype, device=x.device)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        block_r, block_d, warps = _tiles(D)
        if N:
            _rms_norm_fwd_kernel[(triton.cdiv(N, block_r),)](
                x2, weight, y, rstd, x2.stride(0), y.stride(0), N, D, float(eps),
                BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
            )  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        N, D = x2.shape
        dy = dy.reshape(N, D)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx = torch.empty(N, D, dtype=x2.dtype, device=x2.device)
        block_r, block_d, warps = _tiles(D)
        n_prog = max(1, min(triton.cdiv(N, block_r), num_programs_hint(x2.device)))
        dw_partial = torch.empty(n_prog, D, dtype=torch.float32, device=x2.device)
        if N:
            _rms_norm_bwd_kernel[(n_prog,)](
                dy, x2, weight, rstd, dx, dw_partial, dy.stride(0), x2.stride(0), dx.stride(0),
                N, D, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
            )  # fmt: skip
            dw = dw_partial.sum(0).to(weight.dtype)
        else:
            dw = torch.zeros_like(weight)
        return dx.view(ctx.x_shape), dw, None


# Run eagerly under torch.compile: Dynamo does not trace the lazily autotuned launches.
@torch.compiler.disable
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension. x: (..., D); weight: (D,). Same shape as x; dtype
    promote_types(x.dtype, weight.dtype), as the PyTorch module."""
    _check_inputs(x, weight, eps)
    return _RMSNorm.apply(x, weight, float(eps))


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The PyTorch module's computation (model.layers.RMSNorm.forward)."""
    dtype = x.dtype
    xf = x.float() if dtype != torch.float64 else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)
