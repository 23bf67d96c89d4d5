"""Tensor names and layouts: our state dict <-> a transformers class's, both ways (the role of
torchtitan's per-model state_dict_adapter.py; model/hf_config.py chooses the class).

    hf_tensors = to_hf_state_dict(model.state_dict(), cfg, arch)   # ExportError if inexpressible
    state = from_hf_state_dict(hf_tensors, cfg, arch)              # the exact inverse

Most tensors are renamed one to one (`_plain_names`). The exact adaptations, per family:
- MoE: our stacked expert weights (E, out, in) are one (out, in) tensor per expert;
- Qwen2-MoE: the gated shared expert gets a zero gate (sigmoid(0) = 1/2 exactly) and a down
  projection scaled by 2 (exact), and q/k/v get zero biases when the model has none (on import,
  all-zero biases are dropped: model.qkv_bias stays off);
- Qwen2 (dense) and models with model.qkv_bias: the q/k/v biases are copied as they are;
- Ernie-4.5-MoE: the expert selection bias is `moe_statics.e_score_correction_bias` (1, E), and
  q/k rows are permuted per head from our "rotate halves" RoPE pairs to interleaved pairs.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.hf_config import ERNIE_MOE, MIXTRAL, QWEN2_MOE, ExportError

# The buffer of our MoE layer that holds the aux-loss-free balancing bias (model/moe.py).
EXPERT_BIAS_SUFFIXES = (".expert_bias",)


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
        if cfg.qkv_bias:
            for ours, theirs in ATTN_NAMES[:3]:
                pairs.append((f"{b}attn.{ours}.bias", f"{h}self_attn.{theirs}.bias"))
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
    if arch == QWEN2_MOE and not cfg.qkv_bias:  # Qwen2-MoE always has q/k/v biases: zeros
        out.update(_zero_qkv_biases(out, cfg))
    if arch == ERNIE_MOE:  # Ernie rotates interleaved pairs (2j, 2j+1); we rotate (j, j + D/2)
        for i in range(cfg.n_layers):
            for proj in ("q_proj", "k_proj"):
                name = f"model.layers.{i}.self_attn.{proj}.weight"
                out[name] = _halves_to_interleaved(out[name], cfg.head_dim)
    for name in list(state):
        if name.endswith(EXPERT_BIAS_SUFFIXES):  # checked zero above: no effect at inference
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
    if arch == QWEN2_MOE and not cfg.qkv_bias:
        _take_zero_qkv_biases(hf, cfg, source)
    if hf:
        raise ExportError(f"{source}: tensors we have no place for: {sorted(hf)[:10]}")
    return out


# ---------------------------------------------------------------------------------------------
# Exact adaptations
# ---------------------------------------------------------------------------------------------


def _check_routing(cfg: ModelConfig, arch: str, state: dict[str, torch.Tensor]) -> None:
    """MoE routing: our router = softmax over all experts (fp32), top-k, renormalized top-k
    weights, like Mixtral (and Qwen with norm_topk_prob). The aux-loss-free balancing bias
    (moe_balance = "bias", DeepSeek-V3) is part of the model: it also decides which experts are
    chosen at inference. Only Ernie 4.5 has it; for any other class refuse unless the bias is
    exactly zero. With other balancing the buffer is never read (and stays zero)."""
    if cfg.moe_balance != "bias" or arch == ERNIE_MOE:
        return
    for name, tensor in state.items():
        if name.endswith(EXPERT_BIAS_SUFFIXES) and torch.any(tensor != 0):
            raise ExportError(
                f"{name}: model.moe_balance = 'bias' learned a per-expert selection bias that "
                f"changes which experts are picked at inference; {arch} has no field for it"
            )


QKV_BIASES = ("q_proj", "k_proj", "v_proj")


def _zero_qkv_biases(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Zero q/k/v biases (out,) beside the HF projection weights: our attention has none."""
    out = {}
    for i in range(cfg.n_layers):
        for proj in QKV_BIASES:
            weight = hf[f"model.layers.{i}.self_attn.{proj}.weight"]
            out[f"model.layers.{i}.self_attn.{proj}.bias"] = weight.new_zeros(weight.shape[0])
    return out


def has_qkv_biases(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> bool:
    """Whether a Qwen2-MoE file's q/k/v biases hold anything but zeros (ours, without
    model.qkv_bias, are zeros)."""
    return any(
        torch.any(hf[name] != 0)
        for i in range(cfg.n_layers) for proj in QKV_BIASES
        if (name := f"model.layers.{i}.self_attn.{proj}.bias") in hf
    )


def _take_zero_qkv_biases(hf: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """Remove the q/k/v biases from `hf`; ExportError unless they are zero (or absent)."""
    for i in range(cfg.n_layers):
        for proj in QKV_BIASES:
            name = f"model.layers.{i}.self_attn.{proj}.bias"
            bias = hf.pop(name, None)  # absent when qkv_bias = false (transformers 5)
            if bias is not None and torch.any(bias != 0):
                raise ExportError(f"{source}: {name} is not zero: our attention has no biases")


def _halves_to_interleaved(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(H*D, dim) projection rows per head: row j -> 2j, row j + D/2 -> 2j + 1. Applied to q and
    k alike it leaves q.k unchanged and turns our RoPE pairs (j, j + D/2) into (2j, 2j + 1)."""
    dim = w.shape[1]
    return w.reshape(-1, 2, head_dim // 2, dim).transpose(1, 2).reshape(-1, dim).contiguous()


def _interleaved_to_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    dim = w.shape[1]
    return w.reshape(-1, head_dim // 2, 2, dim).transpose(1, 2).reshape(-1, dim).contiguous()
