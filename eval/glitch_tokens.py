"""Glitch-token audit of a trained run: the token ids its training shards hold rarely or never,
how their embedding and unembedding rows differ from those of common tokens, and whether the
model can repeat them (Land & Bartolo 2024, "Fishing for Magikarp").

    python -m eval.glitch_tokens --run runs/tiny [--step N] [--device auto] [--out FILE] [--top 50]

A token the tokenizer knows but the model never saw keeps its initial embedding row (no gradient
reaches it; embeddings are not weight-decayed here) while every seen row moves, and its
unembedding row is only ever pushed down, in the same direction for all such tokens. Asked to
repeat it, the model cannot. Per id this reports:

- count: occurrences in the training shards (data.path and any data.mixture domains);
- embedding and unembedding norms;
- indicator: Land & Bartolo's unembedding indicator, the cosine between a token's unembedding
  row and the mean row of the never-seen tokens, after removing the matrix's first principal
  component (the direction every row shares);
- repeat: the log-probability of the token where a few-shot prompt ('"x" -> "x"' lines) asks
  for it back, and whether it is the model's top choice.

Suspects are ordered by count (fewest first), ties by the indicator (highest first). The
summary compares never-seen tokens with common ones (the most frequent tenth): median norms and
AUC = P(a never-seen token's value < a common token's), 0.5 for no difference; and how well
the weights alone find the never-seen words (the share never seen among the word tokens with the
smallest embedding rows, as many as there are never-seen words; a run that trained on less than
its shards also leaves the ids it never reached at their initial rows). Single bytes and
partial UTF-8 fragments are the byte-level fallback, rare by design: counted, not ranked.
Written to <run>/glitch_tokens.json unless --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.atomic import write_json
from common.cli import add_run_arguments, parse_device
from data.loader import parse_mixture
from data.manifest import load_manifest
from data.shards import read_shard
from data.tokenizer import Tokenizer
from model.load import checkpoint_tokenizer, load_model
from model.transformer import Transformer

OUT_FILE = "glitch_tokens.json"
RARE_FRACTION = 0.01  # rare: under 1% of the count every id would have if all were equally used


def token_counts(data_paths: list[str], n_vocab: int) -> np.ndarray:
    """(n_vocab,) occurrences of every id in the train shards of the prepared dirs."""
    shards = [Path(p) / s["file"] for p in data_paths for s in load_manifest(p)["train"]["shards"]]
    counts = np.zeros(n_vocab, np.int64)
    for path in tqdm(shards, desc="counting tokens", unit="shard", disable=len(shards) < 8):
        tokens = read_shard(path)
        if len(tokens) and int(tokens.max()) >= n_vocab:
            raise ValueError(f"{path}: token id {int(tokens.max())} >= the tokenizer's {n_vocab}")
        counts += np.bincount(tokens, minlength=n_vocab)
    return counts


def remove_first_component(matrix: torch.Tensor) -> torch.Tensor:
    """(V, d) rows minus their projection on the matrix's first principal component."""
    centred = matrix - matrix.mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # (d, d), eigenvalues ascending
    top = vectors[:, -1]
    return matrix - (matrix @ top)[:, None] * top[None, :]


def unembedding_indicator(unembedding: torch.Tensor, reference: np.ndarray) -> torch.Tensor:
    """(V,) cosine of each row (first component removed) with the mean row of `reference` ids."""
    rows = remove_first_component(unembedding)
    mean = rows[torch.as_tensor(reference)].mean(0, keepdim=True)
    return torch.nn.functional.cosine_similarity(rows, mean, dim=1)


def auc_below(values: np.ndarray, others: np.ndarray) -> float:
    """P(value < other) over all pairs, ties counting one half (Mann-Whitney U / n m)."""
    if not len(values) or not len(others):
        return float("nan")
    both = np.concatenate([values, others])
    order = both.argsort(kind="stable")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    for v in np.unique(both):  # average ranks of ties
        tied = both == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    u = ranks[: len(values)].sum() - len(values) * (len(values) + 1) / 2
    return float(1.0 - u / (len(values) * len(others)))


