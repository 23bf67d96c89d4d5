"""Export to / import from the Hugging Face transformers format, with no custom code.

    python -m model.hf export --run runs/tiny [--step N] --out hf/tiny [--max-shard-size 5GB]
    python -m model.hf import --hf hf/tiny --out runs/from-hf

Which transformers class a model becomes (the first row that fits):

    MoE with moe_balance = "bias" (no qk_norm)  Ernie4_5_MoeForCausalLM  (dense layers, shared ok)
    MoE + shared experts (no qk_norm)           Qwen2MoeForCausalLM      (dense layers ok)
    MoE + qk_norm (no shared experts)           Qwen3MoeForCausalLM      (dense layers ok)
    MoE, every layer MoE                        MixtralForCausalLM
    dense + qk_norm                             Qwen3ForCausalLM
    dense                                       LlamaForCausalLM

Our parameters map one to one onto the Hugging Face names (RoPE is already the "rotate halves"
convention Llama / Qwen / Mixtral use, so q/k need no permutation; the tests compare logits).
Exact adaptations: stacked expert weights (E, ...) are written as one tensor per expert.
Qwen2-MoE's gated shared expert, sigmoid(shared_expert_gate(x)) * shared(x), gets a zero gate
(sigmoid(0) is exactly 1/2) and a down projection scaled by exactly 2, which together compute our
ungated shared expert bit for bit (scaling by a power of two is exact in floating point).
Aux-loss-free balancing (a per-expert bias added to the softmax scores to choose the experts, at
inference too) is computed exactly only by Ernie 4.5's MoE router
(`moe_statics.e_score_correction_bias`); Ernie rotates interleaved pairs, so q/k rows are
permuted per head from halves to interleaved on the way (q.k is unchanged).

A model that a target class cannot express (a feature transformers has no field for) stops with
an `ExportError` naming the feature, rather than writing files that load but compute something
else. Import is the inverse, into a run directory that training can start from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.atomic import atomic_dir, write_json, write_text
from model.config import ModelConfig

LLAMA, QWEN3 = "LlamaForCausalLM", "Qwen3ForCausalLM"
MIXTRAL, QWEN3_MOE, QWEN2_MOE = "MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"
ERNIE_MOE = "Ernie4_5_MoeForCausalLM"
MODEL_TYPES = {
    LLAMA: "llama",
    QWEN3: "qwen3",
    MIXTRAL: "mixtral",
    QWEN3_MOE: "qwen3_moe",
    QWEN2_MOE: "qwen2_moe",
    ERNIE_MOE: "ernie4_5_moe",
}
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ExportError(ValueError):
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
    if not cfg.is_moe:
        return QWEN3 if cfg.qk_norm else LLAMA
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


def _check_routing(cfg: ModelConfig, arch: str, state: dict[str, torch.Tensor]) -> None:
    """MoE routing: our router = softmax over all experts (fp32), top-k, renormalized top-k
    weights, like Mixtral (and Qwen with norm_topk_prob). The aux-loss-free balancing bias
    (moe_balance = "bias", DeepSeek-V3) is part of the model: it also decides which experts are
    chosen at inference. Only Ernie 4.5 has it; for any other class refuse unless the bias is
    exactly zero. With other balancing the buffer is never read (and stays zero)."""
    if cfg.moe_balance != "bias" or arch == ERNIE_MOE:
        return
    for name, tensor in state.items():
        if name.endswith(_EXPERT_BIAS_SUFFIXES) and torch.any(tensor != 0):
            raise ExportError(
                f"{name}: model.moe_balance = 'bias' learned a per-expert selection bias that "
                f"changes which experts are picked at inference; {arch} has no field for it"
            )


# The buffer of our MoE layer that holds the aux-loss-free balancing bias (model/moe.py).
_EXPERT_BIAS_SUFFIXES = (".expert_bias",)


# ---------------------------------------------------------------------------------------------
# Names: ours <-> Hugging Face
# ---------------------------------------------------------------------------------------------


def _moe_prefix(arch: str, layer: int) -> str:
    return f"model.layers.{layer}." + ("block_sparse_moe." if arch == MIXTRAL else "mlp.")


def _expert_names(arch: str, layer: int, expert: int) -> tuple[str, str, str]:
    """(gate, up, down) weight names of one expert; transformers 5 fuses them in memory but
    reads and writes these per-expert names, so the files work with 4.x and 5.x."""
    p = f"{_moe_prefix(arch, layer)}experts.{expert}."
    if arch == MIXTRAL:
        return p + "w1.weight", p + "w3.weight", p + "w2.weight"
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"


ATTN_NAMES = (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))
MLP_NAMES = (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))


def _plain_names(cfg: ModelConfig, arch: str) -> list[tuple[str, str]]:
    """(our name, HF name) for every tensor that is copied unchanged."""
    pairs = [("embed.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        pairs.append((b + "attn_norm.weight", h + "input_layernorm.weight"))
        for ours, theirs in ATTN_NAMES:
            pairs.append((f"{b}attn.{ours}.weight", f"{h}self_attn.{theirs}.weight"))
        if cfg.qk_norm:
            pairs.append((b + "attn.q_norm.weight", h + "self_attn.q_norm.weight"))
            pairs.append((b + "attn.k_norm.weight", h + "self_attn.k_norm.weight"))
        pairs.append((b + "mlp_norm.weight", h + "post_attention_layernorm.weight"))
        if cfg.is_moe_layer(i):
            moe = _moe_prefix(arch, i)
            pairs.append((b + "mlp.router.weight", moe + "gate.weight"))
            if cfg.n_shared_experts and arch == ERNIE_MOE:
                for ours, theirs in MLP_NAMES:
                    theirs = f"{moe}shared_experts.{theirs}.weight"
                    pairs.append((f"{b}mlp.shared.{ours}.weight", theirs))
            elif cfg.n_shared_experts:  # Qwen2-MoE: down is scaled, see to_hf_state_dict
                for ours, theirs in MLP_NAMES[:2]:
                    theirs = f"{moe}shared_expert.{theirs}.weight"
                    pairs.append((f"{b}mlp.shared.{ours}.weight", theirs))
        else:
            for ours, theirs in MLP_NAMES:
                pairs.append((f"{b}mlp.{ours}.weight", f"{h}mlp.{theirs}.weight"))
    pairs.append(("norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    return pairs


def to_hf_state_dict(
    state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str
) -> dict[str, torch.Tensor]:
    """Our state dict (our names) -> Hugging Face tensors for `arch`, in file order."""
    state = dict(state)
    _check_routing(cfg, arch, state)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ExportError(f"checkpoint has no tensor {name!r} (expected for this model config)")
        return state.pop(name)

    for ours, theirs in _plain_names(cfg, arch):
        out[theirs] = take(ours)
    for i in range(cfg.n_layers):
        if not cfg.is_moe_layer(i):
            continue
        b, moe = f"blocks.{i}.mlp.", _moe_prefix(arch, i)
        # (E, hidden, dim), (E, hidden, dim), (E, dim, hidden) -> one (out, in) matrix per expert
        w_gate, w_up, w_down = take(b + "w_gate"), take(b + "w_up"), take(b + "w_down")
        for j in range(cfg.n_experts):
            gate, up, down = _expert_names(arch, i, j)
            out[gate], out[up], out[down] = w_gate[j], w_up[j], w_down[j]
        if arch == ERNIE_MOE:  # (E,) -> (1, E), kept fp32 whatever the export dtype
            out[moe + "moe_statics.e_score_correction_bias"] = take(b + "expert_bias")[None].float()
        if arch == QWEN2_MOE:
            down = take(b + "shared.w_down.weight")
            out[moe + "shared_expert.down_proj.weight"] = down * 2  # exact: a power of two
            out[moe + "shared_expert_gate.weight"] = down.new_zeros(1, cfg.dim)  # sigmoid(0) = 1/2
    if arch == QWEN2_MOE:  # Qwen2 attention has q/k/v biases: zeros compute exactly what we do
        for i in range(cfg.n_layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                weight = out[f"model.layers.{i}.self_attn.{proj}.weight"]
                out[f"model.layers.{i}.self_attn.{proj}.bias"] = weight.new_zeros(weight.shape[0])
    if arch == ERNIE_MOE:  # Ernie rotates interleaved pairs (2j, 2j+1); we rotate (j, j + D/2)
        for i in range(cfg.n_layers):
            for proj in ("q_proj", "k_proj"):
                name = f"model.layers.{i}.self_attn.{proj}.weight"
                out[name] = _halves_to_interleaved(out[name], cfg.head_dim)
    for name in list(state):
        if name.endswith(_EXPERT_BIAS_SUFFIXES):  # checked zero above: no effect at inference
            state.pop(name)
    if state:
        raise ExportError(f"checkpoint tensors with no Hugging Face counterpart: {sorted(state)}")
    return {name: t.contiguous() for name, t in out.items()}


def from_hf_state_dict(
    hf: dict[str, torch.Tensor], cfg: ModelConfig, arch: str, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> our state dict: the exact inverse of `to_hf_state_dict`."""
    hf = dict(hf)
    for name in [n for n in hf if n.endswith("rotary_emb.inv_freq")]:
        hf.pop(name)  # old transformers saved the RoPE buffer; we recompute it
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some tools write the tied copy anyway
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ExportError(f"{source}: no tensor {name!r} (expected for {arch})")
        return hf.pop(name)

    for ours, theirs in _plain_names(cfg, arch):
        out[ours] = take(theirs)
    if arch == ERNIE_MOE:
        for i in range(cfg.n_layers):
            for ours in ("wq", "wk"):
                name = f"blocks.{i}.attn.{ours}.weight"
                out[name] = _interleaved_to_halves(out[name], cfg.head_dim)
    for i in range(cfg.n_layers):
        if not cfg.is_moe_layer(i):
            continue
        b, moe = f"blocks.{i}.mlp.", _moe_prefix(arch, i)
        experts = [[take(n) for n in _expert_names(arch, i, j)] for j in range(cfg.n_experts)]
        for k, ours in enumerate(("w_gate", "w_up", "w_down")):
            out[b + ours] = torch.stack([e[k] for e in experts])
        if arch == ERNIE_MOE:
            bias = take(moe + "moe_statics.e_score_correction_bias")  # (1, E)
            out[b + "expert_bias"] = bias.reshape(cfg.n_experts).float()
        else:
            out[b + "expert_bias"] = torch.zeros(cfg.n_experts)  # no selection bias (fp32)
        if arch == QWEN2_MOE:
            gate = take(moe + "shared_expert_gate.weight")
            if torch.any(gate != 0):
                raise ExportError(
                    f"{source}: {moe}shared_expert_gate.weight is not zero: our shared expert has "
                    "no sigmoid gate, so this Qwen2-MoE model cannot be imported"
                )
            out[b + "shared.w_down.weight"] = take(moe + "shared_expert.down_proj.weight") / 2
    if arch == QWEN2_MOE:
        for i in range(cfg.n_layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                name = f"model.layers.{i}.self_attn.{proj}.bias"
                bias = hf.pop(name, None)  # absent when qkv_bias = false (transformers 5)
                if bias is not None and torch.any(bias != 0):
                    raise ExportError(f"{source}: {name} is not zero: our attention has no biases")
    if hf:
        raise ExportError(f"{source}: tensors we have no place for: {sorted(hf)[:10]}")
    return out


def _halves_to_interleaved(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(H*D, dim) projection rows per head: row j -> 2j, row j + D/2 -> 2j + 1. Applied to q and
    k alike it leaves q.k unchanged and turns our RoPE pairs (j, j + D/2) into (2j, 2j + 1)."""
    dim = w.shape[1]
    return w.reshape(-1, 2, head_dim // 2, dim).transpose(1, 2).reshape(-1, dim).contiguous()


def _interleaved_to_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    dim = w.shape[1]
    return w.reshape(-1, head_dim // 2, 2, dim).transpose(1, 2).reshape(-1, dim).contiguous()


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, arch: str, eot_id: int | None, dtype: torch.dtype) -> dict:
    """config.json for `arch`; every number that changes the computation is written out."""
    c = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
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
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": eot_id,  # documents are separated by end-of-text: it also starts them
        "eos_token_id": eot_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if arch == LLAMA:
        c["mlp_bias"] = False
        c["pretraining_tp"] = 1
    if arch in (QWEN3, QWEN3_MOE, QWEN2_MOE):
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if arch == MIXTRAL:
        c.update(
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.moe_top_k,
            intermediate_size=cfg.expert_hidden,
            router_aux_loss_coef=cfg.moe_aux_coef,
            router_jitter_noise=0.0,
            output_router_logits=False,
            sliding_window=None,
        )
    if arch in (QWEN3_MOE, QWEN2_MOE):
        c.update(
            num_experts=cfg.n_experts,
            num_experts_per_tok=cfg.moe_top_k,
            moe_intermediate_size=cfg.expert_hidden,
            decoder_sparse_step=cfg.moe_every,  # layer i is MoE when (i + 1) % step == 0, as ours
            mlp_only_layers=[],
            norm_topk_prob=True,  # we renormalize the top-k weights
            router_aux_loss_coef=cfg.moe_aux_coef,
            output_router_logits=False,
        )
    if arch == QWEN2_MOE:
        # our n_shared_experts shared experts are one SwiGLU of the summed width (model/moe.py)
        c["shared_expert_intermediate_size"] = cfg.n_shared_experts * cfg.expert_hidden
        c["qkv_bias"] = True  # 4.x always has q/k/v biases; we write zeros
    if arch == ERNIE_MOE:
        c.update(
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
    return c


def model_config_from_hf(c: dict, source: str = "config.json") -> tuple[ModelConfig, str]:
    """Hugging Face config.json (as a dict) -> (ModelConfig, architecture); ExportError for
    anything our Transformer does not compute."""
    archs = c.get("architectures") or []
    if len(archs) != 1 or archs[0] not in MODEL_TYPES:
        raise ExportError(
            f"{source}: architectures = {archs}: expected one of {list(MODEL_TYPES)}"
        )
    arch = archs[0]

    def unsupported(field: str, why: str) -> ExportError:
        return ExportError(f"{source}: {field} = {c.get(field)!r}: {why}")

    if c.get("hidden_act", "silu") != "silu":
        raise unsupported("hidden_act", "our MLP is SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias", "use_bias"):
        if c.get(flag):
            raise unsupported(flag, "our linear layers have no biases")
    if c.get("use_sliding_window") or (arch == MIXTRAL and c.get("sliding_window")):
        raise unsupported("sliding_window", "our attention is full causal attention")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ExportError(f"{source}: RoPE type {rope_type!r}: our RoPE has no frequency scaling")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise unsupported("partial_rotary_factor", "we rotate the whole head")
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
        rope_theta=float(theta),
        max_seq_len=c["max_position_embeddings"],
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qk_norm=arch in (QWEN3, QWEN3_MOE),
        init_std=c.get("initializer_range", 0.02),
    )
    if arch == MIXTRAL:
        values.update(
            n_experts=_n_experts(c),
            moe_top_k=c["num_experts_per_tok"],
            expert_hidden=c["intermediate_size"],
        )
    if arch in (QWEN3_MOE, QWEN2_MOE):
        if c.get("mlp_only_layers"):
            raise unsupported("mlp_only_layers", "our dense layers follow moe_every only")
        if not c.get("norm_topk_prob", False):
            raise unsupported("norm_topk_prob", "our router renormalizes the top-k weights")
        values.update(
            n_experts=_n_experts(c),
            moe_top_k=c["num_experts_per_tok"],
            expert_hidden=c["moe_intermediate_size"],
            moe_every=c.get("decoder_sparse_step", 1),
        )
    if arch == QWEN2_MOE:
        shared, expert = c["shared_expert_intermediate_size"], c["moe_intermediate_size"]
        if shared % expert:
            raise unsupported(
                "shared_expert_intermediate_size",
                f"expected a multiple of moe_intermediate_size = {expert}",
            )
        values["n_shared_experts"] = shared // expert
    if arch == ERNIE_MOE:
        every, n_layers = c.get("moe_layer_interval", 1), c["num_hidden_layers"]
        if c.get("moe_layer_start_index", 0) > every - 1:
            raise unsupported("moe_layer_start_index", "expected <= moe_layer_interval - 1")
        if c.get("moe_layer_end_index", -1) not in (-1, n_layers - 1):
            raise unsupported("moe_layer_end_index", f"expected -1 or {n_layers - 1}")
        values.update(
            n_experts=c["moe_num_experts"],
            moe_top_k=c["moe_k"],
            expert_hidden=c["moe_intermediate_size"],
            n_shared_experts=c.get("moe_num_shared_experts", 0),
            moe_every=every,
            moe_balance="bias",
        )
    if "router_aux_loss_coef" in c:
        values["moe_aux_coef"] = c["router_aux_loss_coef"]
    return ModelConfig(**values), arch


def _n_experts(c: dict) -> int:
    # Mixtral's field; transformers 5 also saves Qwen-MoE's num_experts under this name.
    return c["num_local_experts"] if "num_local_experts" in c else c["num_experts"]


# ---------------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------------


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '100KB' / '1000' -> bytes (powers of 1000, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {size!r}: expected e.g. 5GB, 500MB, 100KB or bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    scale.update(KIB=2**10, MIB=2**20, GIB=2**30)
    return int(float(m.group(1)) * scale[unit])


def write_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int
) -> list[str]:
    """One `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` plus
    `model.safetensors.index.json` when the total exceeds `max_shard_size`. Returns file names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:  # a tensor larger than the limit
            shards.append({})  # gets a shard of its own
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        _save(shards[0], out_dir / SAFETENSORS_FILE)
        return [SAFETENSORS_FILE]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        _save(shard, out_dir / fname)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(out_dir / INDEX_FILE, index, indent=2)
    return names + [INDEX_FILE]


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})  # older transformers need it
    os.chmod(path, 0o644)  # safetensors creates the file private (0600); this is for sharing


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory (single file or sharded with an index)."""
    index = hf_dir / INDEX_FILE
    if (hf_dir / SAFETENSORS_FILE).exists():
        files = [hf_dir / SAFETENSORS_FILE]
    elif index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ExportError(f"{index}: no 'weight_map' object")
        files = [hf_dir / f for f in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"{hf_dir}: no {SAFETENSORS_FILE} or {INDEX_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_model(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer=None,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write a Hugging Face model directory from our state dict; returns the architecture.

    tokenizer: our `data.tokenizer.Tokenizer` (or a tiktoken Encoding), written as
    tokenizer.json; None writes no tokenizer. dtype: 'float32' | 'bfloat16' | 'float16' or None
    to keep the checkpoint's. The directory is built beside `out_dir` and renamed into place.
    """
    arch = hf_architecture(cfg)
    encoding = getattr(tokenizer, "encoding", tokenizer)
    eot_id = None
    if encoding is not None:
        from data.hf_tokenizer import EOT

        n_vocab = encoding.max_token_value + 1
        if n_vocab > cfg.vocab_size:
            raise ExportError(
                f"tokenizer {encoding.name} has ids up to {n_vocab - 1} but model.vocab_size = "
                f"{cfg.vocab_size}: the embedding does not cover every token id"
            )
        eot_id = encoding._special_tokens.get(EOT)
    tensors = to_hf_state_dict(state, cfg, arch)
    fp32_only = ".e_score_correction_bias"  # selection bias: fp32 whatever the dtype
    if dtype is not None:
        dtype = DTYPE_ALIASES.get(dtype, dtype)
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        tensors = {
            n: t if n.endswith(fp32_only) else t.to(DTYPES[dtype]) for n, t in tensors.items()
        }
    dtypes = {t.dtype for n, t in tensors.items() if not n.endswith(fp32_only)}
    if len(dtypes) != 1:
        raise ExportError(f"checkpoint mixes dtypes {sorted(map(str, dtypes))}: pass --dtype")
    config = hf_config(cfg, arch, eot_id, dtypes.pop())

    out_dir = Path(out_dir)
    with _staging_dir(out_dir, overwrite) as tmp:
        write_safetensors(tensors, tmp, parse_size(max_shard_size))
        write_json(tmp / "config.json", config, indent=2)
        generation = {"do_sample": False, "transformers_version": _transformers_version()}
        if eot_id is not None:
            generation.update(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
        write_json(tmp / "generation_config.json", generation, indent=2)
        if encoding is not None:
            from data.hf_tokenizer import save_hf_tokenizer

            save_hf_tokenizer(encoding, tmp, model_max_length=cfg.max_seq_len)
    return arch


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    step: int | None = None,
    tokenizer: str | None = None,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    overwrite: bool = False,
    with_tokenizer: bool = True,
) -> str:
    """Export checkpoint `step` (default: the newest) of a run directory (or a checkpoint
    directory). The tokenizer is the run's prepared data's (data.path/manifest.json), or
    `tokenizer` (a spec for data.tokenizer.load_tokenizer) when given."""
    from job_config import JobConfig
    from model.checkpoint import find_checkpoint, load_config_dict, resolve_checkpoint

    ckpt = resolve_checkpoint(run_dir) if step is None else find_checkpoint(run_dir, step)
    job = JobConfig.from_dict(load_config_dict(ckpt), str(ckpt / "config.json"))
    state = load_checkpoint_model_state(ckpt, job.model)
    tok = None
    if tokenizer:
        from data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    elif with_tokenizer:
        from data.manifest import manifest_tokenizer

        try:
            tok = manifest_tokenizer(job.data.path)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{e}; the tokenizer of {ckpt} comes from its prepared data (data.path = "
                f"{job.data.path!r}): pass --tokenizer SPEC, or --no-tokenizer"
            ) from None
    return export_model(state, job.model, out_dir, tok, max_shard_size, dtype, overwrite)


