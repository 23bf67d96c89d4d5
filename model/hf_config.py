"""Which transformers class a model becomes, and its config.json, both ways (model/hf.py has
the table of classes and writes the files; model/hf_names.py maps the tensors).

    arch = hf_architecture(cfg)                    # "LlamaForCausalLM", ... or ExportError
    config = hf_config(cfg, arch, token_ids, dtype)  # config.json as a dict
    cfg, arch = model_config_from_hf(config)        # the inverse

Every family is one row of FAMILIES: the config.json fields it adds to the common ones, and the
ModelConfig fields it reads back (refusing what our Transformer does not compute). A new family,
or a new field of one (RoPE scaling, attention biases), is a change to its two functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.errors import PretrainError
from model.config import ModelConfig, RopeScaling

LLAMA, QWEN2, QWEN3 = "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"
MIXTRAL, QWEN3_MOE, QWEN2_MOE = "MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"
ERNIE_MOE = "Ernie4_5_MoeForCausalLM"


class ExportError(PretrainError, ValueError):
    """The model (or the files) cannot be expressed in the other format; the message says why."""


# ---------------------------------------------------------------------------------------------
# Choosing the target class
# ---------------------------------------------------------------------------------------------


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that computes exactly what `cfg` computes, or ExportError."""
    if cfg.dim % cfg.n_heads:
        # transformers 5 rejects hidden_size % num_attention_heads != 0 even with head_dim set.
        raise ExportError(
            f"model.dim = {cfg.dim} is not a multiple of model.n_heads = {cfg.n_heads} "
            f"(head_dim = {cfg.head_dim}): transformers rejects such a config"
        )
    if cfg.qkv_bias and (cfg.qk_norm or (cfg.is_moe and (
            not cfg.n_shared_experts or cfg.moe_balance == "bias"))):
        raise ExportError(
            "model.qkv_bias: q/k/v biases are Qwen2's (dense) and Qwen2-MoE's (with shared "
            "experts, no qk_norm, moe_balance != 'bias'); no transformers class has them with "
            "this model's other features"
        )
    if not cfg.is_moe:
        return QWEN2 if cfg.qkv_bias else QWEN3 if cfg.qk_norm else LLAMA
    if cfg.moe_balance == "bias":
        # The selection bias decides which experts run, at inference too: only Ernie 4.5's
        # router has one over softmax scores (DeepSeek-V3's comes with sigmoid scores and MLA).
        if cfg.qk_norm:
            raise ExportError(
                "model.qk_norm with model.moe_balance = 'bias': the expert selection bias needs "
                "Ernie4_5_MoeForCausalLM, which has no QK-norm (train with moe_balance = 'aux')"
            )
        return ERNIE_MOE
    if cfg.n_shared_experts and cfg.qk_norm:
        raise ExportError(
            "model.qk_norm with shared experts (model.n_shared_experts = "
            f"{cfg.n_shared_experts}): Qwen3-MoE has no shared expert and Qwen2-MoE / Mixtral "
            "have no QK-norm; no transformers class expresses this model"
        )
    if cfg.n_shared_experts:
        return QWEN2_MOE
    if cfg.qk_norm:
        return QWEN3_MOE
    if cfg.moe_every != 1:
        raise ExportError(
            f"model.moe_every = {cfg.moe_every} (dense MLP layers between MoE layers): "
            "MixtralForCausalLM makes every layer MoE (Qwen3-MoE could, but it needs qk_norm)"
        )
    return MIXTRAL


