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

    def forward(self, x, cos, sin, doc_ids=None, cache: LayerCache | None = None):
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
# KV cache for decoding (model/generate.py, inference/engine.py)
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer for `batch` sequences of up to `max_len` positions,
    allocated once. Each sequence has its own length: a forward writes token t of row b at
    position positions[b, t] and lets it see entries 0 .. positions[b, t] of its own row. Ragged
    batches need no position padding, and undoing tokens (a rejected speculation) is writing
    over them: an entry past a row's position is never read before it is written again."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v  # per layer: (batch, n_kv_heads, max_len, head_dim)

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, dtype, device) -> KVCache:
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        zeros = lambda: torch.zeros(shape, dtype=dtype, device=device)
        return cls([zeros() for _ in range(cfg.n_layers)], [zeros() for _ in range(cfg.n_layers)])

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start .. stop - 1 as a cache of their own (views: writes land in this one)."""
        return KVCache([k[start:stop] for k in self.k], [v[start:stop] for v in self.v])

    def step(
        self,
        positions: torch.Tensor,
        kv_len: int | None = None,
        write: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> CacheStep:
        """The cache as one forward of tokens at `positions` (B, T) uses it. Attention reads the
        first `kv_len` entries (default all: fixed shapes for torch.compile; fewer is faster
        eagerly, and must exceed every position). write: (B, T) entries to write each token's
        keys and values to, default `positions` (padding can aim at an entry no one reads).
        visible: (B, T, kv_len) bool, the entries each token sees, default entries 0 .. its
        position (several sequences packed in one row: eval/shared_context.py)."""
        kv_len = kv_len or self.max_len
        write = positions if write is None else write
        B, T = positions.shape
        _, n_kv, _, head_dim = self.k[0].shape
        index = write[:, None, :, None].expand(B, n_kv, T, head_dim)  # scatter along positions
        if visible is None:
            keys = torch.arange(kv_len, device=positions.device)
            visible = keys[None, None, :] <= positions[:, :, None]  # (B, T, kv_len)
        return CacheStep(self, positions, index, visible[:, None])  # mask (B, 1, T, kv_len)


@dataclass
class CacheStep:
    cache: KVCache
    positions: torch.Tensor  # (B, T) absolute positions (RoPE, visibility)
    index: torch.Tensor  # (B, Hkv, T, D) cache entries written
    mask: torch.Tensor  # (B, 1, T, kv_len) entries each query sees

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)


@dataclass
class LayerCache:
    step: CacheStep
    layer: int

    def attend(self, q, k, v):
        """Write k, v (B, Hkv, T, D) and attend q (B, H, T, D) to the row's cached prefix."""
        step = self.step
        k_all, v_all = step.cache.k[self.layer], step.cache.v[self.layer]
        k_all.scatter_(2, step.index, k.to(k_all.dtype))
        v_all.scatter_(2, step.index, v.to(v_all.dtype))
        n = step.mask.shape[-1]
        keys, values = k_all[:, :, :n], v_all[:, :, :n]
        gqa = q.shape[1] != keys.shape[1]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, enable_gqa=gqa)


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
        cache: CacheStep | None = None,
    ) -> torch.Tensor:
        """tokens: (B, T) int ids -> logits (B, T, V), or hidden states (B, T, dim).

        doc_ids: optional (B, T) document ids for document-masked attention.
        cache: incremental decoding, `kv_cache.step(positions)`: token t of row b sits at
        positions[b, t] and is written to the cache (see KVCache).
        """
        B, T = tokens.shape
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(
                    f"sequence of {T} tokens exceeds model.max_seq_len = {self.cfg.max_seq_len}"
                )
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            layers = [None] * len(self.blocks)
        else:
            if cache.positions.shape != tokens.shape:
                raise ValueError(f"positions {tuple(cache.positions.shape)} for tokens {(B, T)}")
            cos, sin = self.rope_cos[cache.positions], self.rope_sin[cache.positions]  # (B, T, D)
            layers = [cache.layer(i) for i in range(len(self.blocks))]
        x = self.embed(tokens)
        for block, layer_cache in zip(self.blocks, layers):
            x = block(x, cos, sin, doc_ids, layer_cache)
        x = self.norm(x)
        return x if return_hidden else self.output(x)

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., dim) -> logits (..., V); model/quant.py may swap lm_head."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.embed.weight)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A zeroed KVCache in the dtype and on the device of the model's activations."""
        max_len = max_len or self.cfg.max_seq_len
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"a cache of {max_len} tokens exceeds model.max_seq_len = {self.cfg.max_seq_len}")
        p = self.norm.weight  # a plain parameter even in a quantized model
        return KVCache.allocate(self.cfg, batch_size, max_len, p.dtype, p.device)


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
