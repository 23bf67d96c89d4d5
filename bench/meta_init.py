"""Peak host memory of building a model: in one process, against meta-device init on N FSDP ranks.

    python -m bench.meta_init --config configs/llama-1b.toml --world 2

Each measurement is a fresh process (peak RSS is per process, never reset): `baseline` imports
everything and builds nothing; `one process` runs model.transformer.build_model (every
parameter allocated and initialized: what any rank held before meta-device init); `rank r of N`
runs train.py's setup, parallel/build.py's build_parallel_model on an N-rank gloo FSDP mesh (the
model built on the meta device, sharded, then only this rank's shards allocated and
initialized). The table goes to bench/results/meta_init-<cpu>.md (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time

GIB = 2**30


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def measure(mode: str, config: str, overrides: list[str]) -> dict:
    """In this process: build as `mode` says and return the peak RSS (GiB) and the seconds."""
    import torch

    from job_config import load_config
    from model.transformer import build_model
    from parallel.build import build_parallel_model
    from parallel.dist import init_distributed
    from parallel.mesh import build_mesh, check_parallel

    cfg = load_config(config, overrides)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if mode == "one":
        model = build_model(cfg.model, "cpu", seed=cfg.train.seed)
        held = sum(p.numel() for p in model.parameters())
    elif mode == "ranks":
        info = init_distributed("cpu", "gloo")
        mesh = build_mesh(check_parallel(cfg, info.world_size), torch.device("cpu"))
        pm = build_parallel_model(cfg, mesh, torch.device("cpu"))
        held = sum(p.to_local().numel() for p in pm.raw.parameters())
    else:
        held = 0
    return {"mode": mode, "rank": int(os.environ.get("RANK", "0")), "peak_rss_gib": peak_rss(),
            "params_held": held, "seconds": time.perf_counter() - t0}


def run(mode: str, config: str, overrides: list[str], world: int = 1) -> list[dict]:
    """`measure` in fresh processes (`world` of them for "ranks"); their results."""
    cmd = [sys.executable, "-m", "bench.meta_init", "--measure", mode, "--config", config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if mode != "ranks":
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        return [json.loads(out.splitlines()[-1])]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(
        env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port)) for r in range(world)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed: {[p.returncode for p in procs]}")
    return [json.loads(o.splitlines()[-1]) for o in outs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/llama-1b.toml")
    parser.add_argument("--world", type=int, default=2, help="FSDP ranks (processes on this host)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # a child process
    args, overrides = parser.parse_known_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.config, overrides)))
        return
    overrides = ["--train.device=cpu", "--parallel.dp_shard=-1", *overrides]
    rows = run("baseline", args.config, overrides) + run("one", args.config, overrides)
    rows += run("ranks", args.config, overrides, args.world)
    one = rows[1]["peak_rss_gib"]
    lines = [
        f"# Meta-device init: peak RSS per process ({args.config}, {platform.processor() or platform.machine()})",
        "",
        "| build | parameters held | peak RSS (GiB) | vs one process | seconds |",
        "|---|---|---|---|---|",
    ]
    names = {"baseline": "imports only", "one": "one process, build_model"}
    for r in rows:
        name = names.get(r["mode"], f"rank {r['rank']} of {args.world}, meta init + FSDP")
        lines.append(f"| {name} | {r['params_held'] / 1e9:.3f}B | {r['peak_rss_gib']:.2f} | "
                     f"{r['peak_rss_gib'] / one:.2f} | {r['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    from bench.tables import RESULTS_DIR, write_table

    path = write_table(args.out or RESULTS_DIR, "meta_init", platform.machine() + "-cpu", text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
