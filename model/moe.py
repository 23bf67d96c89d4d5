"""Mixture-of-Experts layer: top-k router, SwiGLU experts, optional shared experts, dropless
dispatch, and the load-balancing machinery the training loop drives.

Routing follows Mixtral / Qwen3-MoE (norm_topk_prob=True) so the model exports to those formats:
router logits in fp32, softmax over all experts, top-k, the k weights renormalized to sum to 1.

Balancing (`cfg.moe_balance`):
  "aux"  Switch auxiliary loss  E * sum_i f_i * p_i  (times moe_aux_coef) plus the router z-loss
         mean(logsumexp(logits)^2) (times moe_z_coef). f_i = fraction of the N*k token slots sent
         to expert i, p_i = mean router probability of expert i; the loss is 1 at perfect balance.
         Both are computed on the tokens of one forward (one micro-batch on one rank).
  "bias" DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias is added to the scores only
         to *choose* the experts; the weights still come from the unbiased softmax. After each
         optimizer step, bias += rate * sign(mean_load - load_i) (`moe_after_step`).
  "none" nothing.

Dispatch is dropless: the N*k token slots are sorted by expert, each expert runs on its
contiguous group (one `torch._grouped_mm` per projection on CUDA sm90+ in bf16, a loop over
experts elsewhere), and the results are un-sorted and summed with the routing weights. Nothing
here knows about process groups: parallel/expert_parallel.py swaps `MoE.dispatcher` for an
all-to-all version and shards the stacked expert weights.

Expert weights are stacked tensors, w_gate/w_up (E, hidden, dim) and w_down (E, dim, hidden), so
expert j's HF weights (Mixtral w1/w3/w2, Qwen3-MoE gate/up/down_proj) are plain slices [j].
Shared experts (n_shared_experts > 0) are one SwiGLU `FeedForward` named `shared` of hidden size
n_shared_experts * expert_hidden that sees every token (n shared experts of equal size fused into
one: the same function, one matmul instead of n).

Module-level functions for the training loop: `moe_aux_loss(model)` after each forward (zero for
a dense model), `moe_after_step(model, reduce)` after each optimizer step (registered as a step
hook by parallel/moe_balance.py, which sums the loads over ranks), `moe_metrics(model)` when
logging (empty for a dense model). Nothing here knows about process groups; the load report CLI
is `python -m eval.moe_load`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers import FeedForward


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's (train.py's bf16 on GPU) or x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch._grouped_mm has fast kernels for bf16 on CUDA compute capability 9.0+ (Hopper)."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and compute_dtype(x) == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
    )


class Router(nn.Linear):
    """The gate: (N, dim) -> (N, E) logits, always in fp32 (top-k on bf16 logits ties and
    flips). A module of its own, called by MoE, so wrappers (FSDP units) see it run."""

    def __init__(self, dim: int, n_experts: int):
        super().__init__(dim, n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


class MoE(nn.Module):
    """Drop-in replacement for the dense FeedForward: (B, T, dim) -> (B, T, dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.moe_top_k
        self.dim, self.hidden = cfg.dim, cfg.expert_hidden
        self.balance = cfg.moe_balance
        self.aux_coef, self.z_coef = cfg.moe_aux_coef, cfg.moe_z_coef
        self.bias_rate = cfg.moe_bias_rate
        self.fused = cfg.fused_kernels

        self.router = Router(cfg.dim, cfg.n_experts)
        E, H, D = cfg.n_experts, cfg.expert_hidden, cfg.dim
        self.w_gate = nn.Parameter(torch.empty(E, H, D))
        self.w_up = nn.Parameter(torch.empty(E, H, D))
        self.w_down = nn.Parameter(torch.empty(E, D, H))
        n_shared = cfg.n_shared_experts
        self.shared = FeedForward(D, n_shared * H, cfg.fused_kernels) if n_shared else None
        # Persistent so it is saved in checkpoints and restored on resume; all zeros unless
        # balance == "bias". Kept in fp32 (see `_route`) since updates are ~1e-3.
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))

        # None: grouped GEMM where `grouped_mm_supported`, else the loop; True/False forces it.
        self.use_grouped_mm: bool | None = None
        # Replaced by expert parallelism: (moe, xs sorted by expert (M, D), counts (E,)) -> (M, D)
        self.dispatcher: Callable | None = None

        # Statistics of the training forwards (plain attributes, not buffers, so DDP's buffer
        # broadcast never overwrites them and they never enter a checkpoint).
        self.last_aux_loss: torch.Tensor | None = None  # scalar with grad, from the last forward
        self.step_load: torch.Tensor | None = None  # (E,) slots per expert since update_bias
        self._log_load: torch.Tensor | None = None  # (E,) slots per expert since moe_metrics
        # Summed raw aux / z-loss since moe_metrics, kept as tensors: no GPU sync per forward.
        self._log_aux: torch.Tensor | None = None
        self._log_z: torch.Tensor | None = None
        self._log_forwards = 0

    # --- routing ------------------------------------------------------------------------------

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, dim) -> expert ids (N, k) int64, weights (N, k) fp32 summing to 1 per token."""
        logits = self.router(x)  # (N, E) fp32
        probs = logits.softmax(dim=-1)
        if self.balance == "bias":
            # The bias decides which experts are chosen, never how much they weigh.
            _, idx = torch.topk(probs.detach() + self.expert_bias.float(), self.top_k, dim=-1)
        else:
            _, idx = torch.topk(probs, self.top_k, dim=-1)
        weights = probs.gather(1, idx)
        weights = weights / weights.sum(dim=-1, keepdim=True)

        if self.training:
            self._record(logits, probs, idx)
        else:
            self.last_aux_loss = None
        return idx, weights

    def _record(self, logits: torch.Tensor, probs: torch.Tensor, idx: torch.Tensor) -> None:
        """Balancing losses of this forward and load statistics for the bias update and metrics."""
        E = self.n_experts
        load = torch.bincount(idx.flatten(), minlength=E).float()  # (E,) token slots per expert
        frac = load / idx.numel()  # f_i, sums to 1
        aux = E * (frac * probs.mean(dim=0)).sum()  # gradient flows through p_i only
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        if self.balance == "aux":
            self.last_aux_loss = self.aux_coef * aux + self.z_coef * z
        else:
            self.last_aux_loss = None
        # Activation checkpointing runs the forward again inside the backward: count each token
        # once (and keep the recomputation's ops a subset of the forward's, as selective
        # checkpointing requires).
        if torch._C._current_graph_task_id() != -1:
            return
        with torch.no_grad():
            self.step_load = load if self.step_load is None else self.step_load + load
            self._log_load = load if self._log_load is None else self._log_load + load
            aux, z = aux.detach(), z.detach()
            self._log_aux = aux if self._log_aux is None else self._log_aux + aux
            self._log_z = z if self._log_z is None else self._log_z + z
            self._log_forwards += 1

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing step: bias += rate * sign(mean_load - load_i), where `load`
        (E,) counts the token slots each expert received since the last update (summed over the
        data-parallel ranks by the caller). Resets this layer's count."""
        self.expert_bias += self.bias_rate * torch.sign(load.mean() - load)
        self.step_load = None

    # --- experts ------------------------------------------------------------------------------

    def experts_forward(
        self,
        xs: torch.Tensor,
        counts: torch.Tensor,
        weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the experts of `weights` (default: all of this layer's) on their groups.
        xs: (M, dim) token rows sorted by expert, counts: (n,) rows per expert (summing to M)
        -> (M, dim). `weights` replaces (w_gate, w_up, w_down) by n experts' slices, e.g. the
        local shards expert parallelism holds (parallel/expert_parallel.py)."""
        w_gate, w_up, w_down = weights or (self.w_gate, self.w_up, self.w_down)
        use_grouped = self.use_grouped_mm
        if use_grouped is None:
            use_grouped = grouped_mm_supported(xs)
        if use_grouped:
            # Autocast does not cover _grouped_mm: cast inputs and weights to the compute dtype.
            dtype = compute_dtype(xs)
            xs, w_gate, w_up, w_down = (t.to(dtype) for t in (xs, w_gate, w_up, w_down))
            offs = counts.cumsum(0).to(torch.int32)  # end row of each group
            gate = torch._grouped_mm(xs, w_gate.transpose(-2, -1), offs=offs)  # (M, H)
            up = torch._grouped_mm(xs, w_up.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(self._act(gate, up), w_down.transpose(-2, -1), offs=offs)
        # Every expert runs, even on zero rows, so every expert weight always gets a gradient
        # (zeros for an idle expert), as with the grouped GEMM.
        # unbind (not w[e]) so the backward stacks the E gradients once instead of adding E
        # full-size zero-padded ones.
        out = []
        groups = xs.split(counts.tolist())
        for rows, wg, wu, wd in zip(groups, w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0)):
            hidden = self._act(rows @ wg.t(), rows @ wu.t())  # (n, H)
            out.append(hidden @ wd.t())  # (n, D)
        return torch.cat(out)

    def _act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from kernels.swiglu import swiglu

            return swiglu(gate, up)
        return F.silu(gate) * up

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        xf = x.reshape(B * T, D)
        idx, weights = self._route(xf)  # (N, k) each
        N, k = idx.shape

        # Sort the N*k token slots by expert; slot s = token s // k, choice s % k. The stable
        # sort keeps token order within an expert (deterministic).
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)  # (N*k,)
        counts = torch.bincount(flat, minlength=self.n_experts)  # (E,)
        # Gathering from the expanded (N*k, D) view with a permutation: its backward has no
        # duplicate indices, and the expand's backward sums the k copies per token.
        xs = xf[:, None, :].expand(N, k, D).reshape(N * k, D)[order]  # (N*k, D) by expert

        if self.dispatcher is None:
            ys = self.experts_forward(xs, counts)
        else:
            ys = self.dispatcher(self, xs, counts)

        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        ys = ys[inverse].view(N, k, D)  # back to token-major slots
        out = (ys * weights.to(ys.dtype).unsqueeze(-1)).sum(dim=1)  # (N, D)
        if self.shared is not None:
            out = out + self.shared(xf)
        return out.view(B, T, D)


# ---------------------------------------------------------------------------------------------
# What the training loop calls
# ---------------------------------------------------------------------------------------------


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(short name, module) for each MoE layer; the name is "layer{i}" for blocks.{i}.mlp (any
    wrapper prefix such as DDP's "module." or compile's "_orig_mod." is ignored)."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            match = re.search(r"blocks\.(\d+)\.", name)
            layers.append((f"layer{match.group(1)}" if match else name, module))
    return layers


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum over MoE layers of the balancing losses (already times their coefficients) of the
    last forward: a scalar with grad, to add to the LM loss (scaled like it under gradient
    accumulation). Zero when balancing is not "aux" or the model has no MoE layers."""
    total = None
    for _, layer in moe_layers(model):
        if layer.last_aux_loss is not None:
            total = layer.last_aux_loss if total is None else total + layer.last_aux_loss
    if total is None:
        device = next(model.parameters()).device
        return torch.zeros((), device=device)
    return total


@torch.no_grad()
def moe_after_step(
    model: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    """Call after each optimizer step (on every rank). For "bias" balancing, move each expert's
    bias towards balance using the loads of all training forwards since the last call (all
    micro-batches). `reduce` sums the (L, E) loads over the data-parallel ranks so that every
    rank keeps identical biases (parallel/moe_balance.py registers this with an all-reduce as
    an optimizer step hook); None uses this process's loads. Resets the counts."""
    layers = [m for _, m in moe_layers(model) if m.balance == "bias" and m.step_load is not None]
    if layers:
        loads = torch.stack([m.step_load for m in layers])  # (L, E): one reduction for all
        if reduce is not None:
            loads = reduce(loads)
        for m, load in zip(layers, loads):
            m.update_bias(load)
    for _, m in moe_layers(model):
        m.step_load = None


@torch.no_grad()
def moe_metrics(model: nn.Module) -> dict[str, float]:
    """Per MoE layer, over this rank's training forwards since the last call (then reset):
    moe/layer{i}/frac_e{j} (fraction of token slots sent to expert j), moe/layer{i}/max_min_ratio
    (busiest / idlest expert; inf when one got nothing), moe/layer{i}/aux_loss and z_loss (the raw
    values, before coefficients, computed whatever the balancing method); moe/max_min_ratio is the
    worst layer."""
    out: dict[str, float] = {}
    worst = 0.0
    for name, m in moe_layers(model):
        if m._log_load is None:
            continue
        load = m._log_load
        frac = (load / load.sum()).tolist()
        width = len(str(m.n_experts - 1))
        for j, f in enumerate(frac):
            out[f"moe/{name}/frac_e{j:0{width}d}"] = f
        lo, hi = float(load.min()), float(load.max())
        ratio = hi / lo if lo > 0 else float("inf")
        worst = max(worst, ratio)
        out[f"moe/{name}/max_min_ratio"] = ratio
        out[f"moe/{name}/aux_loss"] = float(m._log_aux) / m._log_forwards
        out[f"moe/{name}/z_loss"] = float(m._log_z) / m._log_forwards
        m._log_load, m._log_aux, m._log_z, m._log_forwards = None, None, None, 0
    if out:
        out["moe/max_min_ratio"] = worst
    return out