# ---------------------------------------------------------------------------------------------
# config.json: the fields every family shares
# ---------------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, arch: str, token_ids: dict, dtype: torch.dtype) -> dict:
    """config.json for `arch`; every number that changes the computation is written out.
    token_ids: bos_token_id / eos_token_id (/ pad_token_id) of the tokenizer, or {}."""
    c = {
        "architectures": [arch],
        "model_type": FAMILIES[arch].model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # top level: read by 4.x, moved into rope_parameters by 5.x
        "rope_scaling": _rope_to_hf(cfg),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": token_ids.get("bos_token_id"),
        "eos_token_id": token_ids.get("eos_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if token_ids.get("pad_token_id") is not None:
        c["pad_token_id"] = token_ids["pad_token_id"]
    if cfg.rope_scaling.type == "dynamic":  # where transformers starts rescaling: as imported
        c["max_position_embeddings"] = max(cfg.max_seq_len, cfg.rope_scaling.original_max_seq_len)
    c.update(FAMILIES[arch].to_hf(cfg))
    return c


def model_config_from_hf(c: dict, source: str = "config.json") -> tuple[ModelConfig, str]:
    """Hugging Face config.json (as a dict) -> (ModelConfig, architecture); ExportError for
    anything our Transformer does not compute."""
    archs = c.get("architectures") or []
    if len(archs) != 1 or archs[0] not in FAMILIES:
        raise ExportError(
            f"{source}: architectures = {archs}: expected one of {list(FAMILIES)}"
        )
    arch = archs[0]
    if c.get("hidden_act", "silu") != "silu":
        raise _unsupported(c, source, "hidden_act", "our MLP is SwiGLU (silu)")
    if c.get("attention_bias"):
        raise _unsupported(c, source, "attention_bias", "it adds biases to q, k, v and the output "
                           "projection; our attention has q/k/v biases only (Qwen2's)")
    for flag in ("mlp_bias", "use_bias"):
        if c.get(flag):
            raise _unsupported(c, source, flag, "our MLP and output projections have no biases")
    if c.get("use_sliding_window") or (arch == MIXTRAL and c.get("sliding_window")):
        raise _unsupported(c, source, "sliding_window", "our attention is full causal attention")
    theta, scaling = _rope_from_hf(c, source)
    heads = c["num_attention_heads"]
    values = dict(
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        ffn_hidden=c["intermediate_size"],
        norm_eps=c["rms_norm_eps"],
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=c["max_position_embeddings"],
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        init_std=c.get("initializer_range", 0.02),
    )
    values.update(FAMILIES[arch].from_hf(c, source))
    if "router_aux_loss_coef" in c:
        values["moe_aux_coef"] = c["router_aux_loss_coef"]
    return ModelConfig(**values), arch


def _rope_from_hf(c: dict, source: str) -> tuple[float, RopeScaling]:
    """(RoPE base, scaling) from config.json: 4.x has `rope_theta` at the top and `rope_scaling`
    ("type" or "rope_type"), 5.x `rope_parameters` with both; the fields and defaults are
    transformers' (modeling_rope_utils.py)."""
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    field = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    if any(isinstance(v, dict) for v in rope.values()):
        raise ExportError(f"{source}: {field} per layer type: our layers share one RoPE")
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _unsupported(c, source, "partial_rotary_factor", "we rotate the whole head")
    original = c.get("original_max_position_embeddings") or rope.get(
        "original_max_position_embeddings") or c["max_position_embeddings"]
    def need(key: str) -> float:
        if rope.get(key) is None:
            raise ExportError(f"{source}: {field}.{key} is missing (RoPE type {kind!r} needs it)")
        return float(rope[key])

    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling("linear", need("factor"))
    if kind == "dynamic":  # rescales past max_position_embeddings only
        return theta, RopeScaling("dynamic", need("factor"),
                                  original_max_seq_len=c["max_position_embeddings"])
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3", need("factor"), original_max_seq_len=original,
            low_freq_factor=need("low_freq_factor"), high_freq_factor=need("high_freq_factor"),
        )
    if kind == "yarn":
        factor = rope.get("factor") or c["max_position_embeddings"] / original
        attention = rope.get("attention_factor")
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if attention is None and mscale and mscale_all_dim:  # DeepSeek's ratio

            def get_mscale(m: float) -> float:
                return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

            attention = get_mscale(mscale) / get_mscale(mscale_all_dim)
        return theta, RopeScaling(
            "yarn", float(factor), original_max_seq_len=original,
            beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
            attention_factor=float(attention or 0.0), truncate=bool(rope.get("truncate", True)),
        )
    raise ExportError(f"{source}: {field}.rope_type = {kind!r}: our RoPE computes default, "
                      "linear, llama3, yarn and dynamic frequencies only")


def _rope_to_hf(cfg: ModelConfig) -> dict | None:
    """`rope_scaling` of config.json (5.x reads it into rope_parameters with rope_theta)."""
    s = cfg.rope_scaling
    if s.type == "default":
        return None
    out: dict = {"rope_type": s.type, "factor": s.factor}
    if s.type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = s.original_max_seq_len
    if s.type == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.type == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow)
        if s.attention_factor:
            out["attention_factor"] = s.attention_factor
        if not s.truncate:
            out["truncate"] = False
    return out


def _unsupported(c: dict, source: str, field: str, why: str) -> ExportError:
    return ExportError(f"{source}: {field} = {c.get(field)!r}: {why}")


# ---------------------------------------------------------------------------------------------
# The families: config.json fields beyond the shared ones, each way
# ---------------------------------------------------------------------------------------------


def _llama_to_hf(cfg: ModelConfig) -> dict:
    return {"mlp_bias": False, "pretraining_tp": 1}


def _qwen_dense_to_hf(cfg: ModelConfig) -> dict:
    return dict(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)




def _mixtral_to_hf(cfg: ModelConfig) -> dict:
    return dict(
        num_local_experts=cfg.n_experts,
        num_experts_per_tok=cfg.moe_top_k,
        intermediate_size=cfg.expert_hidden,
        router_aux_loss_coef=cfg.moe_aux_coef,
        router_jitter_noise=0.0,
        output_router_logits=False,
        sliding_window=None,
    )


def _qwen_moe_to_hf(cfg: ModelConfig) -> dict:
    return dict(
        _qwen_dense_to_hf(cfg),
        num_experts=cfg.n_experts,
        num_experts_per_tok=cfg.moe_top_k,
        moe_intermediate_size=cfg.expert_hidden,
        decoder_sparse_step=cfg.moe_every,  # layer i is MoE when (i + 1) % step == 0, as ours
        mlp_only_layers=[],
        norm_topk_prob=True,  # we renormalize the top-k weights
        router_aux_loss_coef=cfg.moe_aux_coef,
        output_router_logits=False,
    )


