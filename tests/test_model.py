"""The model on its own, with no training loop: incremental decoding with the KV cache, the
sampling filters, and the MoE hooks the loop calls unconditionally (no-ops on a dense model)."""

import torch

from model.config import model_config
from model.generate import filter_logits, generate
from model.moe import moe_after_step, moe_aux_loss, moe_metrics
from model.transformer import build_model


def test_kv_cache_generation_matches_full_forward(seed):
    cfg = model_config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=40)
    model = build_model(cfg, seed=seed).eval()
    prompt = torch.randint(0, 97, (7,)).tolist()
    out = generate(model, prompt, 20, temperature=0)
    # greedy without a cache: re-run the whole sequence for every token
    seq = list(prompt)
    for _ in range(20):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_top_k_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]


def test_moe_hooks_are_no_ops_on_a_dense_model(seed):
    """train.py adds moe_aux_loss to every loss and calls moe_metrics / the bias update for
    every model: for a dense one they must change nothing."""
    cfg = model_config(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=16)
    model = build_model(cfg, seed=seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    aux = moe_aux_loss(model)
    assert aux.shape == () and aux.item() == 0.0 and not aux.requires_grad
    assert moe_metrics(model) == {}
    moe_after_step(model, reduce=lambda loads: (_ for _ in ()).throw(AssertionError("reduced")))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
