"""A tiny model trained with the Triton attention, the fused RMSNorm / RoPE / SwiGLU kernels and
the fused loss follows the SDPA / plain-PyTorch model: same first-step gradients, same losses
step by step."""

import random

import torch

from model.config import model_config
from model.loss import lm_loss
from model.transformer import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def train(attention, fused, tokens, targets, doc_ids, steps=3):
    """Losses of `steps` AdamW steps, and the gradients of the first step."""
    cfg = model_config(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64,
        attention=attention, fused_kernels=fused,
    )  # fmt: skip
    model = build_model(cfg, DEVICE, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, first_grads = [], None
    for _ in range(steps):
        hidden = model(tokens, doc_ids=doc_ids, return_hidden=True)
        loss = lm_loss(hidden, model.output_weight, targets, fused=fused, z_loss=1e-4)
        opt.zero_grad()
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, first_grads


def test_triton_fused_model_matches_plain_model():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    B, T = 2, 45  # T not a multiple of the attention blocks
    tokens = torch.randint(0, 128, (B, T), device=DEVICE)
    targets = torch.randint(0, 128, (B, T), device=DEVICE)
    targets[:, -3:] = -100  # ignored positions
    doc_ids = torch.cumsum(torch.rand(B, T, device=DEVICE) < 0.1, dim=1)  # packed documents
    fused, fused_grads = train("triton", True, tokens, targets, doc_ids)
    plain, plain_grads = train("sdpa", False, tokens, targets, doc_ids)
    # Same weights at step 0: the paths differ only in fp32 summation order, so the loss agrees
    # to ~1e-6 and every gradient to ~1e-6 of the largest one (bounds: 1e-5 and 1e-4).
    assert abs(fused[0] - plain[0]) < 1e-5, f"step 0: {fused[0]} vs {plain[0]} (seed {seed})"
    for name, g in plain_grads.items():
        scale = g.abs().max().item() + 1e-12
        err = (fused_grads[name] - g).abs().max().item()
        assert err < 1e-4 * scale, f"grad {name}: error {err:.2e}, max {scale:.2e} (seed {seed})"
    # Later steps: AdamW divides each gradient by its own running RMS, so a gradient entry that
    # is ~0 turns summation-order noise into an O(lr) weight difference. Observed gaps are
    # ~1e-6 (one unexplained run once exceeded 1e-4); the bound 1e-3 still sits well below what
    # a real bug does: dropping the document mask in the Triton model moves the losses by 8e-3
    # at step 0 and 0.16 at step 2 (and first-step gradients by far more than 1e-4).
    for step, (a, b) in enumerate(zip(fused, plain)):
        assert abs(a - b) < 1e-3, f"step {step}: fused {a} vs plain {b} (seed {seed})"
    assert plain[-1] < plain[0]  # the run actually trains
