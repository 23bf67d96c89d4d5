"""Rotary position embedding in Triton, Hugging Face "rotate halves" convention
(model.layers.apply_rope): with x = [x1, x2] split at D/2,

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = [-x2, x1]
    out1 = x1 * cos1 - x2 * sin1,           out2 = x2 * cos2 + x1 * sin2

computed in fp32 and cast back to x.dtype. The map is linear in x, so the backward applies its
transpose (for the usual tables with cos1 = cos2, sin1 = sin2 this is the rotation by -sin):

    dx1 = dy1 * cos1 + dy2 * sin2,          dx2 = dy2 * cos2 - dy1 * sin1

x: (B, H, T, D) with any strides (e.g. a `.transpose(1, 2)` view); the output has x's memory
layout. cos, sin: (T, D) shared by the batch, or (B, T, D) per sequence; any float dtype
(converted to fp32). One program handles BLOCK_T positions of one (batch, head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_device, check_tensor, interpreting


@triton.jit
def _rope_kernel(
    X, COS, SIN, Y,
    stride_xb, stride_xh, stride_xt, stride_xd,
    stride_yb, stride_yh, stride_yt, stride_yd,
    stride_cb, stride_ct,
    H, T,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, BLOCK_HALF)
    ok = (offs_t[:, None] < T) & (offs_j[None, :] < HALF)  # (BLOCK_T, BLOCK_HALF)

    x_ptrs = X + b * stride_xb + h * stride_xh + offs_t[:, None] * stride_xt
    x1 = tl.load(x_ptrs + offs_j[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + (offs_j[None, :] + HALF) * stride_xd, mask=ok, other=0.0)
    x2 = x2.to(tl.float32)
    c_ptrs = b * stride_cb + offs_t[:, None] * stride_ct + offs_j[None, :]  # tables: (.., T, D)
    cos1 = tl.load(COS + c_ptrs, mask=ok, other=0.0)
    cos2 = tl.load(COS + c_ptrs + HALF, mask=ok, other=0.0)
    sin1 = tl.load(SIN + c_ptrs, mask=ok, other=0.0)
    sin2 = tl.load(SIN + c_ptrs + HALF, mask=ok, other=0.0)
    if BACKWARD:  # x holds dy; apply the transpose of the forward map
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    y_ptrs = Y + b * stride_yb + h * stride_yh + offs_t[:, None] * stride_yt
    tl.store(y_ptrs + offs_j[None, :] * stride_yd, y1.to(Y.dtype.element_ty), mask=ok)
    tl.store(y_ptrs + (offs_j[None, :] + HALF) * stride_yd, y2.to(Y.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool):
    B, H, T, D = x.shape
    y = torch.empty_like(x)  # keeps x's layout when x is dense (e.g. a transposed view)
    block_t = 64 if interpreting() else 32  # the interpreter pays per program
    stride_cb = cos.stride(0) if cos.dim() == 3 else 0
    grid = (triton.cdiv(T, block_t), B * H)
    _rope_kernel[grid](
        x, cos, sin, y, *x.stride(), *y.stride(), stride_cb, cos.stride(-2), H, T,
        HALF=D // 2, BLOCK_T=block_t, BLOCK_HALF=triton.next_power_of_2(D // 2),
        BACKWARD=backward, num_warps=4,
    )  # fmt: skip
    return y


WHERE = "kernels.rope.apply_rope"


def _check_inputs(x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES, where=WHERE)
    check_device(WHERE, x)
    B, H, T, D = x.shape
    if D % 2:
        raise ValueError(f"{WHERE}: head dim must be even for rotate-halves RoPE, got {D}")
    tables = []
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=(2, 3), device=x.device, where=WHERE)
        if not t.dtype.is_floating_point:
            raise TypeError(f"{WHERE}: {name} must be a float tensor, got {t.dtype}")
        want = (T, D) if t.dim() == 2 else (B, T, D)
        if tuple(t.shape) != want:
            raise ValueError(
                f"{WHERE}: {name} has shape {tuple(t.shape)}, expected (T, D) = ({T}, {D}) or "
                f"(B, T, D) = ({B}, {T}, {D}) for x of shape {tuple(x.shape)}"
            )
        tables.append(t.to(torch.float32).contiguous())
    if cos.shape != sin.shape:
        raise ValueError(f"{WHERE}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    return tables[0], tables[1]


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, backward=True), None, None


# Run eagerly under torch.compile: Dynamo does not trace the lazily autotuned launches.
@torch.compiler.disable
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D) or (B, T, D). Returns x rotated, same shape and dtype.
    The tables get no gradient."""
    cos, sin = _check_inputs(x, cos, sin)
    return _Rope.apply(x, cos, sin)


def reference_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.layers.apply_rope's PyTorch path (computed in x's dtype when it is float64)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    xf = x if x.dtype == torch.float64 else x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
