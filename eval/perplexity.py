"""Perplexity and bits per byte of a model on the validation shards of a prepared data dir.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes the target tokens decode to,
which makes models with different tokenizers comparable. The end-of-text token decodes to no
text: its loss counts, its bytes do not.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from data.loader import TokenStream, make_batch
from data.manifest import load_manifest, manifest_tokenizer
from model.transformer import Transformer


def token_byte_lengths(tokenizer) -> np.ndarray:
    """(n_vocab,) UTF-8 byte length of every token id (0 for special tokens)."""
    lengths = np.zeros(tokenizer.n_vocab, dtype=np.int64)
    for token, rank in tokenizer.mergeable_ranks.items():
        lengths[rank] = len(token)
    return lengths


@torch.no_grad()
def evaluate_perplexity(
    model: Transformer,
    data_path: str,
    seq_len: int,
    batch_size: int = 8,
    max_batches: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Loss, perplexity and bits per byte over the validation windows (all, or max_batches)."""
    manifest = load_manifest(data_path)
    stream = TokenStream(data_path, "val", manifest)
    byte_len = torch.from_numpy(token_byte_lengths(manifest_tokenizer(data_path, manifest)))
    windows = (stream.num_tokens - 1) // seq_len
    n_batches = -(-windows // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    model.eval()
    nats, tokens, nbytes = 0.0, 0, 0
    t0 = time.time()
    for b in tqdm(range(n_batches), desc="perplexity", disable=not progress, unit="batch"):
        ids = np.arange(b * batch_size, min((b + 1) * batch_size, windows))
        batch = make_batch(stream, ids, seq_len)
        logits = model(batch.inputs.to(device)).float()
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch.targets.to(device).flatten(), reduction="sum"
        )
        nats += loss.item()
        tokens += batch.targets.numel()
        nbytes += int(byte_len[batch.targets].sum())
    mean = nats / tokens
    return {
        "val_loss": mean,
        "perplexity": math.exp(mean),
        "bits_per_byte": nats / math.log(2) / max(nbytes, 1),
        "tokens": tokens,
        "bytes": nbytes,
        "seconds": round(time.time() - t0, 2),
    }
