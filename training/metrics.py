"""What a run reports: its environment, per-step metrics (console, metrics.jsonl, wandb), the
progress line with rate and ETA, and the loss plot.

Everything here runs on rank 0 only, except `Progress.line`'s memory peak (a max over ranks).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from common.atomic import atomic_path, write_text
from common.errors import FileFormatError
from job_config import JobConfig
from parallel.dist import DistInfo, all_reduce_max

# Dense bf16 peak of known GPUs, for model FLOPs utilization.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def environment_info(dist_info: DistInfo) -> dict:
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": dist_info.world_size,
        "device": str(dist_info.device),
    }
    if dist_info.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dist_info.device)
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsLog:
    """Console + metrics.jsonl + optional wandb, on rank 0 only."""

    def __init__(self, run_dir: Path, cfg: JobConfig, enabled: bool, resumed: int | None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        if self.path.exists():
            # A fresh run starts a new log; a resumed one drops what the killed run logged
            # after its checkpoint, so every step appears once.
            keep = [
                line for line in self._records(self.path)
                if resumed is not None and self._before(json.loads(line), resumed)
            ]
            write_text(self.path, "".join(line + "\n" for line in keep))
        if cfg.logging.wandb:
            import wandb

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(
                project=cfg.logging.wandb_project, name=run_dir.name, dir=str(run_dir),
                config=cfg.to_dict(), mode=mode, resume="allow",
            )

    @staticmethod
    def _records(path: Path) -> list[str]:
        """The lines of metrics.jsonl; a last line cut short (the run was killed while
        appending it) is dropped, a bad line elsewhere stops with its number."""
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or type(record.get("step")) is not int:
                    raise ValueError("no integer 'step'")
            except ValueError as e:
                if number == len(lines):
                    return lines[:-1]
                raise FileFormatError(f"{path}:{number}", "one JSON record with a 'step' per line",
                                      str(e)) from None
        return lines

    @staticmethod
    def _before(record: dict, step: int) -> bool:
        """Logged before the checkpoint of `step` was written (validation at `step` comes after)."""
        return record["step"] < step or (record["step"] == step and "loss" in record)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """The progress line of a log step: loss, learning rate, gradient norm, tokens/s, model
    FLOPs utilization (on a GPU of known peak), ETA and the fullest rank's memory peak (CUDA).
    Adds tokens_per_s, mfu and peak_mem_gib to the step's record."""

    def __init__(self, cfg: JobConfig, device: torch.device, world_size: int):
        self.total_steps = cfg.train.steps
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self.flops_per_token = cfg.model.flops_per_token(cfg.train.seq_len)
        self.peak = gpu_peak_flops(device)
        self.device, self.world_size = device, world_size
        self.restart_window()

    def restart_window(self) -> None:
        self.t_window, self.tokens_window = time.time(), 0

    def count(self, tokens: int) -> None:
        self.tokens_window += tokens

    def line(self, record: dict) -> str:
        """Every rank calls this (the memory peak is a collective)."""
        step = record["step"]
        tps = self.tokens_window / max(time.time() - self.t_window, 1e-9)
        record["tokens_per_s"] = tps
        msg = (
            f"step {step:5d}/{self.total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad {record['grad_norm']:.2f} | {tps:,.0f} tok/s"
        )
        if self.peak:
            record["mfu"] = self.flops_per_token * tps / (self.peak * self.world_size)
            msg += f" | MFU {100 * record['mfu']:.1f}%"
        eta = (self.total_steps - step) * self.tokens_per_step / max(tps, 1e-9)
        msg += f" | ETA {format_seconds(eta)}"
        if self.device.type == "cuda":  # the fullest rank's peak, for tuning micro-batch / sharding
            mem = torch.tensor(torch.cuda.max_memory_allocated(self.device) / 2**30, device=self.device)
            record["peak_mem_gib"] = all_reduce_max(mem).item()
            msg += f" | mem {record['peak_mem_gib']:.1f} GiB"
        self.restart_window()
        return msg


def plot_losses(run_dir: Path) -> None:
    """loss.png from metrics.jsonl: training loss per step and validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(run_dir / "loss.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
