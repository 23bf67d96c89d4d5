"""The chunked linear + cross-entropy (model/loss.py: lm_loss's fused path off CUDA, and the
vocabulary-parallel loss of tensor parallelism) equals the plain loss in value and gradients; the
peak memory train.py reports restarts after setup."""

import pytest
import torch

from model.loss import IGNORE_INDEX, chunked_cross_entropy, lm_loss


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_chunked_cross_entropy_equals_the_plain_loss(seed, chunk, z_loss):
    N, V, D = 45, 97, 16  # 45 rows: chunks of 7 leave a ragged last one
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < 0.3] = IGNORE_INDEX
    plain = lm_loss(hidden[None], weight, targets[None], z_loss=z_loss)
    plain.backward(torch.tensor(2.5))  # the backward scales by grad_out
    want = plain.item(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = chunked_cross_entropy(hidden, weight, targets, z_loss, chunk)
    got.backward(torch.tensor(2.5))
    # Both in fp32 (the chunked softmax is fp32 whatever the input): the same sums in another
    # order, so agreement to fp32 rounding.
    assert got.item() == pytest.approx(want[0], rel=1e-6)
    torch.testing.assert_close(hidden.grad, want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, want[2], rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_skips_the_gradient_of_a_frozen_head(seed):
    hidden = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(50, 8)  # frozen (a LoRA run's tied embedding): no (V, dim) gradient
    targets = torch.randint(0, 50, (20,))
    loss = chunked_cross_entropy(hidden, weight, targets, chunk=6)
    loss.backward()
    plain_h = hidden.detach().clone().requires_grad_(True)
    lm_loss(plain_h[None], weight, targets[None]).backward()
    torch.testing.assert_close(hidden.grad, plain_h.grad, rtol=1e-5, atol=1e-6)
    assert weight.grad is None


def test_peak_memory_restarts_after_setup():
    """train.py resets the peak after setup: a transient freed before the reset (loading's
    second copy of the weights) is not the training's peak; one after it is."""
    from parallel.dist import peak_memory_gib, reset_peak_memory

    cpu = torch.device("cpu")
    transient = torch.ones(2**27)  # 0.5 GiB, touched
    before = peak_memory_gib(cpu)
    del transient
    reset_peak_memory(cpu)
    after = peak_memory_gib(cpu)
    assert after < before - 0.4, (before, after)
    again = torch.ones(2**27)
    assert peak_memory_gib(cpu) > after + 0.4
    del again
