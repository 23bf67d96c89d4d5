"""A decoder-only Transformer: RMSNorm, RoPE (Hugging Face halves convention, optionally
scaled for long contexts), grouped-query attention (optional q/k/v biases), SwiGLU MLP (or a
Mixture-of-Experts layer), optional tied embeddings.

Plain nn.Modules, no process groups: parallelism is applied from outside (parallel/). Weights
are initialized by `init_weights(seed)`, never in `__init__`, so the model can be built on the
meta device and materialized after sharding (each shard drawn alone: model/init.py). `forward`
returns logits (or the final hidden states); the loss lives in model/loss.py so a fused kernel
can replace it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig, ModelConfigError
from model.init import init_buffers_, init_std, init_tensor_
from model.layers import FeedForward, RMSNorm, apply_rope, rope_tables
from model.moe import MoE

# ---------------------------------------------------------------------------------------------
# Attention (the shared layers are in model/layers.py)
# ---------------------------------------------------------------------------------------------


def resolve_attention_backend(name: str, device: torch.device, head_dim: int) -> str:
    """model.attention on `device`: "auto" is our Triton kernel on CUDA when the kernel takes
    this head dim (kernels/attention.py's own predicate), else PyTorch's SDPA."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "sdpa"
    from kernels.attention import supports_head_dim

    return "triton" if supports_head_dim(head_dim) else "sdpa"


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool mask: causal and within the same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc)[:, None]


def attend(q, k, v, backend: str, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention. q: (B, H, T, D); k, v: (B, Hkv, T, D) with H a multiple of Hkv.
    doc_ids: optional (B, T) ids; tokens attend only within their own document."""
    if backend == "triton":
        from kernels.attention import attention

        return attention(q, k, v, causal=True, doc_ids=doc_ids)
    if backend == "flash":
        try:
            from flash_attn import flash_attn_func
        except ImportError as e:
            raise RuntimeError("model.attention = 'flash' needs the flash-attn package") from e
        if doc_ids is not None:
            raise NotImplementedError("document masking with flash-attn: use 'triton' or 'sdpa'")
        # flash-attn wants (B, T, H, D) and handles GQA itself.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    if backend == "sdpa":
        gqa = q.shape[1] != k.shape[1]
        if doc_ids is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = document_mask(doc_ids)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    raise ValueError(f"unknown attention backend {backend!r}")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.backend = cfg.attention
        if cfg.attention == "triton":  # stop at build time, not at the first forward
            from kernels.attention import HEAD_DIMS, supports_head_dim

            if not supports_head_dim(cfg.head_dim):
                raise ModelConfigError(f"model.attention = 'triton': the kernel takes head dims "
                                 f"{HEAD_DIMS}, not model.head_dim = {cfg.head_dim}; use 'auto' "
                                 f"or 'sdpa'")
        self.fused = cfg.fused_kernels
        bias = cfg.qkv_bias  # Qwen2: q, k, v have biases, the output projection none
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.fused_kernels) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.fused_kernels) if cfg.qk_norm else None

    def forward(self, x, cos, sin, doc_ids=None, cache: LayerKVCache | None = None):
        B, T, _ = x.shape
        # (B, T, H*D) -> (B, H, T, D)
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin, self.fused)
        k = apply_rope(k, cos, sin, self.fused)
        if cache is None:
            out = attend(q, k, v, resolve_attention_backend(self.backend, x.device, self.head_dim),
                         doc_ids)
        else:
            out = cache.attend(q, k, v)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, H, T, D) -> (B, T, H*D)
        return self.wo(out)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.fused_kernels)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.fused_kernels)
        if cfg.is_moe_layer(layer):
            self.mlp = MoE(cfg)
        else:
            self.mlp = FeedForward(cfg.dim, cfg.ffn_hidden, cfg.fused_kernels)

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_ids, cache)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------------------------
# KV cache for sampling (model/generate.py)
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerKVCache:
    k: torch.Tensor  # (B, Hkv, T_max, D)
    v: torch.Tensor
    pos: int = 0  # slots already filled (the same for every row)
    # (B, T_max) bool, False for slots no query may see: the padding of rows shorter than the
    # batch's widest, when rows of different lengths share one cache (eval/, batched decoding).
    key_mask: torch.Tensor | None = None

    def attend(self, q, k, v):
        """Append k, v (B, Hkv, t, D) at self.pos and attend q (B, H, t, D) to the whole prefix."""
        t = q.shape[2]
        end = self.pos + t
        self.k[:, :, self.pos : end] = k
        self.v[:, :, self.pos : end] = v
        keys, values = self.k[:, :, :end], self.v[:, :, :end]
        # Query i sits in slot pos + i and sees slots 0 .. pos + i.
        mask = torch.ones(t, end, dtype=torch.bool, device=q.device).tril(diagonal=self.pos)
        if self.key_mask is not None:
            mask = mask & self.key_mask[:, None, None, :end]  # (B, 1, t, end)
        self.pos = end
        gqa = q.shape[1] != keys.shape[1]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.fused_kernels)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(
            cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, "meta", cfg.rope_scaling
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, dim) matrix of the output projection (the embedding when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialize every parameter and buffer deterministically from `seed` (model/init.py:
        each parameter's values depend only on the seed and its name, so a sharded model
        initialized piece by piece gets exactly these values)."""
        for name, param in self.named_parameters():
            init_tensor_(param, name, seed, init_std(self.cfg, name))
        init_buffers_(self, self.cfg)

    def forward(
        self,
        tokens: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        cache: list[LayerKVCache] | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens: (B, T) int ids -> logits (B, T, V), or hidden states (B, T, dim).

        doc_ids: optional (B, T) document ids for document-masked attention.
        cache: per-layer KV caches for incremental decoding (positions continue from cache.pos).
        positions: optional (B, T) RoPE position of each token (default: cache.pos + t), for
        rows of different lengths in one cache (a row's pad slots hidden by cache.key_mask).
        """
        B, T = tokens.shape
        start = cache[0].pos if cache is not None else 0
        end = start + T if positions is None else int(positions.max()) + 1
        if end > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {end} tokens exceeds model.max_seq_len = {self.cfg.max_seq_len}"
            )
        if positions is None:
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, head_dim)
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, doc_ids, None if cache is None else cache[i])
        x = self.norm(x)
        if return_hidden:
            return x
        return F.linear(x, self.output_weight)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> list[LayerKVCache]:
        cfg = self.cfg
        max_len = max_len or cfg.max_seq_len
        p = self.embed.weight
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        return [
            LayerKVCache(p.new_zeros(shape), p.new_zeros(shape)) for _ in range(cfg.n_layers)
        ]


def build_model(
    cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = 0
) -> Transformer:
    """Build on the meta device, materialize on `device`, initialize from `seed`; seed None
    leaves the parameters uninitialized for a checkpoint to fill (only RoPE is computed)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if seed is None:
        init_buffers_(model, cfg)  # RoPE tables: the only buffers not in a checkpoint
    else:
        model.init_weights(seed)
    return model
