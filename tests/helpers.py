"""The suite's one helper module: tiny training runs through train.py, tiny models, a small
tokenizer, and the bridge to transformers used as the reference.

The prepared corpus every run trains on is the `tiny_data` fixture (tests/conftest.py). The
data tests' planted-case corpus: `planted_corpus`, `prose`, `small_data_config`.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from data.decontaminate import DecontamConfig
from data.tokenizer import Tokenizer, train_bpe
from job_config import DataConfig
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


# --- data: the planted-case corpus -------------------------------------------------------------

VOCAB = [
    "".join(random.Random(i).choice("bcdfghklmnprstvwz") + random.Random(i + 7).choice("aeiou")
            for _ in range(3)) + str(i)
    for i in range(3000)
]


def prose(rng: random.Random, n: int) -> str:
    """n random words in sentences; the prose quality rules pass it (it has stop words)."""
    words = []
    for i in range(n):
        words.append(rng.choice(["the", "and", "of", "to"]) if i % 4 == 0 else rng.choice(VOCAB))
        if i % 12 == 11:
            words[-1] += "."
    return " ".join(words) + "."


def planted_corpus(tmp: Path, rng: random.Random) -> tuple[list[str], dict]:
    """Source files with planted duplicates, PII, contamination, junk and bad input."""
    bench_items = [prose(rng, 40) for _ in range(5)]
    (tmp / "bench.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in bench_items))
    plan = {"exact": 3, "near": 2, "email": 2, "phone": 1, "contaminated": 2, "junk": 2}
    docs = [prose(rng, 300) for _ in range(30)]
    records = list(docs)
    records += [docs[1], docs[5], docs[9]]  # exact duplicates
    for i in (2, 6):  # near duplicates: 2 words of 300 changed (Jaccard ~0.94)
        words = docs[i].split()
        words[100], words[200] = "changed", "edited"
        records.append(" ".join(words))
    records[10] += " Write to jane.roe@gmail.com or call 415-555-0132."
    records[11] += " Or bob.smith@yahoo.co.uk."
    for i in (12, 13):  # a benchmark item pasted in the middle
        records[i] = records[i][:800] + " " + bench_items[i - 10] + " " + records[i][800:]
    records += ["buy now " * 3, "click here"]  # junk: too few words for the prose rules
    rng.shuffle(records[30:])
    lines = [json.dumps({"text": t}) for t in records]
    lines.insert(4, "{not json")  # bad input: counted with its line number
    lines.insert(9, json.dumps({"body": "no text field"}))
    (tmp / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # invalid UTF-8
    return [str(tmp / "corpus.jsonl"), str(tmp / "latin1.txt")], plan


def small_data_config(tmp: Path, sources: list[str], **overrides) -> DataConfig:
    cfg = DataConfig(
        path=str(tmp / "prepared"),
        sources=sources,
        tokenizer="train",
        vocab_size=300,
        val_fraction=0.1,
        shard_tokens=5000,
        workers=1,
        decontaminate=DecontamConfig(benchmarks=[f"toy={tmp / 'bench.jsonl'}"], ngram=13),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def streaming_reference(cfg: DataConfig, tokenizer: Tokenizer) -> dict:
    """What data.prepare must write for `cfg`, computed the way it was before the sharded job:
    one process streams the corpus through `Pipeline.run` (dedup state held in this process),
    splits the kept documents by position and cuts shards of shard_tokens * 4 characters.
    -> {"shards": {file name: tokens}, "stages": counters (no seconds), "source_errors"}."""
    import numpy as np

    from data.pipeline import build_pipeline
    from data.prepare import iter_corpus
    from data.sources import SourceErrors

    errors = SourceErrors()
    pipe = build_pipeline(cfg)
    unit_chars, f = cfg.shard_tokens * 4, cfg.val_fraction
    pending: dict[str, list[str]] = {"train": [], "val": []}
    shards: dict[str, np.ndarray] = {}

    def close(split: str) -> None:
        ids = [tokenizer.encode(t) + [tokenizer.eot_id] for t in pending[split]]
        index = sum(name.startswith(split) for name in shards)
        shards[f"{split}_{index:06d}.bin"] = np.array([i for d in ids for i in d], np.int64)
        pending[split] = []

    for k, (text, _) in enumerate(pipe.run(iter_corpus(cfg, errors))):
        split = "val" if int((k + 1) * f) > int(k * f) else "train"
        pending[split].append(text)
        if sum(map(len, pending[split])) >= unit_chars:
            close(split)
    for split in ("train", "val"):
        if pending[split]:
            close(split)
    stages = {name: {k: v for k, v in st.items() if k != "seconds"}
              for name, st in pipe.stats_dict().items()}
    return {"shards": shards, "stages": stages,
            "source_errors": {"count": errors.count, "first": errors.summary()[:100]}}


def assert_prepared_like_streaming(path: Path, reference: dict) -> None:
    """The prepared directory `path` holds exactly the streaming reference's shards, counters
    and source errors."""
    import numpy as np

    from data.shards import read_shard

    manifest = json.loads((path / "manifest.json").read_text())
    names = sorted(p.name for p in path.glob("*.bin"))
    assert names == sorted(reference["shards"])
    for name in names:
        assert np.array_equal(read_shard(path / name), reference["shards"][name]), name
    assert manifest["stages"] == reference["stages"]
    assert manifest["source_errors"] == reference["source_errors"]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a prepared directory (prepare_log.json: timings, left out)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())
            if p.is_file() and p.name != "prepare_log.json"}