def token_kinds(tok: Tokenizer, n: int) -> tuple[list[str], list[str]]:
    """Each id's text (undecodable bytes escaped) and kind: "special", "byte" (a single byte),
    "fragment" (bytes that are not whole UTF-8 characters) or "word" (everything else)."""
    bytes_of = {i: b for b, i in (getattr(tok, "mergeable_ranks", None) or {}).items()}
    specials = {i: s for s, i in (getattr(tok, "special_tokens", None) or {}).items()}
    strings, kinds = [], []
    for i in range(n):
        raw = bytes_of.get(i)
        if i in specials:
            text, kind = specials[i], "special"
        elif raw is None:  # a tokenizer without byte ranks: what decode makes of the id
            text = tok.decode([i])
            kind = "fragment" if "\ufffd" in text else "byte" if len(text.encode()) == 1 else "word"
        else:
            text = raw.decode("utf-8", errors="backslashreplace")
            kind = "byte" if len(raw) == 1 else "word"
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                kind = "byte" if len(raw) == 1 else "fragment"
        strings.append(text)
        kinds.append(kind)
    return strings, kinds


def pick_examples(strings: list[str], counts: np.ndarray, n: int = 3) -> list[int]:
    """The most frequent ids that are words of 3+ letters: the few-shot examples to repeat."""
    picked = []
    for i in np.argsort(-counts, kind="stable"):
        if counts[i] == 0:
            break
        text = strings[i].strip()
        if len(text) >= 3 and text.isalpha():
            picked.append(int(i))
            if len(picked) == n:
                return picked
    return picked or [int(i) for i in np.argsort(-counts)[:n]]


@torch.no_grad()
def repeat_test(
    model: Transformer, tok: Tokenizer, ids: list[int], examples: list[int],
    device: torch.device, batch: int = 64,
) -> tuple[list[float], list[bool]]:
    """For each id: log p(id) where the prompt asks for it back, and whether it is the argmax.

    The prompt, built from ids so that the token appears as itself:
        <bos> "e1" -> "e1"\\n "e2" -> "e2"\\n ... "tok" -> "   (the model should say tok)
    """
    quote, arrow, newline = tok.encode('"'), tok.encode('" -> "'), tok.encode('"\n')
    bos = list(getattr(tok, "bos_ids", None) or [tok.eot_id])
    shots = [t for e in examples for t in quote + [e] + arrow + [e] + newline]
    prompts = torch.tensor([bos + shots + quote + [i] + arrow for i in ids], dtype=torch.long)
    logps, hits = [], []
    for chunk, want in zip(prompts.split(batch), torch.tensor(ids).split(batch)):
        logits = model(chunk.to(device))[:, -1].float().log_softmax(-1).cpu()
        logps += logits.gather(1, want[:, None])[:, 0].tolist()
        hits += (logits.argmax(-1) == want).tolist()
    return logps, hits


