"""ModelConfig: every architectural choice of the Transformer, with named sizes.

Derived fields (KV heads, head dim, MLP hidden size) are filled in once, in `__post_init__`, so
the config saved with a run is fully resolved and nothing downstream recomputes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from common.errors import PretrainError

ATTENTION_BACKENDS = ("auto", "sdpa", "triton", "flash")


class ModelConfigError(PretrainError, ValueError):
    """A model field with a value the Transformer cannot be built from."""

MOE_BALANCING = ("aux", "bias", "none")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


@dataclass
class RopeScaling:
    """RoPE frequency scaling of long-context checkpoints ([model.rope_scaling]), named as
    transformers' `rope_type`; model/layers.py rope_tables computes the frequencies.

    linear: every frequency / factor. llama3 (Llama 3.1 / 3.2): wavelengths longer than
    original_max_seq_len / low_freq_factor divided by factor, shorter than ... / high_freq_factor
    kept, smoothly blended between. yarn: blended by rotations over the original context
    (beta_fast, beta_slow), and cos / sin scaled by attention_factor. dynamic (NTK): the
    frequencies change only past original_max_seq_len, so it is the default RoPE up to there.
    """

    type: str = "default"  # default | linear | llama3 | yarn | dynamic
    factor: float = 1.0
    original_max_seq_len: int = 0  # the pretraining context (original_max_position_embeddings)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 0.0  # yarn: multiplies cos and sin; 0 means 0.1 ln(factor) + 1
    truncate: bool = True  # yarn: round the blend's dimension range outward

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ValueError(f"model.rope_scaling.type = {self.type!r}: expected one of {ROPE_TYPES}")
        if self.type != "default" and self.factor <= 0:
            raise ValueError(f"model.rope_scaling.factor = {self.factor}: expected > 0")
        if self.type in ("llama3", "yarn", "dynamic") and self.original_max_seq_len <= 0:
            raise ValueError(f"model.rope_scaling.original_max_seq_len = "
                             f"{self.original_max_seq_len}: {self.type} needs the pretraining context")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("model.rope_scaling: llama3 needs high_freq_factor > low_freq_factor")


@dataclass
class ModelConfig:
    # --- vocabulary and width --------------------------------------------------------------
    vocab_size: int = 4096  # rows of the embedding; must cover every token id of the tokenizer
    dim: int = 256  # residual stream width
    n_layers: int = 4
    n_heads: int = 4  # query heads
    n_kv_heads: int = 0  # key/value heads for grouped-query attention; 0 means n_heads
    head_dim: int = 0  # 0 means dim // n_heads
    ffn_hidden: int = 0  # SwiGLU hidden size; 0 means 8/3 * dim rounded up to multiple_of
    multiple_of: int = 64
    # --- numerics --------------------------------------------------------------------------
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # RoPE base, Hugging Face "rotate halves" convention
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # [model.rope_scaling]
    max_seq_len: int = 256  # longest sequence the RoPE tables cover
    tie_embeddings: bool = False  # share the token embedding with the output projection
    qk_norm: bool = False  # per-head RMSNorm on queries and keys (Qwen3 style)
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2 / Qwen2.5 style)
    init_std: float = 0.02
    # --- kernels ---------------------------------------------------------------------------
    attention: str = "auto"  # auto | sdpa | triton | flash (auto: triton on CUDA, sdpa on CPU)
    fused_kernels: bool = False  # Triton RMSNorm / RoPE / SwiGLU kernels instead of PyTorch ops
    # --- mixture of experts (n_experts = 0: dense model) ----------------------------------
    n_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0
    n_shared_experts: int = 0  # experts that see every token
    expert_hidden: int = 0  # hidden size of one expert; 0 means ffn_hidden
    moe_balance: str = "aux"  # aux (Switch loss + z-loss) | bias (aux-loss-free) | none
    moe_aux_coef: float = 1e-2
    moe_z_coef: float = 1e-3
    moe_bias_rate: float = 1e-3

    def __post_init__(self) -> None:
        def fail(field: str, expected: str) -> None:
            value = getattr(self, field)
            raise ModelConfigError(f"model.{field} = {value!r}: expected {expected}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            if getattr(self, name) <= 0:
                fail(name, "a positive integer")
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 0 or self.n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"a divisor of n_heads = {self.n_heads}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                fail("n_heads", f"a divisor of dim = {self.dim} (or set head_dim)")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            fail("head_dim", "an even number (RoPE rotates pairs)")
        if self.ffn_hidden == 0:
            hidden = int(8 * self.dim / 3)
            self.ffn_hidden = self.multiple_of * -(-hidden // self.multiple_of)
        if self.attention not in ATTENTION_BACKENDS:
            fail("attention", f"one of {ATTENTION_BACKENDS}")
        if isinstance(self.rope_scaling, dict):  # from a checkpoint's config.json
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        rope = self.rope_scaling
        if rope.type == "dynamic" and self.max_seq_len > rope.original_max_seq_len:
            # Past that length dynamic NTK rescales per sequence length: no fixed table.
            fail("max_seq_len", f"<= rope_scaling.original_max_seq_len = "
                                f"{rope.original_max_seq_len} with dynamic RoPE scaling")
        if self.n_experts < 0:
            fail("n_experts", "0 (dense) or a positive number of experts")
        if self.n_experts:
            if not 1 <= self.moe_top_k <= self.n_experts:
                fail("moe_top_k", f"between 1 and n_experts = {self.n_experts}")
            if self.moe_every < 1:
                fail("moe_every", "a positive integer")
            if self.moe_balance not in MOE_BALANCING:
                fail("moe_balance", f"one of {MOE_BALANCING}")
            if self.expert_hidden == 0:
                self.expert_hidden = self.ffn_hidden

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and (layer + 1) % self.moe_every == 0

    def num_params(self, active: bool = False) -> int:
        """Parameter count from the config alone; `active` counts only top-k routed experts."""
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        dense_mlp = 3 * d * self.ffn_hidden
        total = 0
        for layer in range(self.n_layers):
            total += attn + 2 * d
            if self.is_moe_layer(layer):
                experts = self.moe_top_k if active else self.n_experts
                total += (experts + self.n_shared_experts) * 3 * d * self.expert_hidden
                total += d * self.n_experts  # router
            else:
                total += dense_mlp
        total += self.vocab_size * d * (1 if self.tie_embeddings else 2) + d
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 N_active + attention (PaLM appendix)."""
        embed = self.vocab_size * self.dim  # the lookup costs no matmul
        n = self.num_params(active=True) - embed * (0 if self.tie_embeddings else 1)
        attn = 6 * self.n_layers * self.n_heads * self.head_dim * seq_len  # causal: half of 12
        return 6 * n + attn


