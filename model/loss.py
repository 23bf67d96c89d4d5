"""The language-modelling loss, kept outside the model so a fused kernel can replace it."""

from __future__ import annotations

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
    fused: use the chunked Triton linear + cross-entropy, which never builds the (B*T, V) logits.
    z_loss: coefficient of mean(logsumexp(logits)^2), which keeps the softmax normalizer near 1.
    """
    if fused:
        from kernels.cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(
            hidden.flatten(0, 1), output_weight, targets.flatten(), IGNORE_INDEX, z_loss
        )
    logits = F.linear(hidden, output_weight).float().flatten(0, 1)  # (B*T, V)
    targets = targets.flatten()
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    if z_loss:
        valid = targets != IGNORE_INDEX
        loss = loss + z_loss * torch.logsumexp(logits[valid], dim=-1).pow(2).mean()
    return loss
