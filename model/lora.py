"""LoRA adapters as plain modules: a frozen projection plus a trainable low-rank update.

    wrapped = apply_lora(model, LoRAConfig(rank=16, alpha=32, targets=["wq", "wv"]), seed=0)
    with adapters_disabled(model): ...       # the base model (DPO's reference, no second copy)
    merge_lora(model)                        # W + (alpha / r) B A, plain nn.Linear again

LoRA (Hu et al., arXiv 2106.09685), as PEFT computes it (REFERENCE-POSTTRAIN.md section 2):
y = x W^T + s * B(A(dropout(x))) with s = alpha / r; A (r, in) kaiming-uniform(a=sqrt(5)),
B (out, r) zeros, so training starts at the base model exactly.

`LoRALinear` is an nn.Linear that keeps the base projection's own `weight` (and bias)
parameter, so every base tensor keeps its name (`blocks.0.attn.wq.weight`) and the adapters sit
beside it (`blocks.0.attn.wq.lora_A.weight`, `...lora_B.weight`): base checkpoints load into a
wrapped model, FSDP / DDP / activation checkpointing see ordinary modules, and the adapter
names map one to one onto PEFT's (`model/hf_peft.py`). `apply_lora` freezes everything else,
so an optimizer over the trainable parameters (training/optim.py) updates the adapters only,
and checkpoints (which skip frozen parameters) hold the adapters alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# LoRAConfig, PROJECTIONS and ALL_LINEAR live in model/config.py (torch-free: job_config imports
# them, and data.prepare imports job_config).
from model.config import ALL_LINEAR, PROJECTIONS, LoRAConfig  # noqa: E402,F401


class LoRALinear(nn.Linear):
    """nn.Linear(in, out) with the base weight frozen and a rank-r update beside it."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        # Built on the meta device, then given the base's own parameters (no copy, same names).
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device="meta")
        self.weight = base.weight
        self.bias = base.bias
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)  # (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)  # (out, r)
        self.rank, self.scaling = rank, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.adapter_enabled = True

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A kaiming-uniform(a=sqrt(5)) (nn.Linear's), B zeros."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
        self.lora_A.weight.uniform_(-bound, bound, generator=generator)
        self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(out, in): the update this adapter adds to the base weight, s * B A."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _targets_in(model: nn.Module, cfg: LoRAConfig) -> Iterator[tuple[nn.Module, str, str]]:
    """(parent module, attribute, full name) of every projection `cfg` adapts."""
    wanted = cfg.our_targets()
    n = len(model.blocks)
    layers = {i % n for i in cfg.layers if -n <= i < n} if cfg.layers else set(range(n))
    if cfg.layers and len(layers) != len(set(cfg.layers)):
        raise ValueError(f"lora.layers = {cfg.layers}: the model has blocks 0..{n - 1}")
    for i, block in enumerate(model.blocks):
        if i not in layers:
            continue
        for parent, prefix in ((block.attn, "attn"), (block.mlp, "mlp")):
            for attr in wanted:
                child = getattr(parent, attr, None)
                if isinstance(child, nn.Linear):  # an MoE layer's stacked experts are not
                    yield parent, attr, f"blocks.{i}.{prefix}.{attr}"


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Wrap the target projections of `model` (a model.transformer.Transformer, weights
    loaded) in LoRALinear, freeze every other parameter; returns the wrapped module names.
    A rank of 0 changes nothing (full-parameter training)."""
    if cfg.rank == 0:
        return []
    gen = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for parent, attr, name in list(_targets_in(model, cfg)):
        base = getattr(parent, attr)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already holds a LoRA adapter")
        wrapped = LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout)
        wrapped.reset_adapter(gen)
        setattr(parent, attr, wrapped)
        names.append(name)
    if not names:
        raise ValueError(f"lora.targets = {cfg.targets}: no projection of the model matches")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside: `model` computes its base model (the adapters add nothing)."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m in modules:
            m.adapter_enabled = True


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by our names: `blocks.0.attn.wq.lora_A.weight` (r, in), ..."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W + s B A) and put back a plain nn.Linear with
    the same parameter name; returns how many were merged. The result is an ordinary model."""
    merged = 0
    for name, module in lora_modules(model).items():
        parent = model.get_submodule(name.rpartition(".")[0])
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device="meta")
        # W + s B A in float64, rounded once to the weight's dtype (fp32 twice: 1 ulp off)
        exact = module.weight.double() + module.delta_weight().double()
        plain.weight = nn.Parameter(exact.to(module.weight.dtype), requires_grad=False)
        plain.bias = module.bias
        setattr(parent, name.rpartition(".")[2], plain)
        merged += 1
    return merged


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
