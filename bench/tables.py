"""Where the benchmarks' results tables go and what they are called: bench/results/
NAME-<device>.md, the device as a slug of its name (`NVIDIA H200` -> `nvidia-h200`)."""

from __future__ import annotations

import re
from pathlib import Path

from common.atomic import write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def write_table(out_dir: str | Path, name: str, device_name: str, text: str) -> Path:
    """Write `text` atomically to out_dir/name-<device slug>.md and return the path."""
    path = Path(out_dir) / f"{name}-{device_slug(device_name)}.md"
    write_text(path, text)
    return path
