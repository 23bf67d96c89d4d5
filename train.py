"""The training entry point: config -> process group -> model -> data -> loop.

    python train.py --config configs/tiny.toml                      # one process (CPU or GPU)
    torchrun --nproc_per_node 2 train.py --config configs/tiny.toml # data parallel (DDP)
    python train.py --config configs/tiny.toml --checkpoint.resume=latest

Every step consumes one global batch of `train.batch_size` sequences, split over ranks and
micro-batches (gradient accumulation), so the loss curve does not depend on the world size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from common.atomic import atomic_path, write_json, write_text
from data.loader import TokenStream, build_train_loader, validation_batches
from data.manifest import load_manifest
from job_config import JobConfig, OptimConfig, load_config, to_toml
from model.checkpoint import find_checkpoint, load_model_state, resolve_checkpoint
from model.loss import lm_loss
from model.transformer import Transformer, build_model
from parallel.checkpoint_dcp import load_train_checkpoint, save_train_checkpoint
from parallel.dist import (
    DistInfo,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    cleanup,
    env_world_size,
    gather_lines,
    init_distributed,
    memory_report,
)
from parallel.mesh import build_mesh, check_parallel
from parallel.parallelize import backward, grad_sync, optimizer_step, parallelize

# Dense bf16 peak of known GPUs, for model FLOPs utilization.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


# --- optimizer and schedule -------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device):
    """AdamW; weight decay on matrices only (not on norms, biases or the embedding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=device.type == "cuda",
    )


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup, then cosine / WSD decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = int(total * (1 - cfg.decay_fraction))  # wsd
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, total - decay_start)
    return 1.0 - (1 - floor) * min(progress, 1.0)


# --- logging ----------------------------------------------------------------------------------


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
                line for line in self.path.read_text().splitlines()
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
        fig.savefig(tmp, dpi=100, format="png")  # the temporary's name has no .png suffix
    plt.close(fig)


# --- the loop ---------------------------------------------------------------------------------


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.flag:  # a second signal: give up immediately
            raise KeyboardInterrupt
        self.flag = True
        print(f"\nsignal {signum}: saving a checkpoint at the end of this step", flush=True)


def autocast_context(cfg: JobConfig, device: torch.device):
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext()
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"train.dtype = {dtype!r}: expected auto, float32 or bfloat16")


def compute_loss(model: nn.Module, raw: Transformer, batch, cfg: JobConfig, device) -> torch.Tensor:
    inputs = batch.inputs.to(device, non_blocking=True)
    targets = batch.targets.to(device, non_blocking=True)
    doc_ids = batch.doc_ids.to(device) if batch.doc_ids is not None else None
    if cfg.parallel.engine == "deepspeed":  # the engine wraps model + loss (parallel/deepspeed_engine.py)
        return model(inputs, targets, doc_ids)
    hidden = model(inputs, doc_ids=doc_ids, return_hidden=True)
    if cfg.parallel.tp > 1:  # logits stay split by vocabulary across the tensor-parallel ranks
        from parallel.tensor_parallel import vocab_parallel_loss

        return vocab_parallel_loss(hidden, raw.output_weight, targets, cfg.train.z_loss)
    return lm_loss(hidden, raw.output_weight, targets, cfg.train.fused_loss, cfg.train.z_loss)


@torch.no_grad()
def validate(model, raw, batches, cfg: JobConfig, device) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with autocast_context(cfg, device):
        for batch in batches:
            total[0] += compute_loss(model, raw, batch, cfg, device).double()
            total[1] += 1
    model.train()
    total = all_reduce_sum(total)
    return (total[0] / total[1]).item()


