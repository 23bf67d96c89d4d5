"""The training entry point: config -> process group -> mesh -> data -> model -> loop.

    python train.py --config configs/tiny.toml                      # one process (CPU or GPU)
    torchrun --nproc_per_node 2 train.py --config configs/tiny.toml # data parallel (DDP)
    python train.py --config configs/tiny.toml --checkpoint.resume=latest
    python train.py --config configs/moe-1b.toml --dry-run --world-size 64  # mesh + memory per rank

Every step consumes one global batch of `train.batch_size` sequences, split over ranks and
micro-batches (gradient accumulation), so the loss curve does not depend on the world size.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from common.atomic import write_json, write_text
from common.errors import PretrainError, run_cli
from job_config import JobConfig, load_config, to_toml
from model.checkpoint import (
    find_checkpoint,
    load_model_state,
    load_tokenizer_identity,
    resolve_checkpoint,
)
from model.load import load_base_weights, load_job_config
from model.lora import apply_lora, count_parameters
from model.moe import moe_metrics
from objectives import build_objective, resolve_config
from parallel.build import build_adapted_model, build_parallel_model, build_train_step
from parallel.checkpoint_dcp import load_model_weights, load_train_checkpoint, save_train_checkpoint
from parallel.dist import (
    all_reduce_max,
    all_reduce_mean,
    cleanup,
    env_world_size,
    gather_lines,
    init_distributed,
    memory_report,
    peak_memory_gib,
    reset_peak_memory,
)
from parallel.mesh import build_mesh, check_parallel
from parallel.moe_balance import register_expert_bias_update
from parallel.parallelize import autocast_context
from training.metrics import MetricsLog, Progress, environment_info, format_seconds, plot_losses
from training.optim import build_optimizer, build_scheduler
from training.resume import check_resume

# --- the loop ---------------------------------------------------------------------------------


class DivergedError(PretrainError, FloatingPointError):
    """The loss became inf / nan."""


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


def benchmark_evaluator(cfg: JobConfig, raw: nn.Module, device: torch.device, objective):
    """A function step -> {metric: value} scoring train.eval_tasks on the model (every rank
    scores the same items: a sharded model needs all ranks in each forward) with the
    objective's tokenizer, or None."""
    t = cfg.train
    if not (t.eval_tasks and t.eval_every):
        return None
    from eval.models import TransformerLogLikelihood
    from eval.scoring import evaluate_task, flat_metrics, summary_line
    from eval.tasks import load_task

    benchmarks = {name: load_task(name, limit=t.eval_limit or None) for name in t.eval_tasks}
    tokenizer = objective.tokenizer  # only here: hand-made data dirs may not name one

    def evaluate(step: int) -> tuple[dict, str]:
        with autocast_context(cfg, device):
            lm = TransformerLogLikelihood(raw, batch_size=t.micro_batch_size)
            results = {
                name: evaluate_task(lm, tokenizer, name, items, progress=False)
                for name, items in benchmarks.items()
            }
        return flat_metrics(results), summary_line(results)

    return evaluate


