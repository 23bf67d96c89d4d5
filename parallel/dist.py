"""Process-group setup: one process, or torchrun (RANK / WORLD_SIZE / LOCAL_RANK set)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"train.device = {name!r}: expected auto, cpu or cuda")
    return torch.device("cpu")


_created_group = False  # whether init_distributed started the process group (cleanup ends it)


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun, else a single process. A process
    group that already exists (a caller running several jobs in one, as tests do) is used as is
    and left to its owner."""
    global _created_group
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        return DistInfo(rank, world_size, local_rank, pick_device(device, local_rank))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1:
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
        _created_group = True
    return DistInfo(rank, world_size, local_rank, dev)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """End the process group init_distributed started (not one it found)."""
    global _created_group
    if dist.is_initialized() and _created_group:
        dist.destroy_process_group()
        _created_group = False


def peak_memory_gib(device: torch.device) -> float:
    """This rank's peak memory since the start or the last reset_peak_memory: CUDA allocation,
    or the process's resident set (Linux: VmHWM; elsewhere the lifetime ru_maxrss), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 2**20
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Restart peak_memory_gib from the memory in use now. train.py calls it after setup, so
    the training steps' peak is not a transient of loading (two copies of the weights while a
    checkpoint is read), as torch.cuda.reset_peak_memory_stats does on a GPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := current RSS
    except OSError:
        pass  # elsewhere the peak stays the process's lifetime peak


def memory_report(device: torch.device) -> str:
    """This rank's memory: peak CUDA allocation, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        reserved = torch.cuda.max_memory_reserved(device) / 2**30
        return f"peak allocated {peak_memory_gib(device):.2f} GiB, reserved {reserved:.2f} GiB"
    return f"peak RSS {peak_memory_gib(device):.2f} GiB"


def env_world_size() -> int:
    """The world size torchrun announces (1 without torchrun), read before any setup; that of
    the process group when one exists already."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def gather_lines(line: str) -> list[str]:
    """Every rank's `line`, in rank order (on all ranks)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [line]
    lines: list = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    return lines
