"""Fused attention in Triton, FlashAttention-2 style: causal, grouped-query, document masking.

    out = softmax(q k^T * sm_scale + mask) v        q: (B, H, T, D), k, v: (B, Hkv, T, D)

Forward: one program per (query block, batch * head). It streams key/value blocks through an
online softmax (running max m, running sum l, unnormalized accumulator), so no T x T matrix ever
exists, and saves lse = m + log2(l) per query row for the backward. Scores are kept in base 2
(the scale is multiplied by log2(e)) so the kernel uses exp2. Under the causal mask the key
blocks strictly left of the diagonal need no mask at all: they run in a separate, unmasked loop,
and the diagonal blocks run in a second, masked loop; blocks right of the diagonal are skipped.

Backward: delta = rowsum(out * dout) (a small kernel), then
  - one program per (key block, batch * kv head) recomputes P^T block by block and accumulates
    dK, dV in registers, looping over the query heads of its GQA group, so dK/dV need neither
    atomics nor repeated K/V;
  - one program per (query block, batch * head) recomputes P and accumulates dQ.
With P = exp2(S2 - lse), dS = P * (dP - delta), dP = dO V^T:
  dV = P^T dO,  dK = sm_scale dS^T Q,  dQ = sm_scale dS K.

GQA: query head h reads kv head h // (H // Hkv). Document masking: doc_ids (B, T) integer ids;
query i sees key j only when doc_ids[i] == doc_ids[j] (and j <= i when causal). When a row's ids
never decrease (packed documents numbered in order), whole key blocks before the query block's
document are skipped; otherwise every key block is visited and masked element-wise.

Layout: q, k, v may have any strides over (B, H, T) (e.g. `.transpose(1, 2)` views of
(B, T, H, D) projections); the head dimension must be contiguous (stride 1). The output has the
(B, T, H, D) memory layout, returned as a (B, H, T, D) view, so the caller's
`out.transpose(1, 2).reshape(B, T, H * D)` is free.

Dtypes: float16 / bfloat16 on CUDA; float32 also works (tf32 matmuls on a GPU). Under
TRITON_INTERPRET=1 (CPU tests) use float32 or float16: the interpreter's bf16 matmul is wrong.
Head dims: 16, 32, 64, 128, 256.
"""

from __future__ import annotations

import math

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

HEAD_DIMS = (16, 32, 64, 128, 256)
LOG2E = 1.4426950408889634


def supports_head_dim(head_dim: int) -> bool:
    """Whether the kernel takes this head dim (tl.arange needs a power of two; the launcher
    checks it too). model.attention = "auto" falls back to SDPA for the others."""
    return head_dim in HEAD_DIMS

# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, doc_q, offs_m,
    k_base, v_base, stride_kt, stride_vt, doc_base,
    T, lo, hi, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, KEY_BOUNDS: tl.constexpr, HAS_DOC: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [lo, hi). q: (BLOCK_M, D); acc: (BLOCK_M, D) fp32."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N)
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, D)
        if KEY_BOUNDS:
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < T, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N) scores in log2 units
        if CAUSAL_MASK:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        if KEY_BOUNDS:
            s = tl.where(offs_n[None, :] < T, s, float("-inf"))
        if HAS_DOC:
            doc_k = tl.load(doc_base + offs_n, mask=offs_n < T, other=-1)
            s = tl.where(doc_q[:, None] == doc_k[None, :], s, float("-inf"))
        # m_i starts at -1e30 (finite), so a row whose block is fully masked gets p = 0 and
        # alpha = 1 instead of exp2(-inf - -inf) = nan.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # Accumulate straight into acc (the MMA's accumulator operand).
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, DOC, SEG_START, SEG_END,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, T, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Under the causal mask the last query blocks do the most work: launch them first so the
    # short blocks fill the tail of the grid.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hkv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    doc_base = DOC + b * T

    lo = 0
    hi = T
    doc_q = offs_m  # placeholder when there is no document mask (unused)
    if HAS_DOC:
        doc_q = tl.load(doc_base + offs_m, mask=row_ok, other=-2)
        # First key of the first query's document (0 when ids are not sorted), block-aligned.
        lo = (tl.load(SEG_START + b * T + start_m) // BLOCK_N) * BLOCK_N
        hi = tl.load(SEG_END + b * T + tl.minimum(start_m + BLOCK_M, T) - 1)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        # Keys left of the diagonal block: every (query, key) pair is causal and in bounds.
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, doc_q, offs_m, k_base, v_base, stride_kt, stride_vt, doc_base,
            T, lo, start_m, qk_scale, BLOCK_N, HEAD_DIM, False, False, HAS_DOC, PREC,
        )  # fmt: skip
        # The diagonal block(s): causal mask and the sequence tail.
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, doc_q, offs_m, k_base, v_base, stride_kt, stride_vt, doc_base,
            T, start_m, tl.minimum(start_m + BLOCK_M, T), qk_scale,
            BLOCK_N, HEAD_DIM, True, True, HAS_DOC, PREC,
        )  # fmt: skip
    else:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, doc_q, offs_m, k_base, v_base, stride_kt, stride_vt, doc_base,
            T, lo, hi, qk_scale, BLOCK_N, HEAD_DIM, False, True, HAS_DOC, PREC,
        )  # fmt: skip

    # Rows past T (never stored) can be fully masked under the document mask: avoid 0 / 0.
    l_i = tl.where(row_ok, l_i, 1.0)
    acc = acc / l_i[:, None]
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None])


