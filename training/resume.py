"""What a resumed run may change: the checkpoint's config against the current one.

    python train.py --config configs/tiny.toml --checkpoint.resume=latest --optim.lr=1e-3

Changes fall in three kinds:
- refused: the network (model.*), the data (data.*) and the tokenizer. The weights, the
  optimizer state and the loader position only mean something for the same model on the same
  data; start a new run, or take the weights alone with checkpoint.init_from.
- allowed and printed: the schedule (lr and its shape, train.steps), logging, validation,
  benchmarks and checkpoint cadence, and how the run executes (devices, parallel layout,
  micro-batches, kernels, compile, threads): the loss curve continues.
- the rest (optimizer betas / eps / weight decay / clipping, seed, sequence length, batch size,
  dtype, z-loss, MoE loss coefficients...): refused unless named in checkpoint.allow_changes
  (`["train.seq_len"]`, or `["*"]` for all of them), since they change what the steps compute.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import PretrainError
from job_config import JobConfig, config_diff, flat_dict

# Never part of the comparison: how this run was started.
IGNORED = {"checkpoint.resume", "checkpoint.init_from", "checkpoint.allow_changes"}
SCHEDULE = {"optim.lr", "optim.min_lr_ratio", "optim.schedule", "optim.warmup_steps",
            "optim.decay_fraction", "train.steps"}
REPORTING = {"train.log_every", "train.val_every", "train.val_batches", "train.eval_tasks",
             "train.eval_every", "train.eval_limit", "checkpoint.every", "checkpoint.keep"}
EXECUTION = {"train.device", "train.compile", "train.threads", "train.micro_batch_size",
             "train.run_dir", "train.fused_loss", "data.workers", "model.attention",
             "model.fused_kernels"}
# Inside model.* / data.* but not the network or the data: guarded like the rest.
GUARDED_INSIDE = {"model.init_std", "model.max_seq_len", "model.moe_aux_coef", "model.moe_z_coef",
                  "model.moe_bias_rate", "data.document_masking"}


class ResumeError(PretrainError, ValueError):
    """The current config differs from the checkpoint's in ways a resumed run cannot take."""


def kind(key: str) -> str:
    """'ignored' | 'refused' | 'allowed' | 'guarded' for a flat config key."""
    if key in IGNORED:
        return "ignored"
    if key in SCHEDULE or key in REPORTING or key in EXECUTION or key.startswith(
            ("logging.", "parallel.")):
        return "allowed"
    if key.startswith(("model.", "data.")) and key not in GUARDED_INSIDE:
        return "refused"
    return "guarded"


def check_resume(ckpt: Path, saved: JobConfig, current: JobConfig,
                 tokenizer: dict | None = None, trained_tokenizer: dict | None = None) -> list[str]:
    """Raise ResumeError listing every refused (or guarded and not allowed) difference between
    the checkpoint's config `saved` and `current`; return lines describing the accepted ones.
    tokenizer / trained_tokenizer: identities of the data's tokenizer now and of the one the
    checkpoint recorded (a data dir re-prepared in place changes no config key)."""
    allow = set(current.checkpoint.allow_changes)
    changes = config_diff(flat_dict(saved.to_dict()), flat_dict(current.to_dict()))
    refused, guarded, accepted = [], [], []
    for key, (old, new) in changes.items():
        line = f"{key}: {old!r} -> {new!r}"
        k = kind(key)
        if k == "refused":
            refused.append(line)
        elif k == "guarded" and "*" not in allow and key not in allow:
            guarded.append(line)
        elif k != "ignored":
            accepted.append(line)
    if tokenizer and trained_tokenizer and trained_tokenizer.get("sha256") != tokenizer.get("sha256"):
        refused.append(
            f"tokenizer: {trained_tokenizer.get('name')!r} (sha256 "
            f"{str(trained_tokenizer.get('sha256'))[:12]}) -> {tokenizer['name']!r} (sha256 "
            f"{str(tokenizer.get('sha256'))[:12]}), the data dir was prepared again"
        )
    problems = []
    if refused:
        problems.append(
            "these change the model, the data or the tokenizer, which a resumed run cannot "
            "take (start a new run, or load the weights alone with checkpoint.init_from):\n  "
            + "\n  ".join(refused)
        )
    if guarded:
        problems.append(
            "these change what each step computes; name them in checkpoint.allow_changes to "
            f"resume anyway (e.g. --checkpoint.allow_changes='{json.dumps(_keys(guarded))}'):\n  "
            + "\n  ".join(guarded)
        )
    if problems:
        raise ResumeError(f"resuming {ckpt} with a config that differs from its own:\n"
                          + "\n".join(problems))
    return [f"resume: {line}" for line in accepted]


def _keys(lines: list[str]) -> list[str]:
    return [line.split(":", 1)[0] for line in lines]
