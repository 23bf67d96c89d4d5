"""Preference accuracy of a model on (prompt, chosen, rejected) pairs, as DPO measures it:

    reward(y) = beta * (log pi(y|x) - log ref(y|x))     (log p summed over the answer's tokens)
    accuracy  = fraction of pairs with reward(chosen) > reward(rejected) (a tie counts 1/2)

against the reference the run was trained from (its checkpoint.init_from), with beta from its
config; and, needing no reference, logp_accuracy: how often the model alone gives the chosen
answer the higher log-probability. `python -m eval --run DIR --preference` scores a run's own
held-out pairs (posttrain.holdout of each posttrain.data task, the same records its training
held out); `--preference FILE` any pairs file. objectives/dpo.py computes the same numbers
during training (val/accuracy, val/margin).
"""

from __future__ import annotations

import torch

from data.conversations import to_pair
from data.tokenizer import TokenizerLike
from job_config import JobConfig
from model.load import load_model
from objectives.chat_tokens import ChatTokenizer, resolve_template
from objectives.dpo import pair_example, pairs_to_batch, token_logps
from objectives.tasks import load_tasks, read_task, task_name


def preference_sets(cfg: JobConfig, tokenizer: TokenizerLike, source: str) -> dict[str, list]:
    """{task: [(chosen, rejected) examples]}: the run's held-out pairs ("heldout") or a file,
    rendered with the run's tokenizer and chat template."""
    if source == "heldout":
        if not cfg.posttrain.holdout:
            raise FileNotFoundError("--preference: the run held out no pairs (posttrain.holdout "
                                    "= 0); give a pairs file: --preference FILE")
        pairs = load_tasks(cfg.posttrain, to_pair).val
    else:
        pairs = {task_name(source): read_task(source, to_pair)}
    chat = ChatTokenizer(tokenizer, resolve_template(tokenizer, cfg.posttrain.chat_template))
    sets = {}
    for name, items in pairs.items():
        encoded = [pair_example(chat, p, cfg.train.seq_len + 1) for p in items]
        sets[name] = [e for e in encoded if e is not None]
    return sets


@torch.no_grad()
def sequence_logps(model, batch, device: torch.device) -> torch.Tensor:
    inputs, targets = batch.inputs.to(device), batch.targets.to(device)
    _, picked = token_logps(model(inputs, return_hidden=True), model.output_weight, targets)
    return picked.sum(-1).double()  # (2P,)


def evaluate_preference(model, cfg: JobConfig, tokenizer: TokenizerLike, source: str,
                        device: torch.device, batch_size: int = 8) -> dict:
    """{task: {pairs, accuracy, margin, logp_accuracy}} (accuracy and margin need a reference:
    the run's checkpoint.init_from)."""
    reference = load_model(cfg.checkpoint.init_from, device)[0] if cfg.checkpoint.init_from \
        else None
    beta = cfg.posttrain.beta
    pad = tokenizer.eot_id
    out = {}
    for name, examples in preference_sets(cfg, tokenizer, source).items():
        logp, ref = [], []
        for i in range(0, len(examples), batch_size):
            batch = pairs_to_batch(examples[i : i + batch_size], pad)
            P = batch.inputs.shape[0] // 2
            pi = sequence_logps(model, batch, device)
            logp.append(torch.stack([pi[:P], pi[P:]], 1))  # (P, 2): chosen, rejected
            if reference is not None:
                r = sequence_logps(reference, batch, device)
                ref.append(torch.stack([r[:P], r[P:]], 1))
        logp_all = torch.cat(logp)
        result = {"pairs": len(examples),
                  "logp_accuracy": (logp_all[:, 0] > logp_all[:, 1]).double().mean().item()}
        if ref:
            rewards = beta * (logp_all - torch.cat(ref))
            margin = rewards[:, 0] - rewards[:, 1]
            result["accuracy"] = ((margin > 0).double() + 0.5 * (margin == 0).double()).mean().item()
            result["margin"] = margin.mean().item()
        out[name] = result
    return out
