"""Post-training records in the ecosystem's usual shapes, read into conversations and
preference pairs (objectives/sft.py and objectives/dpo.py tokenize them).

    records = read_records("data/hh.jsonl.gz")            # (where, dict) per record
    messages = to_messages(record, where)                 # [{"role", "content"}, ...]
    pair = to_pair(record, where)                         # Pair(prompt, chosen, rejected)

Sources: a .jsonl or .jsonl.gz file (one JSON object per line), a .json file holding a list of
objects, or a Hugging Face dataset by name, `hf:NAME[:CONFIG]:SPLIT` (needs `datasets` and
network). Record shapes, recognized by their fields:

- `messages`: [{"role": "system" | "user" | "assistant", "content": str}, ...]
- `prompt` / `completion`: strings (one user turn, one answer), or message lists
- `prompt` / `chosen` / `rejected`: a preference pair; each a string or a message list
- `chosen` / `rejected` alone: whole transcripts in the Anthropic hh-rlhf form,
  "\\n\\nHuman: ... \\n\\nAssistant: ..."; the prompt is what the two share (for SFT: `chosen`)
- `instruction` with `instances` [{input, output}] (the Alpaca / Self-Instruct seed tasks), or
  `instruction` / `input` / `output` (the Alpaca data): a user turn and the answer

A record that fits none of them stops with an error naming the file, the line and the fields.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")
HF_PREFIX = "hf:"
_TURN = re.compile(r"\n\n(Human|Assistant):")  # hh-rlhf turn markers
_SPEAKER = {"Human": "user", "Assistant": "assistant"}


class RecordError(ValueError):
    """A record with fields we cannot read; the message names the file and line."""


@dataclass
class Pair:
    """A preference pair: the shared prompt and the two continuations (each a message list
    that starts after the prompt, normally one assistant turn)."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]


def read_records(source: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of `source` ("file:line" or "hf:...#index")."""
    if source.startswith(HF_PREFIX):
        yield from _hf_records(source)
        return
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"post-training data {source!r}: no such file")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise RecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, record in enumerate(data):
            yield f"{path}[{i}]", _object(record, f"{path}[{i}]")
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: not valid JSON ({e})") from None
            yield where, _object(record, where)


def _hf_records(source: str) -> Iterator[tuple[str, dict]]:
    """hf:NAME[:CONFIG]:SPLIT through the `datasets` library (downloads on first use)."""
    parts = source[len(HF_PREFIX):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{source!r}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{source}: Hugging Face datasets need `pip install datasets`") from e
    name, split = parts[0], parts[-1]
    config = parts[1] if len(parts) == 3 else None
    for i, record in enumerate(datasets.load_dataset(name, config, split=split)):
        yield f"{source}#{i}", dict(record)


def _object(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


# --- shapes -------------------------------------------------------------------------------------


def parse_transcript(text: str, where: str) -> list[dict]:
    """An hh-rlhf transcript ("\\n\\nHuman: a\\n\\nAssistant: b ...") -> messages."""
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RecordError(f"{where}: expected a transcript of '\\n\\nHuman: ' / "
                          f"'\\n\\nAssistant: ' turns, got {text[:60]!r}")
    return [
        {"role": _SPEAKER[speaker], "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2])
    ]


def _messages_field(value, where: str, name: str, default_role: str) -> list[dict]:
    """A field holding a string (one turn of `default_role`) or a message list."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: field {name!r} must be a string or a non-empty list of "
                          f"messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
            m.get("content"), str
        ):
            raise RecordError(f"{where}: {name}[{i}] must be {{'role': one of {ROLES}, "
                              f"'content': str}}, got {str(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def to_messages(record: dict, where: str) -> list[dict]:
    """One conversation for supervised fine-tuning (a pair gives its chosen side)."""
    if "messages" in record:
        return _messages_field(record["messages"], where, "messages", "user")
    if "chosen" in record:
        pair = to_pair(record, where)
        return pair.prompt + pair.chosen
    if "prompt" in record and "completion" in record:
        return (_messages_field(record["prompt"], where, "prompt", "user")
                + _messages_field(record["completion"], where, "completion", "assistant"))
    if "instruction" in record:
        return _instruction(record, where)
    raise RecordError(f"{where}: fields {sorted(record)[:8]}: expected 'messages', "
                      "'prompt'/'completion', 'prompt'/'chosen'/'rejected', 'chosen'/'rejected' "
                      "transcripts, or 'instruction' (with 'instances' or 'output')")


def _instruction(record: dict, where: str) -> list[dict]:
    if "instances" in record:
        instances = record["instances"]
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise RecordError(f"{where}: 'instances' must be a list of {{input, output}}")
        example = instances[0]  # the seed tasks hold exactly one each
    else:
        example = record
    instruction, inp, out = record["instruction"], example.get("input", ""), example.get("output")
    if not isinstance(instruction, str) or not isinstance(inp, str) or not isinstance(out, str):
        raise RecordError(f"{where}: 'instruction', 'input' and 'output' must be strings")
    user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": out}]


def to_pair(record: dict, where: str) -> Pair:
    """A preference pair: explicit prompt / chosen / rejected, or two hh-rlhf transcripts
    whose shared messages (up to the first turn where they differ) are the prompt."""
    if "chosen" not in record or "rejected" not in record:
        raise RecordError(f"{where}: a preference pair needs 'chosen' and 'rejected' "
                          f"(fields: {sorted(record)[:8]})")
    if "prompt" in record:
        return Pair(
            _messages_field(record["prompt"], where, "prompt", "user"),
            _messages_field(record["chosen"], where, "chosen", "assistant"),
            _messages_field(record["rejected"], where, "rejected", "assistant"),
        )
    chosen, rejected = record["chosen"], record["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise RecordError(f"{where}: without 'prompt', 'chosen' and 'rejected' must be "
                          "transcript strings")
    c, r = parse_transcript(chosen, where), parse_transcript(rejected, where)
    shared = 0
    while shared < min(len(c), len(r)) and c[shared] == r[shared]:
        shared += 1
    # The prompt ends before an assistant turn: both continuations start with the answer.
    while shared > 0 and c[shared - 1]["role"] == "assistant":
        shared -= 1
    if shared == 0 or shared == len(c) or shared == len(r):
        raise RecordError(f"{where}: 'chosen' and 'rejected' share no prompt, or one of them "
                          "has nothing after it")
    return Pair(c[:shared], c[shared:], r[shared:])
