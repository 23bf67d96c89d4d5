"""Sample from a trained model with a KV cache.

    python -m model.generate --run runs/tiny --prompt "def " --max-new-tokens 200
    python -m model.generate --run runs/tiny --temperature 0          # greedy
    python -m model.generate --run runs/tiny --step 400 --num-samples 4 --out samples.json

Sampling: temperature, then top-k, then top-p (nucleus) filtering of the next-token distribution.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.atomic import write_json
from common.cli import add_run_arguments, parse_device
from data.manifest import manifest_tokenizer
from model.load import load_model
from model.transformer import Transformer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits: (B, V). Tokens outside the top-k / the top-p mass get -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue `prompt`; temperature 0 is greedy. Returns the new tokens only."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    device = model.embed.weight.device
    max_len = min(model.cfg.max_seq_len, len(prompt) + max_new_tokens)
    prompt = prompt[-(max_len - 1) :] if len(prompt) >= max_len else prompt
    cache = model.new_cache(1, max_len)
    logits = model(torch.tensor([prompt], device=device), cache=cache)[:, -1]  # (1, V)
    out: list[int] = []
    while len(out) < max_new_tokens and cache[0].pos < max_len:
        if temperature == 0:
            next_id = int(logits.argmax(-1))
        else:
            probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        out.append(next_id)
        if next_id == stop_token or cache[0].pos >= max_len:
            break
        logits = model(torch.tensor([[next_id]], device=device), cache=cache)[:, -1]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.generate", description="Sample text from a trained run."
    )
    add_run_arguments(
        parser, out_help="also write the samples as JSON to FILE (default: print only)"
    )
    parser.add_argument("--prompt", default="", help="text to continue (default: start a document)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)

    model, cfg, ckpt = load_model(args.run, device, step=args.step)
    tokenizer = manifest_tokenizer(cfg.data.path)
    prompt = tokenizer.encode(args.prompt) if args.prompt else []
    prompt = [tokenizer.eot_id] + prompt  # every document starts right after an end-of-text
    gen = torch.Generator(device=device).manual_seed(args.seed)
    samples = []
    for i in range(args.num_samples):
        ids = generate(
            model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
            stop_token=tokenizer.eot_id, generator=gen,
        )
        if ids and ids[-1] == tokenizer.eot_id:
            ids = ids[:-1]
        samples.append(args.prompt + tokenizer.decode(ids))
        print(f"--- sample {i + 1} from {ckpt} ---")
        print(samples[-1])
    if args.out:
        settings = {k: getattr(args, k) for k in ("prompt", "temperature", "top_k", "top_p", "seed")}
        write_json(Path(args.out), {"checkpoint": str(ckpt), **settings, "samples": samples})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
