"""Weight-only quantized matmul in Triton: y = x @ dequant(W)^T, the weights dequantized tile by
tile in registers, never written out in floating point (the point of weight-only quantization
at decode time: a token reads 1 or 1/2 byte per weight instead of 4).

Storage (model/quant.py writes it; the same on every device):

    int8   w: int8 (N, K)          y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]
           scale: (N,) float       symmetric, per output channel
    int4   w: uint8 (N, K / 2)     byte j of row n holds q[n, 2j] (low nibble), q[n, 2j + 1] (high)
           sz: (K / G, N, 2)       per group of G inputs: (scale, zero); W[n, k] =
                                   (q[n, k] - 8) * sz[k // G, n, 0] + sz[k // G, n, 1]

x: (M, K) float16 / bfloat16 / float32; the dot runs in x's dtype with an fp32 accumulator
(fp32 inputs use IEEE products, not TF32). Inference only: no backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import (
    FLOAT_DTYPES,
    LazyAutotune,
    check_device,
    check_no_bf16_dot,
    check_tensor,
)


@triton.jit
def _quant_matmul_kernel(
    X, W, S, Y,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sg, stride_sn, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(
            X + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :], other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        w_mask = k_ok[:, None] & n_ok[None, :]
        if BITS == 8:
            w_ptrs = W + offs_n[None, :] * stride_wn + k[:, None] * stride_wk
            w = tl.load(w_ptrs, mask=w_mask, other=0).to(tl.float32)  # (BLOCK_K, BLOCK_N)
        else:
            # Byte k // 2 holds column k in its low (even k) or high (odd k) nibble.
            w_ptrs = W + offs_n[None, :] * stride_wn + (k[:, None] // 2) * stride_wk
            byte = tl.load(w_ptrs, mask=w_mask, other=0).to(tl.int32)
            q = (byte >> ((k[:, None] % 2) * 4)) & 0xF
            s_ptrs = S + (k[:, None] // GROUP) * stride_sg + offs_n[None, :] * stride_sn
            scale = tl.load(s_ptrs, mask=w_mask, other=0.0).to(tl.float32)
            zero = tl.load(s_ptrs + 1, mask=w_mask, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) - 8.0) * scale + zero
        if IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if BITS == 8:
        acc = acc * tl.load(S + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_kernel = LazyAutotune(
    _quant_matmul_kernel,
    gpu_configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (16, 64, 128, 4, 3), (16, 256, 32, 8, 3),
            (64, 64, 64, 4, 3), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
        ]
    ],
    interpreter_config={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32},
    key=["M", "N", "K", "BITS", "GROUP"],
)

WHERE = "kernels.quant_matmul.quant_matmul"


def _check_inputs(x, w, s, bits: int, group: int) -> tuple[int, int]:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, where=WHERE)
    check_device(WHERE, x)
    check_no_bf16_dot(WHERE, x.dtype, x.device)
    M, K = x.shape
    if bits == 8:
        check_tensor("w", w, ndim=2, dtypes=[torch.int8], device=x.device, where=WHERE)
        N = w.shape[0]
        if w.shape[1] != K:
            raise ValueError(f"{WHERE}: x is (M, K) = {tuple(x.shape)} but w is {tuple(w.shape)}, expected (N, {K})")
        check_tensor("scale", s, ndim=1, dtypes=FLOAT_DTYPES, device=x.device, where=WHERE)
        if s.shape[0] != N:
            raise ValueError(f"{WHERE}: scale has shape {tuple(s.shape)}, expected ({N},)")
    elif bits == 4:
        check_tensor("w", w, ndim=2, dtypes=[torch.uint8], device=x.device, where=WHERE)
        N = w.shape[0]
        if group <= 0 or K % group or group % 2:
            raise ValueError(f"{WHERE}: group size {group} must be even and divide K = {K}")
        if w.shape[1] * 2 != K:
            raise ValueError(f"{WHERE}: packed w is {tuple(w.shape)}, expected (N, K / 2) = (N, {K // 2})")
        check_tensor("sz", s, ndim=3, dtypes=FLOAT_DTYPES, device=x.device, where=WHERE)
        if tuple(s.shape) != (K // group, N, 2) or s.stride(2) != 1:
            raise ValueError(
                f"{WHERE}: scales and zeros are {tuple(s.shape)} (strides {s.stride()}), expected "
                f"(K / G, N, 2) = ({K // group}, {N}, 2) contiguous in the last dimension"
            )
    else:
        raise ValueError(f"{WHERE}: bits must be 8 or 4, got {bits}")
    return M, N


@torch.compiler.disable  # Dynamo does not trace the lazily autotuned launch
def quant_matmul(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bits: int, group: int = 0):
    """x (M, K) @ dequant(w)^T -> (M, N) in x's dtype; see the module docstring for w and s."""
    M, N = _check_inputs(x, w, s, bits, group)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    s_stride = (s.stride(0), s.stride(1)) if bits == 4 else (0, s.stride(0))
    _kernel[grid](
        x, w, s, y, M, N, x.shape[1], *x.stride(), *w.stride(), *s_stride, *y.stride(),
        BITS=bits, GROUP=group if bits == 4 else 0, IEEE=x.dtype == torch.float32,
    )  # fmt: skip
    return y


def reference_quant_matmul(x, w, s, bits: int, group: int = 0) -> torch.Tensor:
    """The same product in plain PyTorch (dequantize everything, then one matmul in fp32)."""
    if bits == 8:
        return (x.float() @ w.float().T * s.float()).to(x.dtype)
    q = torch.stack([w & 0xF, w >> 4], dim=-1).flatten(1).float()  # (N, K)
    scale = s[..., 0].float().T.repeat_interleave(group, dim=1)  # (N, K)
    zero = s[..., 1].float().T.repeat_interleave(group, dim=1)
    return (x.float() @ ((q - 8) * scale + zero).T).to(x.dtype)