def load_checkpoint_model_state(ckpt: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model state dict (our names) of a checkpoint directory: its model.safetensors, or
    a sharded torch.distributed.checkpoint (DCP) in the directory or its `model/` folder,
    consolidated here."""
    from model.checkpoint import MODEL_FILE, load_model_state

    if (ckpt / MODEL_FILE).exists():
        return load_model_state(ckpt)
    for folder in (ckpt, ckpt / "model"):
        if (folder / ".metadata").exists():
            return consolidate_dcp(folder, cfg)
    raise FileNotFoundError(f"{ckpt}: no {MODEL_FILE} and no sharded (DCP) checkpoint")


def consolidate_dcp(folder: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the model from a DCP checkpoint saved by any number of ranks, in one
    process: DCP reassembles each tensor from its shards by the global shapes in `.metadata`.

    Stored keys may carry a prefix (e.g. "model.embed.weight" for a {"model": ...} state dict);
    each of our parameter names must match exactly one stored key ("model."-prefixed preferred).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from model.transformer import Transformer

    reader = dcp.FileSystemReader(str(folder))
    stored = {
        key: meta
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()  # names and shapes only, no memory
    buffers, keys = {}, {}
    for name, t in expected.items():
        found = [k for k in stored if k == name or k.endswith("." + name)]
        if len(found) > 1:
            found = [k for k in found if k in (name, "model." + name)] or found
        if len(found) != 1:
            raise ExportError(
                f"{folder}: expected one stored tensor for {name!r}, found {found[:4] or 'none'}"
            )
        meta = stored[found[0]]
        if tuple(meta.size) != tuple(t.shape):
            raise ExportError(
                f"{folder}: {found[0]} has shape {tuple(meta.size)}, the config says {tuple(t.shape)}"
            )
        buffers[found[0]] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        keys[name] = found[0]
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(buffers, storage_reader=reader, no_dist=True)
    return {name: buffers[key] for name, key in keys.items()}


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def import_hf(
    hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None, overwrite: bool = False
) -> ModelConfig:
    """A Hugging Face Llama / Qwen3 / Mixtral / Qwen3-MoE / Qwen2-MoE / Ernie-4.5-MoE dir -> a run
    directory holding checkpoints/step_000000 (model.safetensors in our names, config.json)
    and checkpoints/latest; the tokenizer, when it converts exactly, as tokenizer.tiktoken."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} does not exist")
    cfg, arch = model_config_from_hf(
        json.loads(config_path.read_text(encoding="utf-8")), str(config_path)
    )
    state = from_hf_state_dict(read_safetensors(hf_dir), cfg, arch, str(hf_dir))
    if dtype is not None:
        dtype = DTYPE_ALIASES.get(dtype, dtype)
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        state = {  # the balancing bias buffer stays fp32 (model/moe.py)
            n: t if n.endswith(_EXPERT_BIAS_SUFFIXES) else t.to(DTYPES[dtype])
            for n, t in state.items()
        }
    from job_config import JobConfig, to_toml

    job = JobConfig(model=cfg)
    out_dir = Path(out_dir)
    job.train.run_dir = str(out_dir)
    with _staging_dir(out_dir, overwrite) as tmp:
        tokenizer_json = hf_dir / "tokenizer.json"
        if tokenizer_json.exists():
            from data.hf_tokenizer import from_hf_tokenizer
            from data.tokenizer import Tokenizer

            try:
                encoding = from_hf_tokenizer(tokenizer_json, name=hf_dir.name or "hf")
                Tokenizer(encoding, str(tokenizer_json)).save(tmp / "tokenizer.tiktoken")
                job.data.tokenizer = str(out_dir.resolve() / "tokenizer.tiktoken")
            except ValueError as e:
                print(f"tokenizer not converted ({e}); prepare data with a matching tokenizer",
                      file=sys.stderr)
        step_dir = tmp / "checkpoints" / "step_000000"
        step_dir.mkdir(parents=True)
        _save({n: t.contiguous() for n, t in state.items()}, step_dir / SAFETENSORS_FILE)
        write_json(step_dir / "config.json", job.to_dict(), indent=2)
        write_text(tmp / "checkpoints" / "latest", "step_000000\n")
        write_text(tmp / "config.toml", to_toml(job))
    return cfg


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _staging_dir(out: Path, overwrite: bool) -> AbstractContextManager[Path]:
    """A temporary directory that replaces `out` on success (common.atomic.atomic_dir: nothing
    half-written is ever at `out`); an existing non-empty `out` needs overwrite=True."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite)")
    return atomic_dir(out)


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.hf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a run's checkpoint -> Hugging Face directory")
    ex.add_argument("--run", required=True, help="run directory (holds checkpoints/)")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the run's)")
    ex.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    ex.add_argument("--max-shard-size", default="5GB", help="shard above this size (5GB)")
    dtypes = sorted(DTYPES) + sorted(DTYPE_ALIASES)
    ex.add_argument("--dtype", default=None, choices=dtypes, help="default: the checkpoint's")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    im = sub.add_parser("import", help="Hugging Face directory -> run directory")
    im.add_argument("--hf", required=True, help="Hugging Face model directory")
    im.add_argument("--out", required=True, help="output run directory")
    im.add_argument("--dtype", default=None, choices=dtypes, help="default: the files' dtype")
    im.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            arch = export_run(
                args.run, args.out, args.step, args.tokenizer, args.max_shard_size, args.dtype,
                args.overwrite, with_tokenizer=not args.no_tokenizer,
            )
            print(f"wrote {arch} to {args.out}")
        else:
            cfg = import_hf(args.hf, args.out, args.dtype, args.overwrite)
            print(f"wrote {args.out}/checkpoints/step_000000 ({cfg.num_params():,} parameters)")
    except (ExportError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