def train(cfg: JobConfig) -> dict:
    t = cfg.train
    dims = check_parallel(cfg, env_world_size())  # a bad mesh stops here, before any setup
    dist_info = init_distributed(t.device, cfg.parallel.backend)
    device, is_main = dist_info.device, dist_info.is_main
    mesh = build_mesh(dims, device)
    if t.threads:
        torch.set_num_threads(t.threads)
    run_dir = Path(t.run_dir)

    # --- resume point ---
    ckpt = None
    if cfg.checkpoint.resume:
        ckpt = (
            find_checkpoint(run_dir) if cfg.checkpoint.resume == "latest"
            else resolve_checkpoint(cfg.checkpoint.resume)
        )

    # --- data ---
    manifest = load_manifest(cfg.data.path)
    tok = manifest["tokenizer"]
    if tok["n_vocab"] > cfg.model.vocab_size:
        raise ValueError(
            f"{cfg.data.path}/manifest.json: tokenizer {tok['name']!r} has {tok['n_vocab']} ids, "
            f"more than model.vocab_size = {cfg.model.vocab_size}; raise model.vocab_size"
        )
    eot_id = tok["eot_id"] if cfg.data.document_masking else None
    loader = build_train_loader(  # one dataset, or the weighted domains of data.mixture
        cfg.data, manifest, t.seq_len, t.batch_size, t.micro_batch_size,
        mesh.dp_rank, mesh.dp_size, t.seed, eot_id,
    )  # ranks of one tensor-parallel group read the same batch
    val_batches = validation_batches(
        TokenStream(cfg.data.path, "val", manifest), t.seq_len, t.micro_batch_size,
        t.val_batches, mesh.dp_rank, mesh.dp_size, eot_id,
    )
    # Sharded models run collectives in forward: every rank validates the same number of batches.
    fewest = -all_reduce_max(torch.tensor(-float(len(val_batches)), device=device)).item()
    val_batches = val_batches[: int(fewest)]
    benchmarks = {}  # benchmark items scored every train.eval_every steps (eval/harness.py)
    if t.eval_tasks and t.eval_every:
        from data.manifest import manifest_tokenizer
        from eval import harness
        from eval.tasks import load_task

        tokenizer = manifest_tokenizer(cfg.data.path, manifest)
        benchmarks = {name: load_task(name, limit=t.eval_limit or None) for name in t.eval_tasks}

    # --- model and optimizer ---
    # Built whole, then sharded in place: TP -> activation checkpointing -> compile -> FSDP/DDP.
    raw = build_model(cfg.model, device, seed=t.seed)
    if cfg.checkpoint.init_from and ckpt is None:  # weights only, e.g. an imported HF model
        raw.load_state_dict(load_model_state(resolve_checkpoint(cfg.checkpoint.init_from)))
    model: nn.Module = parallelize(raw, mesh, cfg, device)
    optimizer = build_optimizer(raw, cfg.optim, device)  # over the sharded parameters
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.steps, cfg.optim)
    )
    if cfg.parallel.engine == "deepspeed":
        from parallel.deepspeed_engine import initialize

        model = initialize(raw, optimizer, scheduler, cfg, mesh.dp_size, device)
    start_step, tokens_seen = 0, 0
    if ckpt is not None:
        state = load_train_checkpoint(ckpt, model, raw, optimizer, scheduler)
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        start_step, tokens_seen = state["step"], state["tokens_seen"]

    # --- run directory, resolved config, environment ---
    env = environment_info(dist_info)
    n_params = cfg.model.num_params()
    n_active = cfg.model.num_params(active=True)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.toml", to_toml(cfg))
        write_json(run_dir / "run_info.json", {"env": env, "manifest": manifest})
        print(f"run {run_dir} | {json.dumps(env)}")
        print(to_toml(cfg))
        print(
            f"model: {n_params / 1e6:.2f}M parameters ({n_active / 1e6:.2f}M active per token) | "
            f"data: {loader.stream.num_tokens:,} train tokens, tokenizer {tok['name']} "
            f"({tok['n_vocab']} ids) | {loader.accum_steps} micro-batches x {mesh.dp_size} "
            f"data-parallel ranks x {t.micro_batch_size} sequences x {t.seq_len} tokens per step"
            + (f" | resuming from {ckpt} at step {start_step}" if ckpt else "")
        )
    rank_lines = gather_lines(f"rank {dist_info.rank}/{dist_info.world_size} on {device}: "
                              f"{memory_report(device)} after setup")
    if is_main:
        print(f"mesh: {mesh.describe()} | engine {cfg.parallel.engine}, data parallel "
              f"{cfg.parallel.data_parallel}, activation checkpointing "
              f"{cfg.parallel.activation_checkpointing}")
        print("\n".join(rank_lines), flush=True)
    log = MetricsLog(run_dir, cfg, is_main, resumed=start_step if ckpt is not None else None)
    moe = None
    if cfg.model.is_moe:
        import model.moe as moe

    def checkpoint(step: int) -> None:
        # Every rank takes part (sharded states); the optimizer and scheduler are added inside.
        train_state = {
            "loader": loader.state_dict(), "rng": {"torch": torch.get_rng_state()},
            "step": step, "tokens_seen": tokens_seen,
        }
        path = save_train_checkpoint(
            run_dir, step, model, raw, optimizer, scheduler, train_state, cfg.to_dict(),
            cfg.checkpoint.keep, is_main,
        )
        if is_main:
            print(f"checkpoint: {path}", flush=True)

    # --- loop ---
    stop = StopRequested()
    peak = gpu_peak_flops(device)
    flops_per_token = cfg.model.flops_per_token(t.seq_len)
    tokens_per_step = t.batch_size * t.seq_len
    step = start_step
    last_val = None
    t_window, tokens_window = time.time(), 0
    t_start = time.time()
    model.train()
    while True:
        if t.val_every and (step % t.val_every == 0 or step == t.steps):
            last_val = validate(model, raw, val_batches, cfg, device)
            log.log({"step": step, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50))})
            if is_main:
                print(f"step {step:5d} | val loss {last_val:.4f}", flush=True)
        if benchmarks and (step % t.eval_every == 0 or step == t.steps):
            # Every rank scores the same items (a sharded model needs all ranks in each forward).
            with autocast_context(cfg, device):
                lm = harness.TransformerLogLikelihood(raw, batch_size=t.micro_batch_size)
                results = {
                    name: harness.evaluate_task(lm, tokenizer, name, items, progress=False)
                    for name, items in benchmarks.items()
                }
            log.log({"step": step, **harness.flat_metrics(results)})
            if is_main:
                print(f"step {step:5d} | {harness.summary_line(results)}", flush=True)
        if step >= t.steps:
            break
        micro_batches = loader.next_step()
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with grad_sync(model, last), autocast_context(cfg, device):
                loss = compute_loss(model, raw, batch, cfg, device)
                total = loss + moe.moe_aux_loss(raw) if moe else loss
                backward(model, total / len(micro_batches))
            loss_sum += loss.detach()
        # clip, step, zero grads, schedule (DeepSpeed did it inside the last backward)
        grad_norm = optimizer_step(model, optimizer, scheduler, raw, cfg.optim.grad_clip)
        if moe:
            moe.moe_after_step(raw)
        step += 1
        tokens_seen += tokens_per_step
        tokens_window += tokens_per_step
        loss_value = all_reduce_mean(loss_sum / len(micro_batches)).item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"step {step}: loss is {loss_value}; lower optim.lr?")
        record = {
            "step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm), "tokens": tokens_seen,
        }
        if step % t.log_every == 0 or step == t.steps:
            if moe:  # expert loads accumulated since the last log line
                record.update(moe.moe_metrics(raw))
            if hasattr(loader, "mixture_seen"):
                record.update({f"mixture/{k}": v for k, v in loader.mixture_seen().items()})
            elapsed = time.time() - t_window
            tps = tokens_window / max(elapsed, 1e-9)
            record["tokens_per_s"] = tps
            msg = (
                f"step {step:5d}/{t.steps} | loss {loss_value:.4f} | lr {record['lr']:.2e} | "
                f"grad {record['grad_norm']:.2f} | {tps:,.0f} tok/s"
            )
            if peak:
                record["mfu"] = flops_per_token * tps / (peak * dist_info.world_size)
                msg += f" | MFU {100 * record['mfu']:.1f}%"
            msg += f" | ETA {format_seconds((t.steps - step) * tokens_per_step / max(tps, 1e-9))}"
            if device.type == "cuda":  # the fullest rank's peak, for tuning micro-batch / sharding
                mem = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30, device=device)
                record["peak_mem_gib"] = all_reduce_max(mem).item()
                msg += f" | mem {record['peak_mem_gib']:.1f} GiB"
            if is_main:
                print(msg, flush=True)
            t_window, tokens_window = time.time(), 0
        log.log(record)
        stop_now = all_reduce_max(torch.tensor(float(stop.flag), device=device)).item() > 0
        if stop_now or step == t.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            checkpoint(step)
        if stop_now:
            log.close()
            cleanup()
            sys.exit(130)
    rank_lines = gather_lines(f"rank {dist_info.rank}/{dist_info.world_size}: {memory_report(device)}")
    if is_main:
        print("\n".join(rank_lines))
        print(f"done: {step} steps in {format_seconds(time.time() - t_start)}, val loss {last_val}")
        if cfg.logging.plot:
            plot_losses(run_dir)
    log.close()
    cleanup()
    return {"val_loss": last_val, "step": step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a Transformer language model.")
    parser.add_argument("--config", required=True, help="TOML job config, e.g. configs/tiny.toml")
    args, overrides = parser.parse_known_args(argv)
    train(load_config(args.config, overrides))


if __name__ == "__main__":
    main()
