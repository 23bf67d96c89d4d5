"""LoRA adapters (model/lora.py): an adapted model starts as its base, the adapters are the
only trainable tensors, merging changes no output, and the PEFT export (model/hf_peft.py)
loaded by peft onto the transformers model computes what our merged model computes."""

from __future__ import annotations

import json

import pytest
import torch

from job_config import JobConfig
from model.checkpoint import save_checkpoint
from model.hf_peft import ADAPTER_CONFIG, export_adapter
from model.load import load_model
from model.lora import (
    LoRAConfig,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    count_parameters,
    lora_modules,
    merge_lora,
)
from tests.helpers import tiny_model, to_hf_llama


def _randomize_adapters(model, seed: int) -> None:
    """B starts at zero (the update is zero); give it values so the update is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05, generator=gen)


def test_adapted_model_starts_as_the_base_and_trains_only_adapters(seed):
    model = tiny_model(97, seed=seed % 1000)
    tokens = torch.randint(0, 97, (2, 16))
    before = model(tokens)
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "wv", "w_down"]))
    assert names == [f"blocks.{i}.{p}" for i in range(2)
                     for p in ("attn.wq", "attn.wv", "mlp.w_down")]
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)  # B = 0: no change
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}.weight" for m in names for ab in "AB"}
    # Base tensors keep their names: a base checkpoint loads into the adapted model.
    assert "blocks.0.attn.wq.weight" in model.state_dict()
    n_trainable, n_total = count_parameters(model)
    c = model.cfg
    per_layer = (4 * (c.dim + c.n_heads * c.head_dim) + 4 * (c.dim + c.n_kv_heads * c.head_dim)
                 + 4 * (c.ffn_hidden + c.dim))
    assert n_trainable == c.n_layers * per_layer and n_total > n_trainable


def test_merge_and_disable_compute_what_the_adapters_compute(seed):
    model = tiny_model(97, seed=seed % 1000)
    tokens = torch.randint(0, 97, (2, 16))
    base = model(tokens)
    apply_lora(model, LoRAConfig(rank=4, alpha=16, targets=["all-linear"]), seed=seed)
    _randomize_adapters(model, seed)
    adapted = model(tokens)
    assert (adapted - base).abs().max() > 1e-3  # the adapters do something
    with adapters_disabled(model):
        torch.testing.assert_close(model(tokens), base, rtol=0, atol=0)
    merge_lora(model)
    assert not lora_modules(model)
    torch.testing.assert_close(model(tokens), adapted, rtol=1e-5, atol=1e-5)


def test_lora_checkpoint_holds_adapters_and_loads_merged(tmp_path, seed):
    """A LoRA run's checkpoint: the adapters plus the base's name; load_model merges."""
    base = tiny_model(97, seed=1)
    save_checkpoint(tmp_path / "base", 0, base.state_dict(), {},
                    JobConfig(model=base.cfg).to_dict())
    lora = LoRAConfig(rank=2, alpha=4, targets=["wq", "wk", "wv", "wo"])
    apply_lora(base, lora, seed=seed)
    _randomize_adapters(base, seed)
    tokens = torch.randint(0, 97, (1, 12))
    want = base(tokens)
    job = JobConfig(model=base.cfg, lora=lora)
    job.checkpoint.init_from = str(tmp_path / "base")
    save_checkpoint(tmp_path / "run", 5, adapter_state_dict(base), {}, job.to_dict())
    merged, cfg, _ = load_model(tmp_path / "run")
    assert cfg.lora.rank == 2 and not lora_modules(merged)
    torch.testing.assert_close(merged(tokens), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets, layers", [(["wq", "wv"], []), (["all-linear"], []),
                                            (["wk", "w_up"], [-1])])
def test_peft_loads_our_adapter_onto_the_transformers_model(tmp_path, seed, targets, layers):
    """peft.PeftModel.from_pretrained(our adapter) on the transformers model of the base gives
    our merged model's logits (the interop the issue asks for, on a tiny Llama)."""
    import peft

    base = tiny_model(97, seed=2)
    hf = to_hf_llama(base)
    lora = LoRAConfig(rank=4, alpha=8, targets=targets, layers=layers)
    apply_lora(base, lora, seed=seed)
    _randomize_adapters(base, seed)
    job = JobConfig(model=base.cfg, lora=lora)
    job.checkpoint.init_from = "hf-base"
    save_checkpoint(tmp_path / "run", 1, adapter_state_dict(base), {}, job.to_dict())
    out = export_adapter(tmp_path / "run", tmp_path / "adapter")
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    peft_model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    tokens = torch.randint(0, 97, (2, 20))
    merge_lora(base)
    with torch.no_grad():
        ours = base(tokens)
        theirs = peft_model(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    # Every adapter tensor was used: peft holds as many LoRA layers as we wrote.
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A.default")]
    assert len(adapted) == len(config["target_modules"]) * (len(layers) or base.cfg.n_layers)
