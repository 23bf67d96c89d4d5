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


def test_any_piece_of_a_parameter_draws_the_values_of_the_whole(seed, monkeypatch):
    """model/init.py: a box [offset, offset + shape) of a parameter, drawn alone, equals that
    slice of the whole tensor's init (what each rank of a sharded model draws); the values
    depend on the seed and the name; blocks are small here so a piece spans several."""
    import model.init as init

    monkeypatch.setattr(init, "INIT_BLOCK", 40)  # 40 elements: 5 rows of 8 per block
    gen = torch.Generator().manual_seed(seed)
    full = init.init_tensor_(torch.empty(23, 8), "blocks.0.attn.wq.weight", seed, 0.02)
    assert 0.01 < full.std() < 0.03
    for _ in range(20):
        r0 = int(torch.randint(0, 23, (1,), generator=gen))
        r1 = int(torch.randint(r0 + 1, 24, (1,), generator=gen))
        c0 = int(torch.randint(0, 8, (1,), generator=gen))
        c1 = int(torch.randint(c0 + 1, 9, (1,), generator=gen))
        piece = init.init_tensor_(torch.empty(r1 - r0, c1 - c0), "blocks.0.attn.wq.weight", seed,
                                  0.02, full_shape=(23, 8), offset=(r0, c0))
        assert torch.equal(piece, full[r0:r1, c0:c1]), (r0, r1, c0, c1)
    experts = init.init_tensor_(torch.empty(4, 3, 5), "blocks.1.mlp.w_gate", seed, 0.02)
    piece = init.init_tensor_(torch.empty(2, 3, 5), "blocks.1.mlp.w_gate", seed, 0.02, (4, 3, 5), (1, 0, 0))
    assert torch.equal(piece, experts[1:3])
    other = init.init_tensor_(torch.empty(23, 8), "blocks.1.attn.wq.weight", seed, 0.02)
    assert not torch.equal(other, full)  # another name, other values


def test_init_gives_every_parameter_its_distribution(seed):
    cfg = model_config(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16, n_experts=4,
                       n_shared_experts=1, expert_hidden=16, qkv_bias=True)
    model = build_model(cfg, seed=seed)
    residual = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    for name, p in model.named_parameters():
        if name.endswith(".bias"):  # q/k/v biases start at zero, as transformers' do
            assert torch.equal(p, torch.zeros_like(p)), name
        elif p.dim() == 1:  # the other vectors are RMSNorm weights
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(("wo.weight", "w_down.weight", "mlp.w_down")):
            assert abs(p.std() - residual) < 0.3 * residual, name
        else:
            assert abs(p.std() - cfg.init_std) < 0.3 * cfg.init_std, name
    assert torch.equal(build_model(cfg, seed=seed).embed.weight, model.embed.weight)