def _qwen2_moe_to_hf(cfg: ModelConfig) -> dict:
    return dict(
        _qwen_moe_to_hf(cfg),
        # our n_shared_experts shared experts are one SwiGLU of the summed width (model/moe.py)
        shared_expert_intermediate_size=cfg.n_shared_experts * cfg.expert_hidden,
        qkv_bias=True,  # 4.x always has q/k/v biases; zeros without ours (model/hf_names.py)
    )


def _ernie_moe_to_hf(cfg: ModelConfig) -> dict:
    return dict(
        use_bias=False,
        moe_num_experts=cfg.n_experts,
        moe_k=cfg.moe_top_k,
        moe_intermediate_size=cfg.expert_hidden,
        moe_num_shared_experts=cfg.n_shared_experts,  # one SwiGLU of n * expert width, as ours
        moe_layer_start_index=0,  # layer i is MoE when (i + 1) % interval == 0, as ours
        moe_layer_end_index=cfg.n_layers - 1,
        moe_layer_interval=cfg.moe_every,
        moe_norm_min=1e-12,  # top-k weights / max(sum, 1e-12): the sum is >= k / E here
        router_aux_loss_coef=cfg.moe_aux_coef,
        output_router_logits=False,
    )


def _llama_from_hf(c: dict, source: str) -> dict:
    return {}


def _qwen2_from_hf(c: dict, source: str) -> dict:
    return {"qkv_bias": True}


def _qwen3_from_hf(c: dict, source: str) -> dict:
    return {"qk_norm": True}


def _mixtral_from_hf(c: dict, source: str) -> dict:
    return dict(
        n_experts=_n_experts(c),
        moe_top_k=c["num_experts_per_tok"],
        expert_hidden=c["intermediate_size"],
    )


def _qwen_moe_from_hf(c: dict, source: str) -> dict:
    if c.get("mlp_only_layers"):
        raise _unsupported(c, source, "mlp_only_layers", "our dense layers follow moe_every only")
    if not c.get("norm_topk_prob", False):
        raise _unsupported(c, source, "norm_topk_prob", "our router renormalizes the top-k weights")
    return dict(
        n_experts=_n_experts(c),
        moe_top_k=c["num_experts_per_tok"],
        expert_hidden=c["moe_intermediate_size"],
        moe_every=c.get("decoder_sparse_step", 1),
    )


def _qwen3_moe_from_hf(c: dict, source: str) -> dict:
    return dict(_qwen_moe_from_hf(c, source), qk_norm=True)


def _qwen2_moe_from_hf(c: dict, source: str) -> dict:
    values = _qwen_moe_from_hf(c, source)
    shared, expert = c["shared_expert_intermediate_size"], c["moe_intermediate_size"]
    if shared % expert:
        raise _unsupported(
            c, source, "shared_expert_intermediate_size",
            f"expected a multiple of moe_intermediate_size = {expert}",
        )
    return dict(values, n_shared_experts=shared // expert)


def _ernie_moe_from_hf(c: dict, source: str) -> dict:
    every, n_layers = c.get("moe_layer_interval", 1), c["num_hidden_layers"]
    if c.get("moe_layer_start_index", 0) > every - 1:
        raise _unsupported(c, source, "moe_layer_start_index", "expected <= moe_layer_interval - 1")
    if c.get("moe_layer_end_index", -1) not in (-1, n_layers - 1):
        raise _unsupported(c, source, "moe_layer_end_index", f"expected -1 or {n_layers - 1}")
    return dict(
        n_experts=c["moe_num_experts"],
        moe_top_k=c["moe_k"],
        expert_hidden=c["moe_intermediate_size"],
        n_shared_experts=c.get("moe_num_shared_experts", 0),
        moe_every=every,
        moe_balance="bias",
    )


def _n_experts(c: dict) -> int:
    # Mixtral's field; transformers 5 also saves Qwen-MoE's num_experts under this name.
    return c["num_local_experts"] if "num_local_experts" in c else c["num_experts"]


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json "model_type"
    to_hf: Callable[[ModelConfig], dict]  # config.json fields beyond the shared ones
    from_hf: Callable[[dict, str], dict]  # (config.json, source) -> ModelConfig fields, or ExportError


FAMILIES: dict[str, Family] = {
    LLAMA: Family("llama", _llama_to_hf, _llama_from_hf),
    QWEN2: Family("qwen2", _qwen_dense_to_hf, _qwen2_from_hf),  # q/k/v biases: always
    QWEN3: Family("qwen3", _qwen_dense_to_hf, _qwen3_from_hf),
    MIXTRAL: Family("mixtral", _mixtral_to_hf, _mixtral_from_hf),
    QWEN3_MOE: Family("qwen3_moe", _qwen_moe_to_hf, _qwen3_moe_from_hf),
    QWEN2_MOE: Family("qwen2_moe", _qwen2_moe_to_hf, _qwen2_moe_from_hf),
    ERNIE_MOE: Family("ernie4_5_moe", _ernie_moe_to_hf, _ernie_moe_from_hf),
}