def train(cfg: JobConfig) -> dict:
    cfg = resolve_config(cfg)  # fine-tuning: the base's architecture and tokenizer
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

    # --- objective: what a step optimizes (pretrain, sft, dpo), its data and its loss ---
    objective = build_objective(cfg, mesh, device)
    loader = objective.loader
    if ckpt is not None:  # model / data / tokenizer changes stop here, others are listed
        notes = check_resume(ckpt, load_job_config(ckpt), cfg, objective.tokenizer_identity,
                             load_tokenizer_identity(ckpt))
        if is_main and notes:
            print("\n".join(notes))

    # --- model, optimizer, loss ---
    adapted: list[str] = []  # the LoRA-wrapped projections
    if cfg.lora.rank > 0:
        # LoRA wraps plain modules: built whole, the base loaded (a resumed run's checkpoint
        # holds only the adapters), adapters added, then TP / FSDP / DDP as usual.
        def adapt(raw: nn.Module) -> None:
            load_base_weights(raw, cfg.checkpoint.init_from)
            adapted.extend(apply_lora(raw, cfg.lora, seed=t.seed))  # base frozen

        pm = build_adapted_model(cfg, mesh, device, adapt)
    else:
        # Built on the meta device, parallelized (pipeline stages, TP, EP, FSDP), then only
        # this rank's shards are allocated and initialized (the values of an unsharded init).
        pm = build_parallel_model(cfg, mesh, device)
        if cfg.checkpoint.init_from and ckpt is None:  # weights only, e.g. an imported model
            load_model_weights(pm.raw, load_model_state(resolve_checkpoint(cfg.checkpoint.init_from)))
    raw, model = pm.raw, pm.model
    trainable, total = count_parameters(raw)
    optimizer = build_optimizer(raw, cfg.optim, device)  # over the sharded parameters
    scheduler = build_scheduler(optimizer, t.steps, cfg.optim)
    # MoE "bias" balancing with the loads of every rank of this pipeline stage; a no-op otherwise
    register_expert_bias_update(optimizer, raw, mesh.stage_group)
    if cfg.parallel.engine == "deepspeed":
        from parallel.deepspeed_engine import initialize

        model = initialize(raw, optimizer, scheduler, cfg, mesh.dp_size, device)
    # loss of a micro-batch (the objective's), the step's forward + backward, clip + AdamW:
    # chosen for this layout
    step_fns = build_train_step(model, pm, cfg, device, objective.build_loss)
    loss_fn = step_fns.loss_fn
    evaluate_benchmarks = benchmark_evaluator(cfg, raw, device, objective)
    eval_every = t.eval_every if evaluate_benchmarks else 0
    start_step, tokens_seen = 0, 0
    if ckpt is not None:
        state = load_train_checkpoint(ckpt, model, raw, optimizer, scheduler)
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        start_step, tokens_seen = state["step"], state["tokens_seen"]

    # --- run directory, resolved config, environment ---
    env = environment_info(dist_info)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.toml", to_toml(cfg))
        write_json(run_dir / "run_info.json", {"env": env, **objective.info})
        print(f"run {run_dir} | {json.dumps(env)}")
        print(to_toml(cfg))
        print(
            f"model: {cfg.model.num_params() / 1e6:.2f}M parameters "
            f"({cfg.model.num_params(active=True) / 1e6:.2f}M active per token), "
            f"{trainable:,} trainable ({100 * trainable / total:.2f}%"
            f"{f', LoRA on {len(adapted)} projections' if adapted else ''}) | "
            f"data: {objective.describe()} | {loader.accum_steps} micro-batches x {mesh.dp_size} "
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
    reset_peak_memory(device)  # peak_mem_gib from here on: the training's, not loading's
    log = MetricsLog(run_dir, cfg, is_main, resumed=start_step if ckpt is not None else None)
    progress = Progress(cfg, device, dist_info.world_size)
    say = print if is_main else (lambda *args, **kwargs: None)  # rank 0 speaks

    def checkpoint(step: int) -> None:
        # Every rank takes part (sharded states); the optimizer and scheduler are added inside.
        train_state = {
            "loader": loader.state_dict(), "rng": {"torch": torch.get_rng_state()},
            "step": step, "tokens_seen": tokens_seen,
        }
        path = save_train_checkpoint(
            run_dir, step, model, raw, optimizer, scheduler, train_state, cfg.to_dict(),
            cfg.checkpoint.keep, is_main, objective.tokenizer_identity,
        )
        say(f"checkpoint: {path}", flush=True)

    def due(every: int, step: int) -> bool:  # every 0: never
        return bool(every) and (step % every == 0 or step == t.steps)

    # --- loop: validate, evaluate, step, log, checkpoint, stop ---
    stop = StopRequested()
    tokens_per_step = objective.tokens_per_step
    step = start_step
    last_val = None
    t_start = time.time()
    model.train()
    while True:
        if due(t.val_every, step):
            val = objective.validate(model, loss_fn)  # val_loss, and the objective's own
            last_val = val.get("val_loss")
            log.log({"step": step, **val, "time_s": time.time() - t_start})
            say(f"step {step:5d} | " + " ".join(f"{k} {v:.4f}" for k, v in val.items()), flush=True)
        if due(eval_every, step):
            metrics, summary = evaluate_benchmarks(step)
            log.log({"step": step, **metrics})
            say(f"step {step:5d} | {summary}", flush=True)
        if step >= t.steps:
            break
        loss = step_fns.forward_backward(loader.next_step())
        # clip, step (and its hooks: the MoE bias update), zero grads, schedule; DeepSpeed
        # stepped inside the last backward
        grad_norm = step_fns.optimizer_step(optimizer, scheduler, cfg.optim.grad_clip)
        step += 1
        tokens_seen += tokens_per_step
        progress.count(tokens_per_step)
        loss_value = all_reduce_mean(loss).item()
        if not math.isfinite(loss_value):
            raise DivergedError(f"step {step}: loss is {loss_value}; lower optim.lr? (resume "
                                f"from the last checkpoint with --checkpoint.resume=latest)")
        record = {
            "step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm), "tokens": tokens_seen,
            "time_s": time.time() - t_start, "cpu_s": time.process_time(),  # wall / CPU seconds
            "peak_mem_gib": peak_memory_gib(device),  # this rank's since setup (before checkpoints)
        }
        if due(t.log_every, step) or step == t.steps:
            # loads per expert (MoE), domains drawn (mixtures): both since the last log line
            record.update(moe_metrics(raw))
            record.update(objective.metrics())  # mixture seen, the objective's (DPO rewards)
            say(progress.line(record), flush=True)
        log.log(record)
        stop_now = all_reduce_max(torch.tensor(float(stop.flag), device=device)).item() > 0
        if stop_now or step == t.steps or due(cfg.checkpoint.every, step):
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train a Transformer language model.",
        epilog="Any other --section.key=value overrides a config field (--optim.lr=1e-3).",
    )
    parser.add_argument("--config", required=True, help="TOML job config, e.g. configs/tiny.toml")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the mesh and each rank's memory for --world-size ranks, "
                             "building the model on the meta device only, and exit")
    parser.add_argument("--world-size", type=int, default=0,
                        help="with --dry-run: the number of ranks (default: torchrun's, or 1)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args, overrides = build_parser().parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        from parallel.dry_run import dry_run

        print(dry_run(cfg, args.world_size or env_world_size()))
        return
    train(cfg)


if __name__ == "__main__":
    run_cli(main)