# Hopper: 128-row query tiles; the autotuner picks key tile, warps and pipeline depth. Best
# guess first, since KERNELS_AUTOTUNE_CONFIGS=N (kernels/_common.py) keeps the first N: the
# configs that ptxas compiles for sm_90a with the fewest register spills at hd 64 and 128
# (`python -m bench.kernels --compile-check --all-configs`, Triton 3.9: 8 warps spill 0-192 B,
# 4 warps up to 2.6 KB), until a GPU run's autotune log says which win.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in (
        (128, 8, 3), (64, 8, 3), (64, 8, 4), (128, 8, 4), (64, 4, 3), (64, 4, 4), (128, 4, 3),
        (128, 4, 4),
    )
] + [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)]  # fmt: skip


def _prune_fwd(configs, named_args, **kwargs):
    # hd 256 tiles of 128 x 128 do not fit in shared memory; the diagonal split needs
    # BLOCK_M % BLOCK_N == 0.
    d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    out = [
        c for c in configs
        if c.kwargs["BLOCK_M"] % c.kwargs["BLOCK_N"] == 0
        and not (d == 256 and c.kwargs["BLOCK_N"] > 64)
    ]  # fmt: skip
    return out or configs[-1:]


_attn_fwd = LazyAutotune(
    _attn_fwd_kernel,
    _FWD_CONFIGS,
    interpreter_config={"BLOCK_M": 32, "BLOCK_N": 16},  # BLOCK_M > BLOCK_N tests the split
    key=["T", "HEAD_DIM", "CAUSAL", "HAS_DOC"],
    prune=_prune_fwd,
)

# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta_kernel(
    OUT, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
    H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta[b, h, t] = sum_d out * dout (fp32), the rowsum term of the softmax backward."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(
        OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    ).to(tl.float32)  # fmt: skip
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    ).to(tl.float32)  # fmt: skip
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, doc_k, offs_n,
    q_base, do_base, stride_qt, stride_dot, lse_base, delta_base, doc_base,
    T, lo, hi, qk_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV (BLOCK_N, D) of one key block over query blocks [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        qT = tl.load(
            q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :], other=0.0
        )  # (D, BLOCK_M)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=PREC) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        keep = row_ok[None, :]
        if CAUSAL_MASK:
            keep = keep & (offs_m[None, :] >= offs_n[:, None])
        if HAS_DOC:
            doc_q = tl.load(doc_base + offs_m, mask=row_ok, other=-2)
            keep = keep & (doc_k[:, None] == doc_q[None, :])
        pT = tl.where(keep, tl.math.exp2(sT - lse[None, :]), 0.0)
        do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]
        do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC, SEG_START, SEG_END,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    H, HKV, T, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hkv = (bhk % HKV).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T

    k = tl.load(
        K + b * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
        mask=col_ok[:, None], other=0.0,
    )  # fmt: skip
    v = tl.load(
        V + b * stride_vb + hkv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
        mask=col_ok[:, None], other=0.0,
    )  # fmt: skip
    doc_base = DOC + b * T
    lo = 0
    hi = T
    doc_k = offs_n  # placeholder when there is no document mask (unused)
    if HAS_DOC:
        doc_k = tl.load(doc_base + offs_n, mask=col_ok, other=-1)
        # Queries past the end of the last key's document never see this block.
        hi = tl.load(SEG_END + b * T + tl.minimum(start_n + BLOCK_N, T) - 1)
        lo = (tl.load(SEG_START + b * T + start_n) // BLOCK_M) * BLOCK_M

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):  # the query heads that share this kv head
        h = hkv * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * T
        delta_base = DELTA + bh * T
        if CAUSAL:
            # Diagonal: queries of this key block's rows, with the causal mask.
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, doc_k, offs_n, q_base, do_base, stride_qt, stride_dot,
                lse_base, delta_base, doc_base, T, start_n, tl.minimum(start_n + BLOCK_N, T),
                qk_scale, BLOCK_M, HEAD_DIM, True, HAS_DOC, PREC,
            )  # fmt: skip
            # Below the diagonal: every query sees every key of the block (up to the doc mask).
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, doc_k, offs_n, q_base, do_base, stride_qt, stride_dot,
                lse_base, delta_base, doc_base, T, start_n + BLOCK_N, hi,
                qk_scale, BLOCK_M, HEAD_DIM, False, HAS_DOC, PREC,
            )  # fmt: skip
        else:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, doc_k, offs_n, q_base, do_base, stride_qt, stride_dot,
                lse_base, delta_base, doc_base, T, lo, hi,
                qk_scale, BLOCK_M, HEAD_DIM, False, HAS_DOC, PREC,
            )  # fmt: skip

    dk = dk * sm_scale
    dk_ptrs = DK + b * stride_dkb + hkv * stride_dkh + offs_n[:, None] * stride_dkt
    dv_ptrs = DV + b * stride_dvb + hkv * stride_dvh + offs_n[:, None] * stride_dvt
    tl.store(dk_ptrs + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, doc_q, offs_m,
    k_base, v_base, stride_kt, stride_vt, doc_base,
    T, lo, hi, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, KEY_BOUNDS: tl.constexpr, HAS_DOC: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ (BLOCK_M, D) of one query block over key blocks [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N)
        vT_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None]
        if KEY_BOUNDS:
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < T, other=0.0)
            vT = tl.load(vT_ptrs, mask=offs_n[None, :] < T, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        if KEY_BOUNDS:
            p = tl.where(offs_n[None, :] < T, p, 0.0)
        if HAS_DOC:
            doc_k = tl.load(doc_base + offs_n, mask=offs_n < T, other=-1)
            p = tl.where(doc_q[:, None] == doc_k[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC, SEG_START, SEG_END,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, T, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # Under the causal mask the last query blocks do the most work: launch them first so the
    # short blocks fill the tail of the grid.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hkv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )  # fmt: skip
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )  # fmt: skip
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    doc_base = DOC + b * T

    lo = 0
    hi = T
    doc_q = offs_m  # placeholder when there is no document mask (unused)
    if HAS_DOC:
        doc_q = tl.load(doc_base + offs_m, mask=row_ok, other=-2)
        lo = (tl.load(SEG_START + b * T + start_m) // BLOCK_N) * BLOCK_N
        hi = tl.load(SEG_END + b * T + tl.minimum(start_m + BLOCK_M, T) - 1)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, doc_q, offs_m, k_base, v_base, stride_kt, stride_vt, doc_base,
            T, lo, start_m, qk_scale, BLOCK_N, HEAD_DIM, False, False, HAS_DOC, PREC,
        )  # fmt: skip
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, doc_q, offs_m, k_base, v_base, stride_kt, stride_vt, doc_base,
            T, start_m, tl.minimum(start_m + BLOCK_M, T), qk_scale,
            BLOCK_N, HEAD_DIM, True, True, HAS_DOC, PREC,
        )  # fmt: skip
    else:
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, doc_q, offs_m, k_base, v_base, stride_kt, stride_vt, doc_base,
            T, lo, hi, qk_scale, BLOCK_N, HEAD_DIM, False, True, HAS_DOC, PREC,
        )  # fmt: skip
    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _bwd_configs(big: str, small: str) -> list[triton.Config]:
    # The block a program owns (`big`) is wide; the one it streams (`small`) is narrow, which
    # keeps the fp32 accumulators plus recomputed P tiles inside the register file.
    # Seven configs (each costs a compile on the first backward), best guess first (see
    # _FWD_CONFIGS): 128 x 32 and 128 x 64 at 8 warps spill least at hd 128 (0-650 B; the
    # tutorial's 128 x 32 at 4 warps and 5 stages spills 3.4 KB in dK/dV). The last one is
    # what hd 256 falls back to (_prune_bwd).
    return [
        triton.Config({big: b, small: s}, num_warps=w, num_stages=st)
        for b, s, w, st in (
            (128, 32, 8, 3), (128, 64, 8, 3), (128, 32, 4, 5), (128, 32, 4, 3), (128, 64, 4, 3),
            (64, 64, 4, 3), (64, 64, 8, 3),
        )
    ]  # fmt: skip


