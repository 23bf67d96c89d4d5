"""`--device auto | cpu | cuda[:N]`, the one device flag of every command-line tool."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto": the first CUDA device when there is one, else the CPU; anything else as torch
    parses it (an unknown name or a missing GPU stops with a message naming the flag)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: no CUDA device is available (use auto or cpu)")
    return device
