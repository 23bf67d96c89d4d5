"""EAGLE draft heads for speculative decoding (Li et al. 2024, "EAGLE: Speculative Sampling
Requires Rethinking Feature Uncertainty"): a one-layer draft that runs on the target's features.

The target's final hidden state f_j (after its last norm: what its output head reads) already
holds most of what comes after token j. The head takes f_j and the embedding of token j + 1,
mixes them (a linear map 2 dim -> dim), runs one decoder block of the target's shape over its
own cache, and predicts f_{j+1}; an output head over a subset of the vocabulary (the ids the
target predicts most often on the training text, rows initialized from the target's output
matrix) turns that into a draft of token j + 2. Each later draft step feeds its own predicted
feature back. One step costs a block and a small head: ~9 ms eagerly on this project's 2-core
CPU (3.3 ms of it the 8,192-row head), ~0.16 of the compiled int8 target's step, against ~0.65
for the target quantized to int4 as a draft.

    python -m inference.eagle train --run runs/smollm2 --out runs/smollm2-eagle [--tokens 400000]
    engine = Engine(model, tok, draft=load_eagle("runs/smollm2-eagle", model), speculate_k=4)

Training (EAGLE's recipe, teacher-forced): the target's features on text, a SmoothL1 loss on
the predicted feature plus 0.1 x cross-entropy against the target's own greedy token there
(distillation: the draft learns the target, not the text; EAGLE's targets are the target's
whole distribution, ours its argmax, which is what greedy verification checks), and uniform
noise on the input features (+-0.1 of their RMS) so that its own imperfect features do not
throw it at later steps. The text is the standard library's subpackages (bench/generate.py prompts from its
top-level modules, which the draft never sees); the last 5% of the sequences are held out and
the head's agreement with the target's greedy tokens there is printed and saved.

Files: DIR/eagle.safetensors (the head's tensors, `vocab` the target ids of its output rows)
and DIR/eagle.json (the target's model config it was trained for, the training settings and
the held-out agreement). Loading checks the shapes against the target at hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.atomic import atomic_dir, write_json
from common.errors import PretrainError, run_cli
from data.sources import stdlib_files
from model.checkpoint import read_safetensors_file, save_model_state
from model.config import ModelConfig
from model.layers import rope_tables
from model.transformer import Block, CacheStep, Transformer

FORMAT, VERSION = "eagle-draft", 1
WEIGHTS, CONFIG = "eagle.safetensors", "eagle.json"


class EagleDraft(nn.Module):
    def __init__(self, target_cfg: ModelConfig, vocab: torch.Tensor):
        super().__init__()
        self.target_cfg = target_cfg  # what it was built for (saved, checked on loading)
        # one dense block of the target's width and heads (a MoE target gets a dense block)
        self.cfg = dataclasses.replace(target_cfg, n_layers=1, n_experts=0)
        dim = self.cfg.dim
        self.fc = nn.Linear(2 * dim, dim, bias=False)
        self.block = Block(self.cfg, 0)
        self.head = nn.Linear(dim, len(vocab), bias=False)
        self.register_buffer("vocab", vocab.long().clone())  # (Vd,) target ids of head's rows
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                               None, self.cfg.rope_scaling)  # fmt: skip
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def for_target(cls, target: Transformer, vocab: torch.Tensor, seed: int = 0) -> EagleDraft:
        """A fresh head for `target`: random block, output rows copied from the target's."""
        gen = torch.Generator().manual_seed(seed)
        draft = cls(target.cfg, vocab)
        for m in draft.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=target.cfg.init_std, generator=gen)
        for norm in (draft.block.attn_norm, draft.block.mlp_norm):
            nn.init.ones_(norm.weight)
        with torch.no_grad():
            draft.head.weight.copy_(target_output_rows(target, draft.vocab))
        return draft.to(target.norm.weight.device)

    def forward(self, features: torch.Tensor, embedded: torch.Tensor, cache: CacheStep | None = None):
        """features (B, T, dim): the feature f_j at each position; embedded (B, T, dim): the
        target's embedding of token j + 1 -> (predicted f_{j+1} (B, T, dim), logits (B, T, Vd))."""
        x = self.fc(torch.cat([embedded, features], dim=-1))
        if cache is None:
            T = x.shape[1]
            cos, sin, layer = self.rope_cos[:T], self.rope_sin[:T], None
        else:
            cos, sin = self.rope_cos[cache.positions], self.rope_sin[cache.positions]
            layer = cache.layer(0)
        h = self.block(x, cos, sin, None, layer)
        return h, self.head(h)

    def full_logits(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(..., Vd) -> (..., vocab_size): ids outside the head's subset can never be drafted."""
        out = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
        return out.index_copy_(-1, self.vocab, logits)


def target_output_rows(target: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the target's output matrix as floats (a quantized head: dequantized)."""
    eye = torch.eye(target.cfg.dim, device=target.norm.weight.device)
    return target.output(eye).T[ids].float()  # output(I) is the matrix (dim, V), any format


# --- training data ----------------------------------------------------------------------------


def training_sequences(tokenizer, n_tokens: int, seq_len: int, seed: int) -> list[list[int]]:
    """Sequences of seq_len tokens from the standard library's subpackages (shuffled files,
    concatenated): never the top-level modules that bench/generate.py takes its prompts from."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in stdlib_files() if len(f.relative_to(root).parts) > 1]
    random.Random(seed).shuffle(files)
    ids: list[int] = []
    for f in files:
        ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace") + "\n\n")
        if len(ids) >= n_tokens:
            break
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][: max(1, n_tokens // seq_len)]


@torch.no_grad()
def target_features(target: Transformer, seqs: list[list[int]], batch: int, log=print):
    """(features (N, T, dim) float16, the target's greedy token at every position (N, T))."""
    feats, greedy = [], []
    t0 = time.perf_counter()
    for i in range(0, len(seqs), batch):
        x = torch.tensor(seqs[i : i + batch], device=target.norm.weight.device)
        h = target(x, return_hidden=True)
        feats.append(h.half().cpu())
        greedy.append(target.output(h).argmax(-1).cpu())
        done = i + len(x)
        rate = done * x.shape[1] / (time.perf_counter() - t0)
        log(f"features {done}/{len(seqs)} sequences, {rate:.0f} tok/s, "
            f"ETA {(len(seqs) - done) * x.shape[1] / rate:.0f} s")  # fmt: skip
    return torch.cat(feats), torch.cat(greedy)


def draft_vocabulary(greedy: torch.Tensor, size: int, vocab_size: int) -> tuple[torch.Tensor, float]:
    """The `size` ids the target predicts most often, and the share of its predictions they cover."""
    counts = torch.bincount(greedy.flatten(), minlength=vocab_size)
    top = counts.argsort(descending=True)[: min(size, vocab_size)]
    return top.sort().values, float(counts[top].sum() / counts.sum())


def eagle_losses(draft: EagleDraft, target: Transformer, feats, tokens, greedy, slot, noise: float = 0.0):
    """Teacher-forced losses of pairs (f_j, token j + 1) -> (f_{j+1}, the target's greedy token
    at j + 1). feats (B, T, dim) float, tokens / greedy (B, T) ids, slot (V,) the row of each id
    in the draft's head (-1: none). Returns (feature loss, token loss, agreement)."""
    inp = feats[:, :-1]
    if noise:
        rms = inp.pow(2).mean(-1, keepdim=True).sqrt()
        inp = inp + (torch.rand_like(inp) * 2 - 1) * noise * rms
    with torch.no_grad():
        embedded = target.embed(tokens[:, 1:]).float()
    pred, logits = draft(inp, embedded)
    reg = F.smooth_l1_loss(pred, feats[:, 1:])
    labels = slot[greedy[:, 1:]]
    cls = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-1)
    agree = (draft.vocab[logits.argmax(-1)] == greedy[:, 1:]).float().mean()
    return reg, cls, agree


@torch.no_grad()
def chained_agreement(draft: EagleDraft, target: Transformer, feats, tokens, greedy, steps: int = 3):
    """Agreement with the target's greedy tokens at draft steps 1 .. steps, each step fed the
    draft's own feature and token of the step before (as in decoding), over every start. Step 1
    is exact; at step s > 0 every earlier position is chained too (in decoding only the last s
    are), so later steps are a pessimistic estimate."""
    T = feats.shape[1]
    f, toks = feats[:, : T - steps].float(), tokens[:, 1 : T - steps + 1]
    out = []
    for s in range(steps):
        pred, logits = draft(f, target.embed(toks).float())
        ids = draft.vocab[logits.argmax(-1)]
        want = greedy[:, 1 + s : T - steps + 1 + s]
        out.append(float((ids == want).float().mean()))
        f, toks = pred, ids
    return out


# --- training ----------------------------------------------------------------------------------


def fit(draft: EagleDraft, target: Transformer, feats, tokens, greedy, epochs: int, batch: int,
        lr: float, noise: float, seed: int, log=print) -> None:
    """AdamW over shuffled batches of sequences (features (N, T, dim), tokens and the target's
    greedy ids (N, T)), warm-up then cosine decay; the loss is EAGLE's, feature + 0.1 x token."""
    slot = torch.full((target.cfg.vocab_size,), -1, dtype=torch.long, device=draft.vocab.device)
    slot[draft.vocab] = torch.arange(len(draft.vocab), device=draft.vocab.device)
    opt = torch.optim.AdamW(draft.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps = epochs * math.ceil(len(feats) / batch)
    warmup = max(1, steps // 20)
    schedule = lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    draft.train()
    t0, step = time.perf_counter(), 0
    for epoch in range(epochs):
        for idx in torch.randperm(len(feats), generator=gen).split(batch):
            dev = draft.vocab.device  # the features stay on the CPU; a batch at a time goes over
            f, x, g = feats[idx].to(dev).float(), tokens[idx].to(dev), greedy[idx].to(dev)
            reg, cls, agree = eagle_losses(draft, target, f, x, g, slot, noise)
            opt.zero_grad(set_to_none=True)
            (reg + 0.1 * cls).backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0 or step == steps:
                rate = step / (time.perf_counter() - t0)
                log(f"step {step}/{steps} epoch {epoch + 1}: feature {reg.item():.4f} token {cls.item():.3f} "
                    f"agreement {agree.item():.3f}, {rate * batch * feats.shape[1]:.0f} tok/s, "
                    f"ETA {(steps - step) / rate:.0f} s")  # fmt: skip
    draft.eval()


def save_eagle(draft: EagleDraft, path: str | Path, info: dict) -> None:
    """The head's tensors and `info` (with the format and the target's model config) as one
    directory, written atomically."""
    info = {"format": FORMAT, "version": VERSION, "target_model": dataclasses.asdict(draft.target_cfg), **info}
    with atomic_dir(path) as tmp:
        save_model_state(draft.state_dict(), Path(tmp) / WEIGHTS)
        write_json(Path(tmp) / CONFIG, info)


def _log(message: str) -> None:
    print(f"[eagle] {message}", file=sys.stderr, flush=True)


def train(args) -> dict:
    from model.load import checkpoint_tokenizer, load_model

    torch.manual_seed(args.seed)
    target, job, ckpt = load_model(args.run, args.device)
    target.requires_grad_(False)
    tok = checkpoint_tokenizer(ckpt, job)
    seqs = training_sequences(tok, args.tokens, args.seq_len, args.seed)
    n_val = max(1, len(seqs) // 20)
    _log(f"target {ckpt}, {len(seqs)} sequences of {args.seq_len} tokens ({n_val} held out); "
        f"torch {torch.__version__}, {platform.machine()} {torch.get_num_threads()} threads")
    feats, greedy = target_features(target, seqs, args.batch, _log)
    tokens = torch.tensor(seqs)
    vocab, coverage = draft_vocabulary(greedy[:-n_val], args.vocab, target.cfg.vocab_size)
    _log(f"head over {len(vocab)} ids: {coverage:.1%} of the target's greedy tokens")
    draft = EagleDraft.for_target(target, vocab, args.seed)
    n_train = len(seqs) - n_val
    t0 = time.perf_counter()
    fit(draft, target, feats[:n_train], tokens[:n_train], greedy[:n_train], args.epochs, args.batch,
        args.lr, args.noise, args.seed, log=_log)
    held_out = (x[n_train:].to(target.norm.weight.device) for x in (feats, tokens, greedy))
    agreement = chained_agreement(draft, target, *held_out)
    _log(f"held-out agreement with the target's greedy tokens, steps 1-3: "
        f"{', '.join(f'{a:.3f}' for a in agreement)}")
    info = {
        "target": str(ckpt), "vocab_size": len(vocab), "coverage": coverage,
        "training": vars(args),
        "held_out_agreement": agreement, "seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
    }  # fmt: skip
    save_eagle(draft, args.out, info)
    _log(f"wrote {args.out}")
    return info


def load_eagle(path: str | Path, target: Transformer) -> EagleDraft:
    """The head saved in `path` for `target`: refused, naming the file and the field, when it
    was trained for a target of other shapes."""
    path = Path(path)
    try:
        info = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise PretrainError(f"{path / CONFIG}: not a readable EAGLE draft config ({e})") from None
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise PretrainError(f"{path / CONFIG}: format {info.get('format')!r} version "
                            f"{info.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    saved = info.get("target_model", {})
    for name in ("vocab_size", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden"):
        if saved.get(name) != getattr(target.cfg, name):
            raise PretrainError(f"{path / CONFIG}: target_model.{name} = {saved.get(name)!r}, but the "
                                f"target has {getattr(target.cfg, name)}: a head trained for another model")
    state = read_safetensors_file(path / WEIGHTS)
    if "vocab" not in state:
        raise PretrainError(f"{path / WEIGHTS}: no 'vocab' tensor (the ids of the head's rows)")
    draft = EagleDraft(target.cfg, state["vocab"])
    try:
        draft.load_state_dict(state)
    except RuntimeError as e:
        raise PretrainError(f"{path / WEIGHTS}: does not fit the head of {path / CONFIG}: {e}") from None
    return draft.to(target.norm.weight.device).eval()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference.eagle", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a head on the target's features")
    t.add_argument("--run", required=True, metavar="DIR", help="the target: a run or checkpoint directory")
    t.add_argument("--out", required=True, metavar="DIR", help="where the head is written")
    t.add_argument("--device", default="auto")
    t.add_argument("--tokens", type=int, default=400_000, help="training + held-out tokens")
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--batch", type=int, default=4, help="sequences a step")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--vocab", type=int, default=8192, help="ids of the draft's output head")
    t.add_argument("--noise", type=float, default=0.1, help="input-feature noise, a share of their RMS")
    t.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        train(args)


if __name__ == "__main__":
    run_cli(main)