def _prune_bwd(big: str, small: str):
    def prune(configs, named_args, **kwargs):
        d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        out = [
            c for c in configs
            if c.kwargs[big] % c.kwargs[small] == 0
            and not (d == 256 and c.kwargs[big] * c.kwargs[small] > 64 * 32)
        ]  # fmt: skip
        return out or configs[-1:]

    return prune


_attn_bwd_dkdv = LazyAutotune(
    _attn_bwd_dkdv_kernel,
    _bwd_configs("BLOCK_N", "BLOCK_M"),
    interpreter_config={"BLOCK_N": 32, "BLOCK_M": 16},
    key=["T", "HEAD_DIM", "GROUP", "CAUSAL", "HAS_DOC"],
    prune=_prune_bwd("BLOCK_N", "BLOCK_M"),
)
_attn_bwd_dq = LazyAutotune(
    _attn_bwd_dq_kernel,
    _bwd_configs("BLOCK_M", "BLOCK_N"),
    interpreter_config={"BLOCK_M": 32, "BLOCK_N": 16},
    key=["T", "HEAD_DIM", "CAUSAL", "HAS_DOC"],
    prune=_prune_bwd("BLOCK_M", "BLOCK_N"),
)

# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

WHERE = "kernels.attention.attention"


def _check_inputs(q, k, v, doc_ids) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES, last_dim_contiguous=True, where=WHERE)
    check_device(WHERE, q)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, device=q.device, where=WHERE)
        if t.dtype != q.dtype:
            raise TypeError(f"{WHERE}: {name} has dtype {t.dtype} but q has {q.dtype}")
    check_no_bf16_dot(WHERE, q.dtype, q.device)
    B, H, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{WHERE}: k {tuple(k.shape)} and v {tuple(v.shape)} must match")
    Bk, Hkv, Tk, Dk = k.shape
    if (Bk, Tk, Dk) != (B, T, D):
        raise ValueError(
            f"{WHERE}: k/v of shape {tuple(k.shape)} do not match q {tuple(q.shape)}; expected "
            f"(B, Hkv, T, D) = ({B}, Hkv, {T}, {D})"
        )
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{WHERE}: q heads ({H}) must be a multiple of k/v heads ({Hkv})")
    if not supports_head_dim(D):
        raise ValueError(f"{WHERE}: head dim {D} is not supported; expected one of {HEAD_DIMS}")
    if doc_ids is not None:
        check_tensor("doc_ids", doc_ids, ndim=2, device=q.device, where=WHERE)
        if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise TypeError(f"{WHERE}: doc_ids must be an integer tensor, got {doc_ids.dtype}")
        if tuple(doc_ids.shape) != (B, T):
            raise ValueError(
                f"{WHERE}: doc_ids has shape {tuple(doc_ids.shape)}, expected (B, T) = ({B}, {T})"
            )