def audit(model: Transformer, tok: Tokenizer, counts: np.ndarray, device: torch.device, top: int = 50) -> dict:
    """The audit of one model against the token counts of its training data.

    Suspects are word tokens only: single bytes and partial UTF-8 fragments are the byte-level
    fallback, rare by design in most corpora; they are counted apart."""
    n = len(counts)
    embedding = model.embed.weight.detach().float()[:n].cpu()
    unembedding = model.output_weight.detach().float()[:n].cpu()
    emb_norm = embedding.norm(dim=1).numpy()
    unemb_norm = unembedding.norm(dim=1).numpy()
    strings, kinds = token_kinds(tok, n)
    words = np.array([k == "word" for k in kinds])
    never = np.flatnonzero(counts == 0)
    never_words = np.flatnonzero((counts == 0) & words)
    rare_below = RARE_FRACTION * counts.sum() / n
    reference = never if len(never) else np.argsort(counts, kind="stable")[: max(1, n // 100)]
    indicator = unembedding_indicator(unembedding, reference).numpy()
    order = np.lexsort((-indicator, counts))  # fewest occurrences first, then the indicator
    suspects = [int(i) for i in order if words[i]][:top]
    common = np.argsort(-counts, kind="stable")[: max(1, n // 10)]
    examples = pick_examples(strings, counts)
    controls = [int(i) for i in common if words[i] and int(i) not in examples][:top]
    logp, hit = repeat_test(model, tok, suspects + controls, examples, device)
    # The model alone (no counts): are the word tokens with the smallest embedding rows, as many
    # as there are never-seen words, the never-seen ones?
    by_weights = [i for i in np.argsort(emb_norm, kind="stable") if words[i]][: len(never_words)]

    def row(i: int, k: int) -> dict:
        return {"id": i, "token": strings[i], "count": int(counts[i]),
                "embedding_norm": float(emb_norm[i]), "unembedding_norm": float(unemb_norm[i]),
                "indicator": float(indicator[i]), "repeat_logprob": logp[k],
                "repeated": bool(hit[k])}

    def compare(values: np.ndarray) -> dict:
        seen = values[never_words]
        return {"never_seen_median": float(np.median(seen)) if len(seen) else None,
                "common_median": float(np.median(values[common])),
                "auc_never_below_common": auc_below(seen, values[common])}

    k = len(suspects)
    return {
        "vocab": n,
        "train_tokens": int(counts.sum()),
        "never_seen": {kind: int(sum(kinds[i] == kind for i in never))
                       for kind in ("word", "fragment", "byte", "special")},
        "rare_words": int(((counts > 0) & (counts < rare_below) & words).sum()),
        "rare_below": rare_below,
        "examples": [strings[e] for e in examples],
        "summary": {
            "embedding_norm": compare(emb_norm),
            "unembedding_norm": compare(unemb_norm),
            "indicator": compare(indicator),
            "repeated": {"suspects": float(np.mean(hit[:k])) if k else None,
                         "common": float(np.mean(hit[k:]))},
            "repeat_logprob_median": {"suspects": float(np.median(logp[:k])) if k else None,
                                      "common": float(np.median(logp[k:]))},
            "weights_alone_precision": float(np.isin(by_weights, never).mean()) if by_weights else None,
        },
        "suspects": [row(i, j) for j, i in enumerate(suspects)],
        "common": [row(i, k + j) for j, i in enumerate(controls)],
        "never_seen_bytes_and_fragments": [strings[i] for i in never if kinds[i] in ("byte", "fragment")],
    }


def print_report(report: dict, rows: int = 20) -> None:
    s = report["summary"]
    never = report["never_seen"]
    print(f"{report['vocab']:,} ids, {report['train_tokens']:,} training tokens: never seen "
          f"{never['word']:,} words, {never['fragment']:,} UTF-8 fragments, {never['byte']:,} "
          f"bytes; {report['rare_words']:,} rare words (< {report['rare_below']:.1f} occurrences)")
    for key in ("embedding_norm", "unembedding_norm", "indicator"):
        c = s[key]
        never = f"{c['never_seen_median']:.3f}" if c["never_seen_median"] is not None else "-"
        print(f"  {key}: median never-seen words {never} vs common {c['common_median']:.3f}, "
              f"AUC(never < common) {c['auc_never_below_common']:.3f}")
    rep, lp = s["repeated"], s["repeat_logprob_median"]
    if rep["suspects"] is not None:
        print(f"  repeated: suspects {rep['suspects']:.0%}, common {rep['common']:.0%}; median "
              f"log p {lp['suspects']:.2f} vs {lp['common']:.2f} (examples {report['examples']})")
    print(f"  {'id':>6} {'count':>8} {'emb':>7} {'unemb':>7} {'ind':>6} {'logp':>7} rep token")
    for r in report["suspects"][:rows]:
        print(f"  {r['id']:>6} {r['count']:>8} {r['embedding_norm']:>7.3f} "
              f"{r['unembedding_norm']:>7.3f} {r['indicator']:>6.2f} {r['repeat_logprob']:>7.2f} "
              f"{'yes' if r['repeated'] else 'no ':>3} {r['token']!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.glitch_tokens", description=__doc__.split("\n\n")[0]
    )
    add_run_arguments(parser, out_help=f"JSON report (default: <run>/{OUT_FILE})")
    parser.add_argument("--top", type=int, default=50, help="suspects (and common tokens) listed")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)
    model, cfg, ckpt = load_model(args.run, device, step=args.step)
    tok = checkpoint_tokenizer(ckpt, cfg)  # the model's own (refused if the data's differs)
    paths = [cfg.data.path, *(p for p in parse_mixture(cfg.data.mixture) if p != cfg.data.path)]
    counts = token_counts(paths, tok.n_vocab)
    if model.cfg.vocab_size < tok.n_vocab:
        raise SystemExit(f"{ckpt}: model.vocab_size {model.cfg.vocab_size} < tokenizer's {tok.n_vocab}")
    step = int(ckpt.name.removeprefix("step_")) if ckpt.name.startswith("step_") else None
    seen = step * cfg.train.batch_size * cfg.train.seq_len if step is not None else None
    report = {"checkpoint": str(ckpt), "data": paths, "tokens_trained": seen,
              **audit(model, tok, counts, device, args.top)}
    if seen is not None and seen < report["train_tokens"]:
        print(f"note: the model trained on {seen:,} tokens, fewer than the shards' "
              f"{report['train_tokens']:,}: some ids counted there it never saw")
    print_report(report)
    out = Path(args.out) if args.out else ckpt.parent.parent / OUT_FILE
    write_json(out, report, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
