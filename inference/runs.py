"""A run's tokenizer for the inference tools (serve, watermark detect, bench)."""

from __future__ import annotations

from pathlib import Path

from data.manifest import manifest_tokenizer
from data.tokenizer import load_tokenizer


def run_tokenizer(job):
    """The tokenizer a run names: data.tokenizer when it is a file, else its data dir's."""
    spec = job.data.tokenizer
    if spec and Path(str(spec)).exists():
        return load_tokenizer(spec)
    return manifest_tokenizer(job.data.path)


def stop_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end a generation: the end-of-text token, and an imported model's
    generation_config eos_token_id(s) when the tokenizer carries one."""
    ids = [tokenizer.eot_id]
    config = getattr(tokenizer, "generation_config", None) or {}
    eos = config.get("eos_token_id")
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(dict.fromkeys(ids))