def document_segments(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids -> int32 (seg_start, seg_end): the range [start, end) of each token's run of
    equal ids. Used only to skip blocks, so it must never exclude a matching key: rows whose ids
    ever decrease (a document could reappear later) get the whole range [0, T). No host sync."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    change = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, T-1): a new run starts at t+1
    starts_run = torch.cat([torch.ones_like(change[:, :1]), change], dim=1)
    ends_run = torch.cat([change, torch.ones_like(change[:, :1])], dim=1)
    seg_start = torch.where(starts_run, idx, 0).cummax(dim=1).values
    seg_end = torch.where(ends_run, idx + 1, T).flip(1).cummin(dim=1).values.flip(1)
    sorted_row = (doc_ids[:, 1:] >= doc_ids[:, :-1]).all(dim=1, keepdim=True)  # (B, 1)
    seg_start = torch.where(sorted_row, seg_start, 0)
    seg_end = torch.where(sorted_row, seg_end, T)
    return seg_start.to(torch.int32).contiguous(), seg_end.to(torch.int32).contiguous()


def _precision(q: torch.Tensor) -> str:
    """fp32 inputs get exact fp32 matmuls (TF32 would cost ~1e-3 relative accuracy); 16-bit
    inputs use the tensor cores' native precision either way."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _empty_bthd(like: torch.Tensor) -> torch.Tensor:
    """An uninitialized (B, H, T, D) tensor stored as (B, T, H, D)."""
    B, H, T, D = like.shape
    return torch.empty(B, T, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


def _attention_forward(q, k, v, doc, seg_start, seg_end, causal, sm_scale):
    B, H, T, D = q.shape
    group = H // k.shape[1]
    o = _empty_bthd(q)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    has_doc = doc is not None
    dummy = lse  # any tensor: pointer arguments that HAS_DOC=False never reads
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _attn_fwd[grid](
        q, k, v, o, lse,
        doc if has_doc else dummy, seg_start if has_doc else dummy, seg_end if has_doc else dummy,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, T, group, sm_scale * LOG2E,
        HEAD_DIM=D, CAUSAL=causal, HAS_DOC=has_doc, PREC=_precision(q),
    )  # fmt: skip
    return o, lse


def _attention_backward(do, q, k, v, o, lse, doc, seg_start, seg_end, causal, sm_scale):
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty_like(lse)
    block = 64
    _bwd_delta_kernel[(triton.cdiv(T, block), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, T, HEAD_DIM=D, BLOCK_M=block
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    has_doc = doc is not None
    docs = (doc, seg_start, seg_end) if has_doc else (lse, lse, lse)
    qk_scale = sm_scale * LOG2E
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)
    _attn_bwd_dkdv[grid](
        q, k, v, do, lse, delta, dk, dv, *docs,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        H, Hkv, T, H // Hkv, qk_scale, sm_scale,
        HEAD_DIM=D, CAUSAL=causal, HAS_DOC=has_doc, PREC=_precision(q),
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _attn_bwd_dq[grid](
        q, k, v, do, lse, delta, dq, *docs,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, T, H // Hkv, qk_scale, sm_scale,
        HEAD_DIM=D, CAUSAL=causal, HAS_DOC=has_doc, PREC=_precision(q),
    )  # fmt: skip
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, causal: bool, sm_scale: float):
        doc = seg_start = seg_end = None
        if doc_ids is not None:
            doc = doc_ids.to(torch.int32).contiguous()
            seg_start, seg_end = document_segments(doc)
        o, lse = _attention_forward(q, k, v, doc, seg_start, seg_end, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, doc, seg_start, seg_end)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, doc, seg_start, seg_end = ctx.saved_tensors
        dq, dk, dv = _attention_backward(
            do, q, k, v, o, lse, doc, seg_start, seg_end, ctx.causal, ctx.sm_scale
        )
        return dq, dk, dv, None, None, None


# Run eagerly under torch.compile: Dynamo does not trace the lazily autotuned launches.
@torch.compiler.disable
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Fused attention. q: (B, H, T, D); k, v: (B, Hkv, T, D) with H % Hkv == 0;
    doc_ids: optional (B, T) integer document ids. Returns (B, H, T, D) (a view of a (B, T, H, D)
    buffer). sm_scale defaults to 1 / sqrt(D)."""
    _check_inputs(q, k, v, doc_ids)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    return _Attention.apply(q, k, v, doc_ids, bool(causal), float(sm_scale))


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch attention with the same semantics (materializes the T x T scores)."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, T, D): query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(B, 1, T, T)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
