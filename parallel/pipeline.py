"""Pipeline parallelism with torch.distributed.pipelining: the layer stack split into stages, one
(1F1B, GPipe) or several (Interleaved1F1B, InterleavedZeroBubble) per pp rank, composed with
FSDP / HSDP, tensor and expert parallelism inside each stage.

    stage s of S = pp x stages_per_rank holds layers [first_s, last_s) of the model, the
    embedding (s = 0), and the final norm, output matrix and loss (s = S - 1); pp rank r runs
    stages r, r + pp, r + 2 pp, ... (the looped placement of interleaved schedules)

A stage keeps the full model's parameter names (`blocks.12.attn.wq.weight`, a ModuleDict keyed
by layer number), so its state dict is a slice of the one-process model's and DCP checkpoints
reshard between pipeline sizes (and to no pipeline at all) like any other layout.

The last stage computes the loss in its own forward (the schedule's loss_fn passes it through):
the output matrix is then read while FSDP holds it unsharded, and the fused / vocabulary-
parallel losses work as without pipelining. The MoE balancing loss of each stage joins the
backward through an identity on the activations whose backward adds its gradient (DeepSpeed /
Megatron's "aux loss scaler"), since a stage's backward starts from its output, not a loss.

With tied embeddings the first and last stages each hold `embed.weight` (the input embedding
and the output matrix): both start equal (the same init or checkpoint entry), their gradients
are summed over the two ranks every step (parallel/grads.py) and the optimizer keeps them
equal; checkpoints store the one name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from data.loader import Batch
from model.moe import moe_aux_loss, moe_layers
from parallel.mesh import MULTI_STAGE_SCHEDULES, MeshInfo


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges of nearly equal length; the first stages take the remainder."""
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


class _AddAuxGrad(torch.autograd.Function):
    """x -> x; the backward also sends gradient 1 to `aux` (a scalar loss computed from x's
    history), so that loss is minimized by the stage's backward."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_shape = aux.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.aux_shape, dtype=grad.dtype, device=grad.device)


class PipelineStageModule(nn.Module):
    """Layers `layers` of a Transformer (model.transformer) under their own names; the first
    stage embeds token ids, later ones take hidden states (B, T, dim) (under TP the local
    sequence shard (B, T/P, dim)); the last returns the micro-batch's mean loss from
    `loss(hidden, output_weight, targets)`."""

    def __init__(self, model: nn.Module, layers: range | list[int], first: bool, last: bool,
                 loss: Callable | None = None, aux_scale: float = 1.0):
        super().__init__()
        self.cfg, self.first, self.last = model.cfg, first, last
        self.loss, self.aux_scale = loss, aux_scale
        tied = model.lm_head is None
        self.embed = model.embed if first or (last and tied) else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.register_buffer("rope_cos", torch.empty_like(model.rope_cos), persistent=False)
        self.register_buffer("rope_sin", torch.empty_like(model.rope_sin), persistent=False)
        self._moe = {i for i, b in self.blocks.items() if moe_layers(b)}

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, x: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None):
        T = targets.shape[1]  # x may be a sequence shard
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        if self.first:
            x = self.embed(x)
        for i, block in self.blocks.items():
            x = block(x, cos, sin, doc_ids)
            if i in self._moe and self.training:
                x = _AddAuxGrad.apply(x, self.aux_scale * moe_aux_loss(block))
        if not self.last:
            return x
        return self.loss(self.norm(x), self.output_weight, targets)


def split_stages(model: nn.Module, mesh: MeshInfo, loss: Callable, aux_scale: float):
    """(rank module, stage modules, stage indices) of this pp rank, from a (meta) Transformer.
    The rank module holds every parameter of this rank's stages under our names (the optimizer
    and checkpoints use it); the stage modules share its submodules."""
    d = mesh.dims
    n_stages = d.pp * d.stages_per_rank
    ranges = stage_layers(model.cfg.n_layers, n_stages)
    ids = [mesh.pp_rank + k * d.pp for k in range(d.stages_per_rank)]
    stages = [PipelineStageModule(model, ranges[s], s == 0, s == n_stages - 1, loss, aux_scale)
              for s in ids]
    if len(stages) == 1:
        return stages[0], stages, ids
    layers = [i for s in ids for i in ranges[s]]
    rank_module = PipelineStageModule(model, layers, 0 in ids, n_stages - 1 in ids)
    return rank_module, stages, ids


def tied_embedding_group(mesh: MeshInfo) -> dist.ProcessGroup | None:
    """The two ranks (first and last pp rank, same other coordinates) whose `embed.weight`
    gradients are summed; every rank takes part in creating every pair's group."""
    ranks = mesh.mesh.mesh  # (pp, ...) global ranks
    first, last = ranks[0].flatten().tolist(), ranks[-1].flatten().tolist()
    mine = None
    for a, b in zip(first, last):
        group = dist.new_group([a, b])
        if dist.get_rank() in (a, b):
            mine = group
    return mine


