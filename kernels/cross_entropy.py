"""Fused linear + cross-entropy: the loss of `hidden @ weight.T` without the (N, V) logits.

    loss = sum_i [lse_i - logit_i[target_i] + z_loss * lse_i^2] / n_valid     (i: valid rows)

where lse_i = logsumexp(logit_i) and rows whose target is `ignore_index` count for nothing.

The tokens are processed in chunks of C rows (Liger-Kernel's scheme). For each chunk the
(C, V) logits are computed with a torch matmul; a Triton program per row (per block of rows
under the interpreter) then makes two passes over the row: an online max / sum-of-exponentials
gives lse and the row's loss, and the second pass overwrites the logits in place with
d loss / d logits,

    (softmax - onehot(target)) / n_valid + z_loss * 2 * lse * softmax / n_valid,

so the chunk's gradients for hidden (C, dim) and weight (V, dim) follow from two more matmuls
while the chunk is still in memory. The forward therefore already holds the gradients; the
backward only scales them by the incoming scalar gradient. Peak extra memory is one (C, V)
chunk plus the (V, dim) weight gradient instead of several (N, V) fp32 tensors.

Dtypes: hidden and weight fp16 / bf16 / fp32. The matmuls run in autocast's dtype when autocast
is on (as F.linear would), else in hidden's dtype (the weight is cast if it differs). The
weight gradient is accumulated in fp32 when the weight is fp32, in the weight's dtype
otherwise. With no valid target at all the loss is 0 (PyTorch's cross_entropy returns nan).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (
    FLOAT_DTYPES,
    check_device,
    check_no_bf16_dot,
    check_tensor,
    interpreting,
)
from model.loss import default_chunk_size  # noqa: F401 - one heuristic, re-exported


@triton.jit
def _ce_rows_kernel(
    LOGITS, stride_row, TARGETS, LOSS, N_VALID, N, V, ignore_index, z_loss,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows of the chunk: writes LOSS[rows]; with COMPUTE_GRAD overwrites the rows'
    logits with the gradient of the mean loss."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < N
    base = LOGITS + rows[:, None] * stride_row  # (BLOCK_R, 1) row pointers
    target = tl.load(TARGETS + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = target != ignore_index

    # Pass 1: per-lane running max and sum of exp (finite -1e30 start: masked lanes add 0).
    m_vec = tl.full([BLOCK_R, BLOCK_V], -1.0e30, dtype=tl.float32)
    s_vec = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (offs[None, :] < V)
        x = tl.load(base + offs[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        s_vec = s_vec * tl.exp(m_vec - m_new) + tl.exp(x - m_new)
        m_vec = m_new
    m = tl.max(m_vec, 1)  # (BLOCK_R,)
    total = tl.sum(s_vec * tl.exp(m_vec - m[:, None]), 1)
    # Rows past N (never stored) are all -inf: keep their lse finite (0).
    lse = tl.where(row_ok, m + tl.log(tl.where(row_ok, total, 1.0)), 0.0)

    safe_target = tl.where(valid, target, 0)
    x_target = tl.load(LOGITS + rows * stride_row + safe_target, mask=row_ok, other=0.0)
    loss = lse - x_target.to(tl.float32) + z_loss * lse * lse
    tl.store(LOSS + rows, tl.where(valid, loss, 0.0), mask=row_ok)

    if COMPUTE_GRAD:
        # Pass 2: d loss / d logits, in place. Ignored rows get exact zeros.
        scale = tl.where(valid, 1.0 / tl.load(N_VALID), 0.0)  # (BLOCK_R,)
        p_scale = scale * (1.0 + 2.0 * z_loss * lse)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (offs[None, :] < V)
            x = tl.load(base + offs[None, :], mask=ok, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse[:, None]) * p_scale[:, None]
            grad -= tl.where(offs[None, :] == target[:, None], scale[:, None], 0.0)
            tl.store(base + offs[None, :], grad.to(LOGITS.dtype.element_ty), mask=ok)


def _tiles(V: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps) for the row kernel."""
    if interpreting():
        return 32, 64, 1  # many rows per program (it pays per program), several blocks per row
    block = min(triton.next_power_of_2(V), 4096)
    return 1, block, 8 if block >= 2048 else 4


WHERE = "kernels.cross_entropy.fused_linear_cross_entropy"


