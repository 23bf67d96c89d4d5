"""The language-modelling loss, kept outside the model so a fused kernel can replace it.

`lm_loss` is the plain loss (the (B*T, V) logits materialized) or, with fused=True, one that
never holds them: the Triton kernel on CUDA (kernels/cross_entropy.py), `ChunkedCrossEntropy`
(torch, chunks of rows) elsewhere. ChunkedCrossEntropy is also the vocabulary-parallel loss of
tensor parallelism (parallel/tensor_parallel.py), given reductions over the TP group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    targets: torch.Tensor,
    fused: bool = False,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Mean next-token cross-entropy over targets != IGNORE_INDEX.

    hidden: (B, T, dim) final hidden states; output_weight: (V, dim); targets: (B, T).
    fused: never build the (B*T, V) logits: the chunked Triton linear + cross-entropy on CUDA,
    ChunkedCrossEntropy on other devices, unless the Triton interpreter is on (the CPU: a quarter of LoRA fine-tuning's peak memory
    on SmolLM2 at 1,024 tokens a micro-batch is the plain loss's logits, softmax and gradient).
    z_loss: coefficient of mean(logsumexp(logits)^2), which keeps the softmax normalizer near 1.
    """
    if fused:
        from kernels._common import interpreting

        if hidden.device.type == "cuda" or interpreting():
            from kernels.cross_entropy import fused_linear_cross_entropy

            return fused_linear_cross_entropy(
                hidden.flatten(0, 1), output_weight, targets.flatten(), IGNORE_INDEX, z_loss
            )
        return chunked_cross_entropy(hidden.flatten(0, 1), output_weight, targets.flatten(), z_loss)
    logits = F.linear(hidden, output_weight).float().flatten(0, 1)  # (B*T, V)
    targets = targets.flatten()
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    if z_loss:
        valid = targets != IGNORE_INDEX
        loss = loss + z_loss * torch.logsumexp(logits[valid], dim=-1).pow(2).mean()
    return loss


def default_chunk_size(n_tokens: int, vocab_size: int, dim: int) -> int:
    """Liger-Kernel's heuristic: about as many rows per chunk as make the chunk's logits the size
    of the hidden states, rounded up to a power of two."""
    chunks = -(-vocab_size // dim)
    rows = -(-n_tokens // chunks)
    return max(1, min(n_tokens, 1 << (rows - 1).bit_length()))


class Reductions:
    """How ChunkedCrossEntropy combines per-row vectors across the ranks that each hold a slice
    of the vocabulary: in-place max and sum (identity when one rank holds all of it)."""

    max_: Callable[[torch.Tensor], None] = staticmethod(lambda t: None)
    sum_: Callable[[torch.Tensor], None] = staticmethod(lambda t: None)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy (+ z-loss) of logits = hidden @ weight.T, in chunks of rows: the
    forward computes the gradients (those asked for) while each chunk's logits are in memory
    and the backward only scales them, so no (N, V) tensor is ever held.

    hidden: (N, dim); weight: (V_local, dim), rows [start, start + V_local) of the vocabulary
    (all of it unless the reductions span vocabulary-parallel ranks); targets: (N,) global ids.
    Returns the scalar loss (the same on every rank).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, start, reduce, z_loss, chunk, grad_enabled):
        N, n_local = hidden.shape[0], weight.shape[0]
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1).float()
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]  # False for a frozen (LoRA) head
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for lo in range(0, N, chunk):
            hi = min(lo + chunk, N)
            h = hidden[lo:hi]
            logits = F.linear(h, weight).float()  # (C, V_local), fp32 for the softmax
            # Stable softmax: subtract the global max of each row.
            row_max = logits.max(dim=-1).values
            reduce.max_(row_max)
            exp = (logits - row_max[:, None]).exp_()  # (C, V_local)
            # The target logit lives on exactly one rank; the others contribute 0.
            local_t = targets[lo:hi] - start
            mine = (local_t >= 0) & (local_t < n_local)
            local_t = torch.where(mine, local_t, torch.zeros_like(local_t))
            target_logit = (logits.gather(1, local_t[:, None]).squeeze(1) - row_max) * mine
            del logits
            both = torch.stack([target_logit, exp.sum(dim=-1)])  # (2, C): one reduction
            reduce.sum_(both)
            lse = both[1].log() + row_max  # (C,)
            ok = valid[lo:hi].float()
            total += ((lse - both[0] - row_max + z_loss * lse.pow(2)) * ok).sum()
            if need_h or need_w:
                # d mean loss / d logits = (softmax (1 + 2 z lse) - onehot(target)) / count
                scale = ok / count
                grad = exp.div_(both[1][:, None]).mul_((scale * (1 + 2 * z_loss * lse))[:, None])
                grad.scatter_add_(1, local_t[:, None], -(scale * mine)[:, None])
                if need_h:
                    grad_h[lo:hi] = grad.to(hidden.dtype) @ weight
                if need_w:
                    grad_w.add_(grad.t() @ h.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype),
                None, None, None, None, None, None)  # fmt: skip


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0,
    chunk: int | None = None, start: int = 0, reduce: Reductions | None = None,
) -> torch.Tensor:
    """hidden (N, dim), weight (V, dim), targets (N,) -> the mean loss, as lm_loss's plain path
    (see ChunkedCrossEntropy). Under autocast the matmuls run in its dtype, as F.linear would."""
    if chunk is None:
        chunk = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.shape[1])
        if hidden.device.type == "cpu":
            # Liger's chunks (8 rows of a 49k vocabulary) leave a CPU's matmuls too small to be
            # efficient: at least 64 MB of fp32 logits per chunk there.
            floor = 1 << max(0, (2**24 // weight.shape[0]).bit_length() - 1)
            chunk = min(hidden.shape[0], max(chunk, floor))
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):  # dtypes explicit inside
        return ChunkedCrossEntropy.apply(
            hidden.to(dtype), weight.to(dtype), targets, start, reduce or Reductions(),
            float(z_loss), int(chunk), torch.is_grad_enabled(),
        )
