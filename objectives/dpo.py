"""Direct Preference Optimization (Rafailov et al., arXiv 2305.18290) on (prompt, chosen,
rejected) pairs against a frozen reference model:

    h    = beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]
    loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)          (eps: label smoothing, cDPO)

log pi(y|x) is the sum of the log-probabilities of the completion's assistant tokens (after the
prompt; objectives/chat_tokens.py), as TRL computes it. The reference is the starting model:
with LoRA the same network with its adapters disabled (no second copy), otherwise a frozen
copy of checkpoint.init_from on every rank (unsharded: it runs no collectives).

Logged (TRL's names without the prefix): rewards_chosen / rewards_rejected (beta * the
log-ratio of each completion), margin (their difference), accuracy (the fraction of pairs whose
chosen reward is higher; a tie counts one half, so the untrained model scores exactly 0.5),
kl (training: the mean KL(pi || ref) of the next-token distributions at the completions'
tokens, the implicit KL the beta term holds back), and logps_chosen / logps_rejected; for
validation also logp_accuracy, how often pi alone gives the chosen completion the higher
log-probability. The reference's log-probabilities of the held-out pairs are computed once.

A micro-batch of P pairs is one Batch of 2P rows: the chosen completions, then the rejected
ones, each row padded to the longest (no packing: each row is one sequence's log-probability).
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.conversations import Pair, to_pair
from data.loader import Batch
from job_config import JobConfig
from model.load import load_model
from model.lora import adapters_disabled
from model.loss import IGNORE_INDEX
from objectives.chat_tokens import ChatTokenizer
from objectives.sft import Example, split_for_ranks
from objectives.tasks import TaskLoader, TaskMixture, describe_tasks, encode_tasks
from parallel.dist import all_reduce_sum
from parallel.parallelize import LossFn, autocast_context

PairExample = tuple[Example, Example]  # (chosen, rejected)
STATS = ("pairs", "loss", "rewards_chosen", "rewards_rejected", "accuracy", "margin",
         "logps_chosen", "logps_rejected", "logp_accuracy", "kl", "kl_tokens")


def pair_example(chat: ChatTokenizer, pair: Pair, capacity: int) -> PairExample | None:
    """(chosen, rejected) as (ids, labels): labels on the completion's assistant tokens only.
    Too long: the prompt loses tokens from its start (keeping at least half the capacity when
    it has them), then the completions are cut at their end. None if a completion is empty."""
    n = len(pair.prompt)
    encoded = [chat.encode(pair.prompt + side, start=n) for side in (pair.chosen, pair.rejected)]
    starts = [mask.index(True) if True in mask else len(mask) for _, mask in encoded]
    longest = max(len(ids) - s for (ids, _), s in zip(encoded, starts))
    out = []
    for (ids, mask), start in zip(encoded, starts):
        keep = min(start, max(capacity - longest, capacity // 2))  # prompt tokens kept
        lo = start - keep
        ids_a = np.asarray(ids[lo : lo + capacity], np.int64)
        labels = np.where(np.asarray(mask[lo : lo + capacity], bool), ids_a, IGNORE_INDEX)
        labels[0] = IGNORE_INDEX
        if not (labels != IGNORE_INDEX).any():
            return None
        out.append((ids_a, labels))
    return out[0], out[1]


def pairs_to_batch(pairs: list[PairExample], pad_id: int) -> Batch:
    """P pairs -> a Batch of 2P rows (chosen first), padded to the longest row."""
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    T = max(len(x) for x, _ in rows) - 1
    ids = np.full((len(rows), T + 1), pad_id, np.int64)
    labels = np.full((len(rows), T + 1), IGNORE_INDEX, np.int64)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(x)] = x, y
    return Batch(torch.from_numpy(ids[:, :T].copy()), torch.from_numpy(labels[:, 1:].copy()))


def token_logps(hidden: torch.Tensor, output_weight: torch.Tensor, targets: torch.Tensor):
    """hidden (B, T, dim) -> (log-softmax (B, T, V) fp32, log p of each target (B, T), 0 where
    the target is ignored)."""
    logp = F.linear(hidden, output_weight).float().log_softmax(-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return logp, picked * (targets != IGNORE_INDEX)


class PairLoader(TaskLoader):
    """Global batches of `batch_size` pairs drawn from weighted tasks; a micro-batch of
    `micro_batch_size` pairs is one Batch of twice as many rows."""

    def __init__(self, tasks: dict[str, list[PairExample]], weights: dict[str, float],
                 batch_size: int, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 pad_id: int):
        super().__init__(TaskMixture(tasks, weights, seed), batch_size, micro_batch_size, rank,
                         world_size)
        self.pad_id = pad_id

    def next_item(self) -> PairExample:
        return self.mixture.next()

    def make_batch(self, pairs: list[PairExample]) -> Batch:
        return pairs_to_batch(pairs, self.pad_id)

    @property
    def num_tokens(self) -> int:
        return sum(len(c[0]) + len(r[0]) for task in self.mixture.tasks for c, r in task)


class DPO:
    def __init__(self, cfg: JobConfig, mesh, device: torch.device):
        t, pc = cfg.train, cfg.posttrain
        if cfg.parallel.engine == "deepspeed" or cfg.parallel.tp > 1:
            raise NotImplementedError("train.objective = 'dpo' runs on the native engine without "
                                      "tensor parallelism (parallel.engine = 'native', tp = 1)")
        self.cfg, self.device = cfg, device
        tasks = encode_tasks(cfg, to_pair, pair_example)
        self.tokenizer_identity = tasks.tokenizer_identity
        self.tokenizer, self.template = tasks.tokenizer, tasks.template
        self.info = {**tasks.info, "beta": pc.beta}
        pad = self.tokenizer.eot_id
        self.loader = PairLoader(tasks.train, tasks.weights, t.batch_size, t.micro_batch_size,
                                 mesh.dp_rank, mesh.dp_size, t.seed, pad)
        self.val_sets = {
            n: split_for_ranks([pairs_to_batch(ex[i : i + t.micro_batch_size], pad)
                                for i in range(0, len(ex), t.micro_batch_size)],
                               mesh.dp_rank, mesh.dp_size, device)
            for n, ex in tasks.val.items()
        }
        self.val_refs: dict[str, list] = {}  # the reference's log p of each held-out row
        self.tokens_per_step = 2 * t.batch_size * t.seq_len  # at most: rows are cut to the longest
        self.stats = {True: torch.zeros(len(STATS), dtype=torch.float64, device=device),
                      False: torch.zeros(len(STATS), dtype=torch.float64, device=device)}

    def reference(self, raw: nn.Module):
        """(module, context) computing the reference: the adapters switched off, or a frozen
        copy of the starting model."""
        if self.cfg.lora.rank:
            return raw, lambda: adapters_disabled(raw)
        ref, _, _ = load_model(self.cfg.checkpoint.init_from, self.device)
        ref.requires_grad_(False)
        return ref, nullcontext

    def build_loss(self, model: nn.Module, raw: nn.Module) -> LossFn:
        beta, eps = self.cfg.posttrain.beta, self.cfg.posttrain.label_smoothing
        ref_module, ref_context = self.reference(raw)
        cfg, device, stats = self.cfg, self.device, self.stats

        def pair_loss(batch: Batch, ref: torch.Tensor | None = None):
            """(mean DPO loss, the reference's log p of each row (2P,)); `ref` given (the
            reference is frozen: validation keeps them) skips the reference forward and KL."""
            inputs = batch.inputs.to(device, non_blocking=True)
            targets = batch.targets.to(device, non_blocking=True)
            P = inputs.shape[0] // 2
            ref_all = None
            with autocast_context(cfg, device):
                if ref is None:
                    with torch.no_grad(), ref_context():
                        ref_hidden = ref_module(inputs, return_hidden=True)
                        ref_all, ref_tok = token_logps(ref_hidden, ref_module.output_weight,
                                                       targets)
                        ref = ref_tok.sum(-1)
                hidden = model(inputs, return_hidden=True)  # (2P, T, dim)
                pi_all, pi_tok = token_logps(hidden, raw.output_weight, targets)
            pi = pi_tok.sum(-1)  # (2P,) log p of each completion
            rewards = beta * (pi - ref).detach()
            h = beta * ((pi[:P] - ref[:P]) - (pi[P:] - ref[P:]))
            losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)  # (P,)
            with torch.no_grad():
                kl = torch.zeros(0, device=device)
                if ref_all is not None:  # per completion token: KL(pi || ref) of the next token
                    kl = (pi_all.exp() * (pi_all - ref_all)).sum(-1)[targets != IGNORE_INDEX]
                margin = rewards[:P] - rewards[P:]
                pi_d = pi.detach()
                stats[model.training] += torch.stack([
                    torch.tensor(float(P), device=device), losses.detach().sum(),
                    rewards[:P].sum(), rewards[P:].sum(),
                    ((margin > 0).double() + 0.5 * (margin == 0).double()).sum(), margin.sum(),
                    pi_d[:P].sum(), pi_d[P:].sum(), (pi_d[:P] > pi_d[P:]).double().sum(),
                    kl.double().sum(), torch.tensor(float(kl.numel()), device=device),
                ]).double()
            return losses.mean(), ref

        self._pair_loss = pair_loss
        return lambda batch: pair_loss(batch)[0]

    def _take(self, training: bool) -> torch.Tensor:
        """The statistics gathered since the last call, summed over ranks; then reset."""
        total = all_reduce_sum(self.stats[training]).clone()
        self.stats[training].zero_()
        return total

    @staticmethod
    def _summary(total: torch.Tensor) -> dict[str, float]:
        pairs = max(total[0].item(), 1.0)
        out = {name: total[i].item() / pairs for i, name in enumerate(STATS) if 0 < i < 9}
        if total[10] > 0:
            out["kl"] = total[9].item() / total[10].item()
        return out

    @torch.no_grad()
    def validate(self, model: nn.Module, loss_fn: LossFn) -> dict[str, float]:
        """DPO loss, preference accuracy, margin and KL on the held-out pairs, per task and
        over all of them (pair-weighted); val_loss is the DPO loss."""
        model.eval()
        self._take(False)
        out, totals = {}, []
        for name, batches in self.val_sets.items():
            refs = self.val_refs.setdefault(name, [None] * len(batches))
            for i, batch in enumerate(batches):
                _, refs[i] = self._pair_loss(batch, refs[i])  # the reference's, once
            totals.append(self._take(False))
            task = self._summary(totals[-1])
            out.update({f"val/{name}/{k}": task[k] for k in ("loss", "accuracy", "margin")})
        model.train()
        if totals:
            summary = self._summary(torch.stack(totals).sum(0))
            out["val_loss"] = summary.pop("loss")
            out.update({f"val/{k}": v for k, v in summary.items()})
        return out

    def metrics(self) -> dict[str, float]:
        return {**self.loader.metrics(),
                **{f"dpo/{k}": v for k, v in self._summary(self._take(True)).items()}}

    def describe(self) -> str:
        return (f"dpo (beta {self.cfg.posttrain.beta:g}) on {describe_tasks(self.info, 'pairs')}; "
                f"tokenizer "
                f"{self.tokenizer.name}; reference: "
                + ("the base (adapters off)" if self.cfg.lora.rank else "a frozen copy"))
