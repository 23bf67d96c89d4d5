"""The layers the dense Transformer (model/transformer.py) and the MoE layer (model/moe.py) share:
RMSNorm, rotary position embeddings (RoPE) and the SwiGLU feed-forward network.

Each has a plain PyTorch path and, when `fused` is on, a Triton kernel path (kernels/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:  # one fused ATen op; same result as the lines below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalize in fp32 like Hugging Face Llama, then cast back before the weight.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None):
    """cos, sin of shape (max_seq_len, head_dim), halves convention: column j and j + d/2 share
    the frequency theta^(-2j/d), exactly as transformers' LlamaRotaryEmbedding."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).double() / head_dim))
    t = torch.arange(max_seq_len, device=device).double()
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False):
    """x: (B, H, T, D); cos, sin: (T, D) or (B, T, D) for per-sequence positions."""
    if fused:
        from kernels.rope import apply_rope as apply_rope_kernel

        return apply_rope_kernel(x, cos, sin)
    if cos.dim() == 3:  # (B, T, D) -> (B, 1, T, D) to broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    # x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1] (Hugging Face), computed
    # on halves: the tables repeat after D/2, and no negated copy of x is made (2x on the CPU).
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class FeedForward(nn.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, dim: int, hidden: int, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate(x), self.w_up(x)
        if self.fused:
            from kernels.swiglu import swiglu

            return self.w_down(swiglu(gate, up))
        return self.w_down(F.silu(gate) * up)