def _check_inputs(hidden, weight, targets, chunk_size) -> None:
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES, where=WHERE)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device, where=WHERE)
    check_tensor("targets", targets, ndim=1, device=hidden.device, where=WHERE)
    check_device(WHERE, hidden)
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"{WHERE}: targets must be an integer tensor, got {targets.dtype}")
    N, dim = hidden.shape
    V, wdim = weight.shape
    if wdim != dim:
        raise ValueError(
            f"{WHERE}: weight has shape {tuple(weight.shape)}, expected (V, dim) with dim = {dim} "
            f"from hidden {tuple(hidden.shape)}"
        )
    if targets.shape[0] != N:
        raise ValueError(
            f"{WHERE}: targets has {targets.shape[0]} entries but hidden has {N} rows"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{WHERE}: chunk_size must be >= 1, got {chunk_size}")


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, z_loss, chunk, grad_enabled, dtype):
        N, dim = hidden.shape
        V = weight.shape[0]
        w = weight.to(dtype)  # (V, dim); a no-op unless autocast-style mixed dtypes
        targets = targets.contiguous()
        valid = targets != ignore_index
        bad = valid & ((targets < 0) | (targets >= V))
        if bool(bad.any()):  # one host sync per loss: cheap next to the matmuls
            raise ValueError(f"{WHERE}: targets must be in [0, {V}) or ignore_index={ignore_index}")
        n_valid = valid.sum().clamp(min=1).to(torch.float32)  # (,) stays on the device
        # Gradients are computed here, in the forward, unless nobody will ask for them.
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc_dtype = torch.float32 if weight.dtype == torch.float32 else dtype
        grad_w = torch.zeros(V, dim, dtype=acc_dtype, device=weight.device) if need_w else None
        loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
        block_r, block_v, warps = _tiles(V)
        for start in range(0, N, chunk):
            end = min(start + chunk, N)
            h = hidden[start:end].to(dtype)  # (C, dim)
            logits = h @ w.T  # (C, V); becomes d loss / d logits in place
            _ce_rows_kernel[(triton.cdiv(end - start, block_r),)](
                logits, logits.stride(0), targets[start:end], loss_rows[start:end], n_valid,
                end - start, V, ignore_index, float(z_loss),
                BLOCK_R=block_r, BLOCK_V=block_v, COMPUTE_GRAD=need_h or need_w, num_warps=warps,
            )  # fmt: skip
            if grad_h is not None:
                if grad_h.dtype == dtype:
                    torch.mm(logits, w, out=grad_h[start:end])  # (C, V) @ (V, dim)
                else:
                    grad_h[start:end] = logits @ w
            if grad_w is not None:
                if grad_w.dtype == dtype:
                    grad_w.addmm_(logits.T, h)  # (V, C) @ (C, dim)
                else:  # fp32 accumulator for a half-precision chunk product
                    grad_w.add_(logits.T @ h)
            del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss_rows.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = dw = None
        if grad_h is not None:
            dh = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            dw = (grad_w * grad_out.to(grad_w.dtype)).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None, None


# Run eagerly under torch.compile: Dynamo does not trace the lazily autotuned launches.
@torch.compiler.disable
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T over targets != ignore_index, plus
    z_loss * mean(logsumexp(logits)^2) over the same rows, without materializing the logits.

    hidden: (N, dim); weight: (V, dim); targets: (N,) integer ids. Returns a scalar fp32 tensor.
    chunk_size: rows per chunk (default: default_chunk_size(N, V, dim)).
    """
    _check_inputs(hidden, weight, targets, chunk_size)
    N, dim = hidden.shape
    chunk = chunk_size or default_chunk_size(N, weight.shape[0], dim)
    # Matmul dtype: autocast's when it is on (as F.linear would use), else hidden's. The
    # Function then runs with autocast off so every dtype inside is explicit.
    device_type = hidden.device.type
    dtype = hidden.dtype
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    check_no_bf16_dot(WHERE, dtype, hidden.device)
    with torch.autocast(device_type, enabled=False):
        return _FusedLinearCrossEntropy.apply(
            hidden, weight, targets, int(ignore_index), float(z_loss), int(chunk),
            torch.is_grad_enabled(), dtype,
        )  # fmt: skip


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """The plain loss (model.loss.lm_loss with fused=False) on flattened inputs."""
    logits = hidden @ weight.T
    logits = logits.float() if logits.dtype != torch.float64 else logits  # (N, V)
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index)
    if z_loss:
        valid = targets != ignore_index
        loss = loss + z_loss * torch.logsumexp(logits[valid], dim=-1).pow(2).mean()
    return loss
