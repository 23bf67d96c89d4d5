"""A LoRA run's exports checked against our own model, on a held-out conversation:

    python -m bench.posttrain_export --run runs/smollm2-sft-lora [--step N] [--device auto]
        [--out FILE]

1. the merged export (`python -m model.hf export`) loaded by transformers: the warnings it
   raises (none expected) and its logits against our merged model (model/load.py);
2. the adapter in PEFT's format (`python -m model.hf_peft`) loaded by
   `peft.PeftModel.from_pretrained` onto our export of the run's base (checkpoint.init_from):
   its logits against the same, in fp32 and in float64 (rounding apart from error).

Prints a table (max |difference| of the logits) and writes it to --out when given.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import torch

from common.atomic import write_text
from common.cli import add_run_arguments, parse_device
from common.errors import run_cli
from data.conversations import to_messages
from model.hf import export_run
from model.hf_peft import export_adapter
from model.load import checkpoint_tokenizer, load_model
from objectives.chat_tokens import ChatTokenizer, resolve_template
from objectives.tasks import load_tasks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.posttrain_export",
                                     description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, out_help="write the table to FILE (default: print only)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens of the conversation")
    return parser


def held_out_ids(ckpt: Path, cfg, n: int) -> torch.Tensor:
    """(1, <= n) token ids of the run's first held-out conversation (or its first one)."""
    tasks = load_tasks(cfg.posttrain, to_messages)
    conversations = next(iter(tasks.val.values() or tasks.train.values()))
    tokenizer = checkpoint_tokenizer(ckpt, cfg)
    chat = ChatTokenizer(tokenizer, resolve_template(tokenizer, cfg.posttrain.chat_template))
    ids, _ = chat.encode(conversations[0])
    return torch.tensor([ids[:n]])


def load_quietly(load):
    """load() with every Python warning and transformers warning log line recorded."""
    import transformers

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = transformers.logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load()
    finally:
        logger.removeHandler(handler)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records
                                                   if r.levelno >= logging.WARNING]
    return model, messages


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)
    import peft
    import transformers

    ours, cfg, ckpt = load_model(args.run, device, step=args.step)
    tokens = held_out_ids(ckpt, cfg, args.tokens).to(device)
    with torch.no_grad():
        want = ours(tokens).float()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        merged, base, adapter = (Path(tmp) / n for n in ("merged", "base", "adapter"))
        export_run(ckpt, merged)
        hf, messages = load_quietly(
            lambda: transformers.AutoModelForCausalLM.from_pretrained(merged).to(device).eval())
        with torch.no_grad():
            diff = (hf(tokens).logits.float() - want).abs().max().item()
        rows.append(("merged export in transformers", len(messages), diff))
        del hf
        if cfg.lora.rank:
            export_run(cfg.checkpoint.init_from, base)
            export_adapter(ckpt, adapter)
            hf_base = transformers.AutoModelForCausalLM.from_pretrained(base)
            model, messages2 = load_quietly(
                lambda: peft.PeftModel.from_pretrained(hf_base, str(adapter)).to(device).eval())
            with torch.no_grad():
                diff = (model(tokens).logits.float() - want).abs().max().item()
            rows.append(("PEFT adapter on the base export", len(messages2), diff))
            messages += messages2
            # The same two in float64 (our merged weights stay rounded to fp32): what is left
            # of the fp32 difference is rounding, not a different function.
            with torch.no_grad():
                want64 = ours.double()(tokens)
                diff = (model.double()(tokens).logits - want64).abs().max().item()
            rows.append(("PEFT adapter on the base export, both in float64", 0, diff))
    lines = [f"{ckpt}: {tokens.shape[1]} tokens of a held-out conversation, on {device}", "",
             "| model | warnings | max abs logit difference vs ours (merged) |",
             "|---|---|---|"]
    lines += [f"| {name} | {n} | {d:.2e} |" for name, n, d in rows]
    lines += [f"warning: {m}" for m in messages]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text(Path(args.out), text)


if __name__ == "__main__":
    run_cli(main)