class Pipeline:
    """The schedule over this rank's stages: `forward_backward(micro_batches)` for training (the
    loop's step) and `loss_fn(batch)` for validation (forward only); both return the loss on
    every rank (broadcast from the last stage over the pp group)."""

    def __init__(self, stages: list[nn.Module], ids: list[int], mesh: MeshInfo, cfg, device,
                 autocast: Callable, activation_dtype: torch.dtype = torch.float32):
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import ScheduleGPipe, get_schedule_class

        d, p = mesh.dims, cfg.parallel
        self.device, self.autocast = device, autocast
        self.group = mesh.pp_mesh.get_group()
        self.last_rank = d.pp - 1  # the last stage's pp rank (looped placement)
        self.has_first, self.has_last = 0 in ids, d.pp * d.stages_per_rank - 1 in ids
        n_stages = d.pp * d.stages_per_rank
        n_micro = cfg.train.batch_size // (cfg.train.micro_batch_size * d.dp)

        # Static shapes: what crosses a stage boundary is known (a micro-batch of hidden states,
        # (B, T/tp, dim) under sequence parallelism; token ids in, the loss out). Without them
        # each stage would run a forward on empty tensors to infer them, which MoE layers would
        # count as routed tokens.
        t = cfg.train
        tokens = torch.empty(t.micro_batch_size, t.seq_len, dtype=torch.long, device="meta")
        hidden = torch.empty(t.micro_batch_size, t.seq_len // d.tp, cfg.model.dim,
                             dtype=activation_dtype, device="meta", requires_grad=True)
        loss = torch.empty((), dtype=torch.float32, device="meta", requires_grad=True)

        def make(schedule, n):
            staged = [PipelineStage(m, s, n_stages, device, group=self.group,
                                    input_args=tokens if s == 0 else hidden,
                                    output_args=loss if s == n_stages - 1 else hidden)
                      for m, s in zip(stages, ids)]
            multi = p.pp_schedule in MULTI_STAGE_SCHEDULES
            return schedule(staged if multi else staged[0], n_microbatches=n,
                            loss_fn=lambda out, target: out)  # the last stage returns the loss

        self.schedule = make(get_schedule_class(p.pp_schedule), n_micro)
        # Validation: one micro-batch, forward only (its own stage objects: a schedule sizes
        # its buffers by its micro-batch count).
        single = p.pp_schedule not in MULTI_STAGE_SCHEDULES
        self.eval_schedule = make(ScheduleGPipe if single else get_schedule_class(p.pp_schedule), 1)

    def _run(self, schedule, batch: Batch, train: bool) -> torch.Tensor:
        inputs = batch.inputs.to(self.device)
        targets = batch.targets.to(self.device)
        kwargs = {"targets": targets}
        if batch.doc_ids is not None:
            kwargs["doc_ids"] = batch.doc_ids.to(self.device)
        args = (inputs,) if self.has_first else ()
        losses: list[torch.Tensor] = []
        with self.autocast():
            run = schedule.step if train else schedule.eval
            run(*args, target=targets, losses=losses, return_outputs=False, **kwargs)
        loss = (torch.stack([x.detach().float() for x in losses]).mean() if self.has_last
                else torch.zeros((), device=self.device))
        dist.broadcast(loss, group=self.group, group_src=self.last_rank)
        return loss

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Concatenated, the step's micro-batches are split again by the schedule (the same
        micro-batches, in order); gradients are averaged over them (scale_grads)."""
        doc_ids = [b.doc_ids for b in micro_batches]
        batch = Batch(
            torch.cat([b.inputs for b in micro_batches]),
            torch.cat([b.targets for b in micro_batches]),
            torch.cat(doc_ids) if doc_ids[0] is not None else None,
        )
        return self._run(self.schedule, batch, train=True)

    def loss_fn(self, batch: Batch) -> torch.Tensor:
        return self._run(self.eval_schedule, batch, train=False)
