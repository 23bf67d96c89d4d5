"""MoE layer: dropless dispatch vs a dense reference, routing conventions, balancing, metrics,
parameter counts. Tiny shapes, fp32, CPU."""

import math

import pytest
import torch
import torch.nn.functional as F

from eval.moe_load import load_balance_report
from model.config import model_config
from model.moe import MoE, moe_after_step, moe_aux_loss, moe_metrics
from model.transformer import build_model


def tiny_cfg(**overrides):
    values = dict(
        vocab_size=64, dim=16, n_layers=2, n_heads=2, max_seq_len=32, n_experts=6,
        moe_top_k=2, expert_hidden=24,
    )
    values.update(overrides)
    return model_config(**values)


def make_moe(cfg, seed: int) -> MoE:
    """A standalone MoE with O(1) activations (std 1/sqrt(fan_in)) so that 1e-5 is a real bound."""
    moe = MoE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, fan_in in ((moe.w_gate, cfg.dim), (moe.w_up, cfg.dim), (moe.w_down, cfg.expert_hidden)):
            p.copy_(torch.randn(p.shape, generator=gen) * fan_in**-0.5)
        for p in [moe.router.weight, *([] if moe.shared is None else moe.shared.parameters())]:
            p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    return moe


def dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, masked by the routing weights: out = sum_e W[n, e] f_e(x_n),
    with W the renormalized top-k softmax scattered into an (N, E) matrix (zero off the top-k)."""
    xf = x.reshape(-1, x.shape[-1])
    probs = (xf @ moe.router.weight.t()).softmax(-1)  # (N, E)
    scores = probs.detach() + moe.expert_bias if moe.balance == "bias" else probs
    idx = scores.topk(moe.top_k, dim=-1).indices
    top = probs.gather(1, idx)
    dense_w = torch.zeros_like(probs).scatter(1, idx, top / top.sum(-1, keepdim=True))
    out = torch.zeros_like(xf)
    for e in range(moe.n_experts):
        h = F.silu(xf @ moe.w_gate[e].t()) * (xf @ moe.w_up[e].t())
        out = out + dense_w[:, e : e + 1] * (h @ moe.w_down[e].t())
    if moe.shared is not None:
        sh = moe.shared
        out = out + sh.w_down(F.silu(sh.w_gate(xf)) * sh.w_up(xf))
    return out.view_as(x)


@pytest.mark.parametrize(
    "balance,n_shared,grouped,tokens",
    [
        ("aux", 0, False, (3, 5)),
        ("aux", 1, False, (1, 3)),  # 6 slots over 6 experts: some experts idle
        ("bias", 2, False, (2, 7)),
        ("none", 1, True, (3, 5)),  # torch._grouped_mm path (runs on CPU in fp32 too)
    ],
)
def test_dispatch_matches_dense_reference(balance, n_shared, grouped, tokens):
    torch.manual_seed(1000 + len(balance) + n_shared)
    cfg = tiny_cfg(moe_balance=balance, n_shared_experts=n_shared)
    assert not grouped or hasattr(torch, "_grouped_mm"), "torch < 2.8: no torch._grouped_mm"
    moe = make_moe(cfg, seed=torch.randint(0, 2**30, ()).item())
    moe.use_grouped_mm = grouped
    if balance == "bias":  # a bias of the size of the probabilities, so it changes choices
        moe.expert_bias.copy_(torch.randn(cfg.n_experts) * 0.2)
    x = torch.randn(*tokens, cfg.dim, requires_grad=True)
    grad_out = torch.randn(*tokens, cfg.dim)

    params = [p for p in moe.parameters()]
    out = moe(x)
    grads = torch.autograd.grad(out, [x, *params], grad_out)
    ref = dense_reference(moe, x)
    ref_grads = torch.autograd.grad(ref, [x, *params], grad_out)

    # fp32, O(1) values, sums over <= 24 terms in a different order: errors ~1e-6; 1e-5 bounds it.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")
    assert all(g.abs().sum() > 0 for g in grads[:2])  # x and the router really get gradients


def test_routing_weights_are_renormalized_topk_softmax():
    torch.manual_seed(1)
    cfg = tiny_cfg(moe_top_k=3)
    moe = make_moe(cfg, seed=1)
    x = torch.randn(10, cfg.dim)
    idx, w = moe._route(x)
    probs = (x @ moe.router.weight.t()).softmax(-1)
    expected_idx = probs.topk(3, dim=-1).indices
    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(w.sum(-1), torch.ones(10))
    top = probs.gather(1, idx)
    torch.testing.assert_close(w, top / top.sum(-1, keepdim=True))
    assert w.dtype == torch.float32


def test_bias_changes_selection_not_weights():
    torch.manual_seed(2)
    cfg = tiny_cfg(moe_balance="bias")
    moe = make_moe(cfg, seed=2)
    x = torch.randn(40, cfg.dim)
    probs = (x @ moe.router.weight.t()).softmax(-1)
    idx0, w0 = moe._route(x)

    moe.expert_bias[4] = 10.0  # expert 4 now wins every token's first slot
    idx1, w1 = moe._route(x)
    assert (idx1 == 4).any(dim=-1).all()
    assert not torch.equal(idx0, idx1)
    # The weights are still the unbiased softmax, renormalized over the chosen experts.
    top = probs.gather(1, idx1)
    torch.testing.assert_close(w1, top / top.sum(-1, keepdim=True))
    # Tokens whose choice did not change get exactly the same weights as before.
    same = (idx0.sort(-1).values == idx1.sort(-1).values).all(-1)
    assert same.any()
    order0, order1 = idx0.argsort(-1), idx1.argsort(-1)
    torch.testing.assert_close(w0.gather(1, order0)[same], w1.gather(1, order1)[same])


def test_bias_update_uses_loads_of_all_microbatches_and_resets():
    torch.manual_seed(3)
    cfg = tiny_cfg(moe_balance="bias", moe_bias_rate=0.01)
    moe = make_moe(cfg, seed=3).train()
    loads = torch.zeros(cfg.n_experts)
    for _ in range(3):  # three micro-batches before one optimizer step
        x = torch.randn(1, 20, cfg.dim)
        idx, _ = moe._route(x.view(-1, cfg.dim))
        loads += torch.bincount(idx.flatten(), minlength=cfg.n_experts)
        moe(x)  # the forward records the same routing once more
    moe_after_step(moe)
    expected = 0.01 * torch.sign(loads.mean() - loads)  # loads doubled above: same signs
    torch.testing.assert_close(moe.expert_bias, expected)
    moe_after_step(moe)  # counts were reset: no second update
    torch.testing.assert_close(moe.expert_bias, expected)
    # Evaluation forwards do not count.
    moe.eval()
    moe(torch.randn(1, 20, cfg.dim))
    moe_after_step(moe)
    torch.testing.assert_close(moe.expert_bias, expected)


def test_bias_balancing_evens_out_a_skewed_router():
    """With the router strongly preferring expert 0, the bias update alone drives the loads to
    near balance (it changes the choice, not the router)."""
    torch.manual_seed(4)
    cfg = tiny_cfg(moe_balance="bias", moe_bias_rate=2e-3, moe_top_k=1, n_experts=4)
    moe = make_moe(cfg, seed=4).train()
    with torch.no_grad():
        moe.router.weight.mul_(0.3)
        moe.router.weight[0] += 0.5 * torch.randn(cfg.dim).sign()
    x = torch.randn(512, cfg.dim)
    x[:, :] += 0.5 * moe.router.weight[0].sign()  # every token leans towards expert 0

    def ratio():
        load = torch.bincount(moe._route(x)[0].flatten(), minlength=4).float()
        return (load.max() / load.min().clamp(min=1)).item()

    before = ratio()
    for _ in range(400):
        moe._route(x)  # the routing part of a training forward: records the loads
        moe_after_step(moe)
    after = ratio()
    assert before > 5, before
    assert after < 1.5, (before, after)


def test_aux_and_z_loss_on_a_hand_computed_case():
    cfg = tiny_cfg(dim=2, n_heads=1, n_experts=2, moe_top_k=1, moe_aux_coef=0.1, moe_z_coef=0.01)
    moe = make_moe(cfg, seed=5).train()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    ln3 = math.log(3.0)
    # logits = x: probs (3/4, 1/4) -> expert 0; (1/4, 3/4) -> expert 1; (3/4, 1/4) -> expert 0.
    x = torch.tensor([[[ln3, 0.0], [0.0, ln3], [ln3, 0.0]]])
    moe(x)
    # f = (2/3, 1/3); p = (7/12, 5/12); aux = E * sum f p = 2 * (14 + 5) / 36 = 19/18.
    # Every token has logsumexp = ln 4, so z = (ln 4)^2.
    aux, z = 19 / 18, math.log(4.0) ** 2
    loss = moe_aux_loss(moe)
    assert loss.requires_grad
    assert loss.item() == pytest.approx(0.1 * aux + 0.01 * z, rel=1e-6)
    metrics = moe_metrics(moe)
    key = next(k for k in metrics if k.endswith("/aux_loss"))
    prefix = key[: -len("aux_loss")]
    assert metrics[prefix + "aux_loss"] == pytest.approx(aux, rel=1e-6)
    assert metrics[prefix + "z_loss"] == pytest.approx(z, rel=1e-6)
    assert metrics[prefix + "frac_e0"] == pytest.approx(2 / 3)
    assert metrics[prefix + "max_min_ratio"] == pytest.approx(2.0)
    assert moe_metrics(moe) == {}  # reset after reading

    # The gradient of the aux term flows through the mean probabilities only:
    # d aux / d p_i = E f_i, so with logits = x the router gradient is analytic.
    moe.z_coef = 0.0
    moe(x)
    (grad,) = torch.autograd.grad(moe_aux_loss(moe), moe.router.weight)
    probs = x[0].softmax(-1)
    f = torch.tensor([2 / 3, 1 / 3])
    # d/dlogits_n of sum_i f_i p_ni / N = p_n * (f - <f, p_n>) / N; chain rule through W x.
    dlogits = probs * (f - (probs * f).sum(-1, keepdim=True)) / 3
    expected = 0.1 * 2 * dlogits.t() @ x[0]
    torch.testing.assert_close(grad, expected)


def test_no_aux_loss_unless_aux_balancing():
    for balance in ("bias", "none"):
        moe = make_moe(tiny_cfg(moe_balance=balance), seed=6).train()
        moe(torch.randn(1, 4, 16))
        loss = moe_aux_loss(moe)
        assert loss.item() == 0.0 and not loss.requires_grad


def test_shared_expert_sees_every_token():
    torch.manual_seed(7)
    cfg = tiny_cfg(n_shared_experts=2)
    moe = make_moe(cfg, seed=7)
    assert moe.shared.w_gate.weight.shape == (2 * cfg.expert_hidden, cfg.dim)
    x = torch.randn(2, 5, cfg.dim)
    routed_only = moe(x)
    shared_out = moe.shared(x)
    assert shared_out.abs().min() > 0  # every token gets a shared contribution
    with torch.no_grad():
        moe.w_down.zero_()  # silence the routed experts: what remains is the shared expert
    torch.testing.assert_close(moe(x), shared_out)
    with torch.no_grad():
        moe.shared.w_down.weight.zero_()
    assert moe(x).abs().max() == 0
    assert not torch.allclose(routed_only, shared_out)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(n_shared_experts=1, moe_every=2, tie_embeddings=True),
        dict(qk_norm=True, moe_top_k=1, n_experts=3, moe_every=1),
    ],
)
def test_num_params_matches_the_model(overrides):
    cfg = tiny_cfg(**overrides)
    model = build_model(cfg, "cpu", seed=0)
    total = sum(p.numel() for p in model.parameters())
    assert cfg.num_params() == total
    idle = cfg.n_experts - cfg.moe_top_k
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    assert cfg.num_params(active=True) == total - n_moe * idle * 3 * cfg.dim * cfg.expert_hidden


def test_init_is_deterministic_and_bias_is_checkpointed():
    cfg = tiny_cfg(moe_balance="bias")
    a, b = build_model(cfg, "cpu", seed=3), build_model(cfg, "cpu", seed=3)
    c = build_model(cfg, "cpu", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.mlp.w_gate"], sc["blocks.0.mlp.w_gate"])
    # Down projections get the residual std (0.02 / sqrt(2 * 2 layers) = 0.01).
    assert sa["blocks.0.mlp.w_down"].std().item() == pytest.approx(0.01, rel=0.1)
    assert sa["blocks.0.mlp.w_gate"].std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(sa["blocks.0.mlp.expert_bias"], torch.zeros(cfg.n_experts))
    a.blocks[1].mlp.expert_bias.fill_(0.5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.blocks[1].mlp.expert_bias, torch.full((cfg.n_experts,), 0.5))


def test_metrics_name_layers_and_count_only_training():
    cfg = tiny_cfg(n_layers=4, moe_every=2)  # MoE layers 1 and 3
    model = build_model(cfg, "cpu", seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    model.eval()
    model(tokens)
    assert moe_metrics(model) == {}
    model.train()
    model(tokens)
    model(tokens)
    metrics = moe_metrics(model)
    assert {k.split("/")[1] for k in metrics} == {"layer1", "layer3", "max_min_ratio"}
    fracs = [v for k, v in metrics.items() if k.startswith("moe/layer1/frac_e")]
    assert len(fracs) == cfg.n_experts and sum(fracs) == pytest.approx(1.0)
    worst = max(metrics["moe/layer1/max_min_ratio"], metrics["moe/layer3/max_min_ratio"])
    assert metrics["moe/max_min_ratio"] == worst


def test_load_balance_report_counts_exactly_the_given_tokens():
    cfg = tiny_cfg(moe_balance="bias")
    model = build_model(cfg, "cpu", seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (5, 8))
    report = load_balance_report(model, tokens, batch=2)
    seen = []  # what layer 0's MoE receives
    hook = model.blocks[0].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(tokens)
    hook.remove()
    idx, _ = model.blocks[0].mlp._route(seen[0].view(-1, cfg.dim))
    load = torch.bincount(idx.flatten(), minlength=cfg.n_experts).float()
    fracs = [report[f"moe/layer0/frac_e{j}"] for j in range(cfg.n_experts)]
    torch.testing.assert_close(torch.tensor(fracs), load / load.sum())
    assert not model.training  # mode restored
    assert all(m.step_load is None for m in (b.mlp for b in model.blocks))  # no bias update


def test_moe_transformer_learns():
    """A 2-layer MoE Transformer memorizes a fixed batch: the loss falls well below its start."""
    torch.manual_seed(8)
    cfg = tiny_cfg(dim=32, expert_hidden=16, n_heads=2, n_shared_experts=1)
    model = build_model(cfg, "cpu", seed=8).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    losses = []
    for _ in range(20):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        (loss + moe_aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        moe_after_step(model)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_bad_top_k_is_rejected():
    with pytest.raises(ValueError, match="moe_top_k = 5: expected between 1 and n_experts = 4"):
        tiny_cfg(n_experts=4, moe_top_k=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_mm_on_gpu_matches_the_loop_in_bf16():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm needs compute capability 9.0+")
    torch.manual_seed(9)
    cfg = tiny_cfg(dim=64, expert_hidden=128, n_experts=8, n_shared_experts=1)
    moe = make_moe(cfg, seed=9).cuda()
    x = torch.randn(4, 64, cfg.dim, device="cuda", requires_grad=True)
    outs = []
    for grouped in (True, False):
        moe.use_grouped_mm = grouped
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = moe(x)
        (gx,) = torch.autograd.grad(out.float().square().sum(), x)
        outs.append((out.float(), gx))
    # Same bf16 products, different accumulation order: bf16-level agreement.
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=2e-2, atol=2e-2)
