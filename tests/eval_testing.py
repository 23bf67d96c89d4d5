"""Shared helpers for the tests/test_eval_*.py files: a small BPE tokenizer and tiny models."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from data.tokenizer import Tokenizer, train_bpe
from model.config import model_config
from model.transformer import build_model

BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"


@functools.lru_cache(maxsize=1)
def small_tokenizer() -> Tokenizer:
    """A 384-id byte-level BPE (data/tokenizer.py) trained on LAMBADA passages: merges like
    ' the' exist, so tokenizing context and continuation together differs from apart."""
    lines = (BENCHMARKS / "lambada" / "lambada_test.jsonl").read_text().splitlines()[:150]
    return train_bpe([json.loads(line)["text"] for line in lines], vocab_size=384)


def tiny_model(vocab_size: int, seed: int = 0, max_seq_len: int = 512, **overrides):
    cfg = model_config(
        vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
        max_seq_len=max_seq_len, multiple_of=16, **overrides,
    )
    return build_model(cfg, "cpu", seed).eval()


def train_briefly(model, tokenizer: Tokenizer, texts: list[str], steps: int = 40) -> None:
    """A few AdamW steps of next-token prediction so the model's predictions are not flat."""
    ids = []
    for t in texts:
        ids += tokenizer.encode(t) + [tokenizer.eot_id]
    data = torch.tensor(ids)
    T = 64
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (8,), generator=gen)
        x = torch.stack([data[s : s + T] for s in starts])
        y = torch.stack([data[s + 1 : s + T + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def to_hf_llama(model):
    """A transformers LlamaForCausalLM holding our Transformer's weights (tensor names as in
    REFERENCE.md; RoPE is the halves convention in both, so q/k need no permutation)."""
    import transformers

    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
    )
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    parts = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
             "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
             "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj",
             "mlp.w_down": "mlp.down_proj"}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            part = rest.removesuffix(".weight")
            state[f"model.layers.{i}.{parts[part]}.weight"] = tensor
        else:
            state[names[name]] = tensor
    hf = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.eval()
