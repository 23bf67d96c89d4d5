"""The layers the dense Transformer (model/transformer.py) and the MoE layer (model/moe.py) share:
RMSNorm, rotary position embeddings (RoPE) and the SwiGLU feed-forward network.

Each has a plain PyTorch path and, when `fused` is on, a Triton kernel path (kernels/).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import RopeScaling


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


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                     device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim / 2,) in float64, factor for cos and sin): theta^(-2j/d),
    rescaled as transformers' rope_type does (modeling_rope_utils.py) for long-context models."""
    j = torch.arange(0, head_dim, 2, device=device).double()
    inv_freq = 1.0 / (theta ** (j / head_dim))
    s = scaling
    if s is None or s.type in ("default", "dynamic"):  # dynamic: unchanged up to its context
        return inv_freq, 1.0
    if s.type == "linear":
        return inv_freq / s.factor, 1.0
    if s.type == "llama3":
        context = s.original_max_seq_len
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = context / s.low_freq_factor, context / s.high_freq_factor
        long = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * long / s.factor + smooth * long
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, long), 1.0
    # yarn: dimensions that turn fewer than beta_slow times over the original context are
    # interpolated (/ factor), more than beta_fast times kept, a linear ramp between.
    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(head_dim // 2, device=device).double() - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / s.factor * ramp + inv_freq * (1 - ramp)
    attention = s.attention_factor or (0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)
    return inv_freq, attention


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None,
                scaling: RopeScaling | None = None):
    """cos, sin of shape (max_seq_len, head_dim), halves convention: column j and j + d/2 share
    frequency j (rope_frequencies), as transformers' rotary embeddings; yarn scales both."""
    inv_freq, attention = rope_frequencies(head_dim, theta, scaling, device)
    t = torch.arange(max_seq_len, device=device).double()
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return (emb.cos() * attention).float(), (emb.sin() * attention).float()


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
