"""Sample from a trained model with a KV cache.

    python -m model.generate --run runs/tiny --prompt "def " --max-new-tokens 200
    python -m model.generate --run runs/tiny --temperature 0          # greedy
    python -m model.generate --run runs/tiny --step 400 --num-samples 4 --out samples.json

Sampling: temperature, then top-k, then top-p (nucleus) filtering of the next-token distribution.

The tokenizer is the checkpoint's (model.load.checkpoint_tokenizer): a prompt starts with its `bos_ids`
(our end-of-text; Llama 3's <|begin_of_text|>; nothing for SmolLM2), as transformers' tokenizer
starts it. An imported model's generation_config.json gives the defaults, as in transformers:
greedy unless do_sample (then its temperature / top_k / top_p), max_new_tokens, and the stop
tokens (eos_token_id); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection
from pathlib import Path

import torch

from common.atomic import write_json
from common.cli import add_run_arguments, parse_device
from common.errors import run_cli
from model.load import checkpoint_tokenizer, load_model
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
    stop_token: int | Collection[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue `prompt`; temperature 0 is greedy. Returns the new tokens only (up to and
    including the first stop token: `stop_token`, one id or several)."""
    stops = {stop_token} if isinstance(stop_token, int) else set(stop_token or ())
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
        if next_id in stops or cache[0].pos >= max_len:
            break
        logits = model(torch.tensor([[next_id]], device=device), cache=cache)[:, -1]
    return out


# The defaults of a run of ours (an imported model's generation_config.json replaces them).
DEFAULTS = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "max_new_tokens": 200}


def generation_defaults(tokenizer) -> tuple[dict, list[int]]:
    """(sampling defaults, stop token ids) for a run's tokenizer: ours, or transformers'
    reading of an imported model's generation_config.json (do_sample false means greedy)."""
    config = getattr(tokenizer, "generation_config", None)
    if config is None:
        return dict(DEFAULTS), [tokenizer.eot_id]
    sampling = bool(config.get("do_sample", False))
    defaults = {
        "temperature": float(config.get("temperature", 1.0)) if sampling else 0.0,
        "top_k": int(config.get("top_k", 50) or 0),
        "top_p": float(config.get("top_p", 1.0)),
        "max_new_tokens": int(config.get("max_new_tokens") or DEFAULTS["max_new_tokens"]),
    }
    for field, neutral in UNSUPPORTED.items():
        if config.get(field, neutral) not in (neutral, None):
            print(f"note: generation_config {field} = {config[field]!r} is not applied "
                  "(our sampler has temperature, top_k and top_p)", file=sys.stderr)
    eos = config.get("eos_token_id", tokenizer.eot_id)
    return defaults, [eos] if isinstance(eos, int) else list(eos)


# generation_config.json fields that change what transformers generates, with their neutral
# values; our sampler has none of them.
UNSUPPORTED = {
    "repetition_penalty": 1.0, "num_beams": 1, "no_repeat_ngram_size": 0, "min_p": None,
    "typical_p": 1.0, "min_new_tokens": None, "min_length": 0, "encoder_repetition_penalty": 1.0,
    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "penalty_alpha": None,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.generate", description="Sample text from a trained run."
    )
    add_run_arguments(
        parser, out_help="also write the samples as JSON to FILE (default: print only)"
    )
    parser.add_argument("--prompt", default="", help="text to continue (default: start a document)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 200")
    parser.add_argument("--temperature", type=float, default=None, help="0: greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="default: 50")
    parser.add_argument("--top-p", type=float, default=None, help="default: 0.95")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer spec (default: the one the checkpoint records)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)

    model, cfg, ckpt = load_model(args.run, device, step=args.step)
    tokenizer = checkpoint_tokenizer(ckpt, cfg, args.tokenizer)
    defaults, stops = generation_defaults(tokenizer)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    prompt = tokenizer.bos_ids + tokenizer.encode(args.prompt)
    prompt = prompt or [tokenizer.eot_id]  # a sequence needs a first token
    gen = torch.Generator(device=device).manual_seed(args.seed)
    samples = []
    for i in range(args.num_samples):
        ids = generate(
            model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
            stop_token=stops, generator=gen,
        )
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        samples.append(args.prompt + tokenizer.decode(ids))
        print(f"--- sample {i + 1} from {ckpt} ---")
        print(samples[-1])
    if args.out:
        settings = {k: getattr(args, k) for k in ("prompt", "temperature", "top_k", "top_p", "seed")}
        write_json(Path(args.out), {"checkpoint": str(ckpt), **settings, "samples": samples})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
