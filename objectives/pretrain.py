"""Pretraining: next-token prediction on the prepared token shards of `data.path` (or the
weighted domains of `data.mixture`), validated on the held-out shards."""

from __future__ import annotations

import math

import torch
from torch import nn

from data.loader import TokenStream, build_train_loader, validation_batches
from data.manifest import load_manifest, manifest_tokenizer
from job_config import ConfigError, JobConfig
from parallel.dist import all_reduce_max, all_reduce_sum
from parallel.parallelize import LossFn, build_loss_fn


class Pretrain:
    def __init__(self, cfg: JobConfig, mesh, device: torch.device):
        t = cfg.train
        self.cfg, self.device = cfg, device
        manifest = load_manifest(cfg.data.path)
        tok = manifest["tokenizer"]
        if tok["n_vocab"] > cfg.model.vocab_size:
            raise ConfigError(
                f"{cfg.data.path}/manifest.json: tokenizer {tok['name']!r} has {tok['n_vocab']} "
                f"ids, more than model.vocab_size = {cfg.model.vocab_size}; raise model.vocab_size"
            )
        eot_id = tok["eot_id"] if cfg.data.document_masking else None
        self.loader = build_train_loader(  # one dataset, or the weighted domains of data.mixture
            cfg.data, manifest, t.seq_len, t.batch_size, t.micro_batch_size,
            mesh.dp_rank, mesh.dp_size, t.seed, eot_id,
        )  # ranks of one tensor-parallel group read the same batch
        # Every rank validates on its own batches: at least one each (val_batches rounded up
        # to a multiple of the data-parallel ranks).
        n_val = -(-t.val_batches // mesh.dp_size) * mesh.dp_size
        val = validation_batches(
            TokenStream(cfg.data.path, "val", manifest), t.seq_len, t.micro_batch_size,
            n_val, mesh.dp_rank, mesh.dp_size, eot_id,
        )
        # Sharded models run collectives in forward: every rank validates as many batches.
        fewest = -all_reduce_max(torch.tensor(-float(len(val)), device=device)).item()
        self.val_batches = val[: int(fewest)]
        self.manifest, self.tok_info = manifest, tok
        self.tokenizer_identity = {**tok, "data_path": cfg.data.path}  # in every checkpoint
        self.tokens_per_step = t.batch_size * t.seq_len
        self.info = {"manifest": manifest}

    @property
    def tokenizer(self):
        return manifest_tokenizer(self.cfg.data.path, self.manifest)

    def build_loss(self, model: nn.Module, raw: nn.Module) -> LossFn:
        return build_loss_fn(model, raw, self.cfg, self.device)

    @torch.no_grad()
    def validate(self, model: nn.Module, loss_fn: LossFn) -> dict[str, float]:
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self.val_batches:
            total[0] += loss_fn(batch).double()
            total[1] += 1
        model.train()
        total = all_reduce_sum(total)
        loss = (total[0] / total[1]).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    def metrics(self) -> dict[str, float]:
        return self.loader.metrics()  # domains drawn (mixtures), since the last log line

    def describe(self) -> str:
        tok = self.tok_info
        return (f"{self.loader.num_tokens:,} train tokens, tokenizer {tok['name']} "
                f"({tok['n_vocab']} ids)")
