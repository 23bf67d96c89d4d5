"""The suite's one helper module: tiny training runs through train.py, tiny models, a small
tokenizer, and the bridge to transformers used as the reference.

The prepared corpus every run trains on is the `tiny_data` fixture (tests/conftest.py).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from data.tokenizer import Tokenizer, train_bpe
from model.config import model_config
from model.transformer import build_model

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"


def tiny_overrides(data_path: Path, run_dir: Path, **extra) -> list[str]:
    """CLI overrides for a ~100k-parameter model that trains in seconds on a CPU."""
    values = {
        "model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.vocab_size": 512, "model.max_seq_len": 64,
        "data.path": str(data_path),
        "train.run_dir": str(run_dir), "train.seq_len": 32, "train.batch_size": 8,
        "train.micro_batch_size": 4, "train.steps": 12, "train.val_every": 6,
        "train.val_batches": 2, "train.log_every": 4, "train.threads": 1,
        "optim.warmup_steps": 2, "optim.lr": 1e-2,
        "checkpoint.every": 4, "checkpoint.keep": 0, "logging.plot": False,
    }
    values.update(extra)
    return [f"--{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def run_train(
    args: list[str], nproc: int = 1, check: bool = True, config: str = "configs/tiny.toml", **popen
) -> subprocess.CompletedProcess:
    """train.py in a subprocess (torchrun when nproc > 1); raises with its output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "train.py", "--config", config, *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--standalone", "train.py", "--config", config, *args,
        ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def synthetic_data(root: Path, vocab: int = 256, train_tokens: int = 20_000) -> Path:
    """A prepared data dir written directly with data.shards (no tokenizer training, instant):
    a stream of 40 repeated random phrases (so the loss moves) with an end-of-text id 0 now and
    then, and a manifest like data.prepare's."""
    import numpy as np

    from data.shards import write_shard

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    phrases = [rng.integers(1, vocab, size=rng.integers(3, 12)) for _ in range(40)]
    manifest: dict = {"tokenizer": {"name": "synthetic", "n_vocab": vocab, "eot_id": 0}}
    for split, n in (("train", train_tokens), ("val", train_tokens // 5)):
        pieces, total = [], 0
        while total < n:
            piece = phrases[rng.integers(len(phrases))]
            pieces += [piece, [0]] if rng.random() < 0.1 else [piece]
            total += len(piece)
        tokens = np.concatenate(pieces)[:n].astype(np.uint16)
        write_shard(root / f"{split}_000000.bin", tokens, vocab)
        manifest[split] = {"shards": [{"file": f"{split}_000000.bin", "tokens": n}], "tokens": n}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def run_jobs(jobs: list[list[str]], nproc: int, timeout: float = 1500) -> None:
    """Several train.py jobs (each a `--config FILE --section.key=value ...` argument list, or
    `--call module:function ARG` for a function of the process group) one after another in ONE
    process group of `nproc` ranks: one launch and one set of imports for many runs
    (`python -m tests.helpers` is the worker). Ranks are started as torchrun would start them;
    when one fails the others are stopped and its output raised."""
    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    port = str(free_port())
    logs = Path(tempfile.mkdtemp(prefix="train_jobs_"))
    (logs / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "tests.helpers", str(logs / "jobs.json")]
    procs = []
    for r in range(nproc):
        rank_env = dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                        LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        with open(logs / f"{r}.log", "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env, stdout=out,
                                          stderr=subprocess.STDOUT))
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        r = failed[0]
        raise AssertionError(f"rank {r} of {nproc} failed (exit {procs[r].returncode}) running "
                             f"{logs / 'jobs.json'}:\n{(logs / f'{r}.log').read_text()[-8000:]}")


def _jobs_worker(jobs_file: str) -> None:
    import torch.distributed as dist

    import train
    from job_config import load_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # owned here, so train() leaves it up between jobs
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=world)
    import importlib

    for args in json.loads(Path(jobs_file).read_text()):
        print(f"=== job: {' '.join(args)}", flush=True)
        if args[0] == "--call":  # ["--call", "module:function", ARG]
            module, function = args[1].split(":")
            getattr(importlib.import_module(module), function)(*args[2:])
            continue
        config, overrides = args[1], args[2:]  # ["--config", FILE, *overrides]
        train.train(load_config(config, overrides))
    if world > 1:
        dist.destroy_process_group()


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run (json reads the Infinity of an idle expert's max/min ratio)."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for r in records(run_dir):
        if "loss" in r:
            assert r["step"] not in losses, f"step {r['step']} logged twice"
            losses[r["step"]] = r["loss"]
    return losses


# --- tiny models and a small tokenizer (evaluation, HF parity) ------------------------------


@functools.lru_cache(maxsize=1)
def small_tokenizer() -> Tokenizer:
    """A 384-id byte-level BPE (data/tokenizer.py) trained on LAMBADA passages: merges like
    ' the' exist, so tokenizing context and continuation together differs from apart."""
    lines = (BENCHMARKS / "lambada" / "lambada_test.jsonl").read_text().splitlines()[:150]
    return train_bpe([json.loads(line)["text"] for line in lines], vocab_size=384)


def tiny_model(vocab_size: int, seed: int = 0, max_seq_len: int = 512, **overrides):
    cfg = model_config(
        vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
        max_seq_len=max_seq_len, multiple_of=16, **overrides,
    )
    return build_model(cfg, "cpu", seed).eval()


def train_briefly(model, tokenizer: Tokenizer, texts: list[str], steps: int = 40) -> None:
    """A few AdamW steps of next-token prediction so the model's predictions are not flat."""
    ids = []
    for t in texts:
        ids += tokenizer.encode(t) + [tokenizer.eot_id]
    data = torch.tensor(ids)
    T = 64
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (8,), generator=gen)
        x = torch.stack([data[s : s + T] for s in starts])
        y = torch.stack([data[s + 1 : s + T + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def to_hf_llama(model):
    """A transformers LlamaForCausalLM holding our Transformer's weights (tensor names as in
    REFERENCE.md; RoPE is the halves convention in both, so q/k need no permutation)."""
    import transformers

    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
    )
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    parts = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
             "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
             "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj",
             "mlp.w_down": "mlp.down_proj"}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            part = rest.removesuffix(".weight")
            state[f"model.layers.{i}.{parts[part]}.weight"] = tensor
        else:
            state[names[name]] = tensor
    hf = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.eval()


if __name__ == "__main__":  # the worker of run_jobs
    _jobs_worker(sys.argv[1])