# Named sizes: a [model] section may say `size = "gpt2-124m"` and override single fields.
MODEL_SIZES: dict[str, dict] = {
    # CPU, minutes: the default job
    "tiny": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    # GPT-2 small shape with Llama components
    "gpt2-124m": dict(
        vocab_size=50304, dim=768, n_layers=12, n_heads=12, max_seq_len=1024, tie_embeddings=True
    ),
    # Llama 3.2 1B shape
    "llama-1b": dict(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
        rope_theta=500000.0, max_seq_len=2048, tie_embeddings=True,
    ),
    # Llama 3 8B shape (8.03B parameters, untied 128k vocabulary, GQA 32/8)
    "llama3-8b": dict(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
        rope_theta=500000.0, max_seq_len=8192,
    ),
    "moe-tiny": dict(
        dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256, n_experts=8,
        moe_top_k=2, expert_hidden=256,
    ),
    "moe-1b": dict(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
        rope_theta=500000.0, max_seq_len=2048, n_experts=64, moe_top_k=8, expert_hidden=1024,
        n_shared_experts=1, tie_embeddings=True,
    ),
}


def model_config(size: str | None = None, **overrides) -> ModelConfig:
    """A ModelConfig from a named size plus field overrides."""
    values: dict = {}
    if size is not None:
        if size not in MODEL_SIZES:
            raise ModelConfigError(f"model.size = {size!r}: expected one of {sorted(MODEL_SIZES)}")
        values.update(MODEL_SIZES[size])
    known = {f.name for f in fields(ModelConfig)}
    for key in overrides:
        if key not in known:
            raise ModelConfigError(f"model.{key}: unknown field; known fields: {sorted(known)}")
    values.update(overrides)
    return ModelConfig(**values)


# Our projection names and their Hugging Face (PEFT target_modules) names.
PROJECTIONS = {
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj",
}
ALL_LINEAR = "all-linear"


@dataclass
class LoRAConfig:
    rank: int = 0  # adapter rank r; 0: no adapters (full-parameter training)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (training only)
    # Projections to adapt, in every block: ours (wq, wk, wv, wo, w_gate, w_up, w_down) or the
    # Hugging Face names (q_proj, ...), or ["all-linear"]. MLP targets skip MoE layers (their
    # experts are stacked tensors, not projections).
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    # Blocks to adapt (PEFT's layers_to_transform): [] for all, or indices, negative from the
    # end ([-8, -7, ..., -1]: the last 8). Adapting only the top blocks also saves compute:
    # nothing below the lowest adapter needs a backward pass.
    layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank = {self.rank}: expected 0 (off) or a positive rank")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout = {self.dropout}: expected 0 <= dropout < 1")
        known = set(PROJECTIONS) | set(PROJECTIONS.values()) | {ALL_LINEAR}
        bad = [t for t in self.targets if t not in known]
        if bad or not self.targets:
            raise ValueError(f"lora.targets = {self.targets}: expected names from {sorted(known)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def our_targets(self) -> list[str]:
        """The targets as our module names, in PROJECTIONS order."""
        hf_to_ours = {v: k for k, v in PROJECTIONS.items()}
        names = {hf_to_ours.get(t, t) for t in self.targets}
        return [n for n in PROJECTIONS if ALL_LINEAR in names or n in names]
