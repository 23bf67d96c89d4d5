"""Expert parallelism on 2 CPU processes (gloo) against one process with the same global batch.

The EP run composes with data parallelism the way train.py does it: each rank gets half of every
global micro-batch, DDP averages the replicated parameters (expert shards excluded), the expert
shards hold their own gradients (scaled by 1/ep), gradients are clipped with the EP-aware global
norm (clipping is active), AdamW steps, and the "bias" balancing update all-reduces the loads.
The reference is a plain single-process run with the global micro-batches.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.config import model_config
from model.moe import moe_after_step, moe_aux_loss
from model.transformer import Transformer, build_model
from parallel.expert_parallel import check_expert_parallel

STEPS, MICRO, BATCH, SEQ = 5, 2, 4, 8  # global batch of 4 sequences, 2 micro-batches per step
MAX_NORM = 0.5
CFG = dict(
    vocab_size=64, dim=16, n_layers=2, n_heads=2, max_seq_len=16, n_experts=4, moe_top_k=2,
    expert_hidden=16, n_shared_experts=1, moe_every=1,
)


def make_cfg(balance: str):
    # "bias": the balancing update must see global loads. "aux" with only the z-loss: a mean over
    # tokens, so the mean of per-rank values is the global value. (The Switch aux loss itself is
    # per-rank by design, like every micro-batch-level implementation, so it is not compared.)
    if balance == "bias":
        extra = dict(moe_bias_rate=0.05)
    else:
        extra = dict(moe_aux_coef=0.0, moe_z_coef=0.1)
    return model_config(**CFG, moe_balance=balance, **extra)


def make_data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    return torch.randint(0, CFG["vocab_size"], (STEPS, MICRO, BATCH, SEQ + 1), generator=gen)


def train(model, data, clip, after_step, loss_reduce=lambda x: x):
    """Per-step losses (summed over micro-batches, each scaled by 1/MICRO) and grad norms."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    losses, norms = [], []
    for step in range(STEPS):
        total = 0.0
        for micro in range(MICRO):
            batch = data[step, micro]
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            loss = (loss + moe_aux_loss(model)) / MICRO
            loss.backward()
            total += loss.detach()
        norms.append(float(clip(model)))
        opt.step()
        opt.zero_grad()
        after_step(model)
        losses.append(float(loss_reduce(total)))
    return losses, norms


def reference(balance: str):
    model = build_model(make_cfg(balance), "cpu", seed=0)
    losses, norms = train(
        model, make_data(),
        clip=lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM),
        after_step=moe_after_step,
    )
    return losses, norms, model.state_dict()


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from parallel.expert_parallel import (
        apply_expert_parallel,
        clip_grad_norm_,
        expert_parallel_groups,
        expert_parameter_names,
        full_state_dict,
        local_state_dict,
        sync_expert_grads,
    )
    from parallel.moe_balance import update_expert_bias

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    try:
        # A clear error when the experts do not split evenly.
        bad = build_model(model_config(**{**CFG, "n_experts": 3}), "cpu", seed=0)
        try:
            apply_expert_parallel(bad, None)
            results["bad_error"] = ""
        except ValueError as e:
            results["bad_error"] = str(e)

        ep_group, replica_group = expert_parallel_groups(2)
        assert dist.get_world_size(ep_group) == 2 and dist.get_world_size(replica_group) == 1
        for balance in ("bias", "aux"):
            cfg = make_cfg(balance)
            # Shard on the meta device, then initialize: the same weights as unsharded.
            with torch.device("meta"):
                model = Transformer(cfg)
            apply_expert_parallel(model, ep_group)
            model.to_empty(device="cpu")
            model.init_weights(0)
            full_init = {k: v.clone() for k, v in full_state_dict(model).items()}
            DDP._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
            ddp = DDP(model)
            half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)

            def mean_over_ranks(x):
                x = torch.as_tensor(x, dtype=torch.float32).clone()
                dist.all_reduce(x)
                return x / 2

            def clip(m):
                sync_expert_grads(m, replica_group)  # a no-op here: ep spans the world
                return clip_grad_norm_(m, MAX_NORM)

            losses, norms = train(
                ddp, make_data()[:, :, half],
                clip=clip,
                after_step=update_expert_bias,  # loads summed over the ranks
                loss_reduce=mean_over_ranks,
            )
            final = {k.removeprefix("module."): v for k, v in full_state_dict(ddp).items()}
            # Reloading the gathered checkpoint gives back this rank's shards exactly.
            reload = local_state_dict(model, final)
            same = all(torch.equal(reload[k], v) for k, v in model.state_dict().items())
            results[balance] = dict(
                losses=losses, norms=norms, init=full_init, final=final, reload_ok=same
            )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ep"))
    mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=2, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("balance", ["bias", "aux"])
def test_expert_parallel_matches_single_process(ep_results, balance):
    ref_losses, ref_norms, ref_state = reference(balance)
    ref_init = build_model(make_cfg(balance), "cpu", seed=0).state_dict()
    assert max(ref_norms) > MAX_NORM  # clipping really happens, so the global norm matters
    for rank, res in enumerate(ep_results):
        r = res[balance]
        for k, v in ref_init.items():
            assert torch.equal(r["init"][k], v), (rank, k)
        # Same losses and grad norms step by step, to 1e-5 relative: the only differences are
        # fp32 summation orders (the per-rank means and the DDP all-reduce).
        torch.testing.assert_close(r["losses"], ref_losses, rtol=1e-5, atol=0)
        torch.testing.assert_close(r["norms"], ref_norms, rtol=1e-5, atol=0)
        # After 5 AdamW steps every parameter, and the balancing bias, matches.
        for k, v in ref_state.items():
            torch.testing.assert_close(r["final"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        assert r["reload_ok"]
    if balance == "bias":  # the bias moved (an odd number of +-rate steps), the same on both ranks
        for layer in range(CFG["n_layers"]):
            key = f"blocks.{layer}.mlp.expert_bias"
            bias = ep_results[0]["bias"]["final"][key]
            assert (bias != 0).all(), bias
            assert torch.equal(bias, ep_results[1]["bias"]["final"][key])


def test_uneven_expert_split_is_rejected(ep_results):
    msg = ep_results[0]["bad_error"]
    assert "model.n_experts = 3 is not divisible by the expert-parallel size" in msg
    with pytest.raises(ValueError, match=r"model.n_experts = 6 .* \(parallel.ep\) = 4"):
        check_expert_parallel(6, 4)
    check_expert_parallel(8, 4)
