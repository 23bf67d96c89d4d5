"""The suite's one helper module: tiny training runs through train.py, tiny models, a small
tokenizer, and the bridge to transformers used as the reference.

The prepared corpus every run trains on is the `tiny_data` fixture (tests/conftest.py).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
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


# --- in-context-learning task files (llm-foundry's layouts), made here -----------------------

_NOUNS = ["river", "teacher", "garden", "engine", "planet", "violin", "forest", "doctor",
          "window", "market", "castle", "rocket", "island", "farmer", "mirror", "bridge"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
HUMAN_EVAL_PROBLEMS = [
    ("add", "def add(a: int, b: int) -> int:\n    \"\"\"Return the sum of a and b.\n    >>> add(2, 3)\n    5\n    \"\"\"\n",
     "    return a + b\n", "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"),
    ("is_even", "def is_even(n: int) -> bool:\n    \"\"\"Whether n is even.\n    >>> is_even(4)\n    True\n    \"\"\"\n",
     "    return n % 2 == 0\n", "def check(candidate):\n    assert candidate(4) is True\n    assert candidate(7) is False\n"),
    ("reverse", "def reverse(s: str) -> str:\n    \"\"\"Reverse a string.\n    >>> reverse('ab')\n    'ba'\n    \"\"\"\n",
     "    return s[::-1]\n", "def check(candidate):\n    assert candidate('abc') == 'cba'\n"),
]


def write_icl_fixtures(root: Path, n: int = 14, seed: int = 0) -> Path:
    """A benchmark dir in the layouts of ../shared/benchmarks: icl/<category>/<task>.jsonl for
    one task of each ICL type (arc_easy MC, winogrande schema, lambada_openai LM), the probes,
    gsm8k and human_eval, and hellaswag/hellaswag_val.jsonl (CORE's HellaSwag is rebuilt from
    it). `n` items each, made from a fixed word list (seeded)."""
    import random

    rng = random.Random(seed)

    def write(rel: str, rows: list[dict]) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    mc = []
    for _ in range(n):
        noun = rng.choice(_NOUNS)
        choices = rng.sample(_COLORS, 4)
        mc.append({"query": f"Question: Which color is the {noun} in the old story?",
                   "choices": choices, "gold": rng.randrange(4)})
    write("icl/world_knowledge/arc_easy.jsonl", mc)
    schema = []
    for _ in range(n):
        a, b = rng.sample(_NOUNS, 2)
        stem = f"The {a} was taller than the {b} because the"
        schema.append({"context_options": [f"{stem} {a}", f"{stem} {b}"],
                       "continuation": rng.choice(["grew for years.", "was new."]),
                       "gold": rng.randrange(2)})
    write("icl/language_understanding/winogrande.jsonl", schema)
    lm = [{"context": f"The {rng.choice(_NOUNS)} near the {rng.choice(_NOUNS)} was painted "
                      f"{rng.choice(_COLORS)} and then the",
           "continuation": rng.choice(_NOUNS)} for _ in range(n)]
    write("icl/language_understanding/lambada_openai.jsonl", lm)
    tf = [{"query": f"Is the following statement true or false?\nQ: A {rng.choice(_NOUNS)} is "
                    f"{rng.choice(_COLORS)}.\nA:", "choices": ["T", "F"], "gold": rng.randrange(2)}
          for _ in range(n)]
    write("icl/world_knowledge/bigbench_misconceptions.jsonl", tf)
    for pronoun in ("she", "he"):
        rows = []
        for _ in range(n):
            a, b = rng.sample(_NOUNS, 2)
            rows.append({"query": f"Sentence: \"The {a} told the {b} that {pronoun} was late.\"\n"
                                  f"Q: Who does the pronoun \"{pronoun}\" refer to? A:",
                         "choices": [f"the {a}", f"the {b}"], "gold": rng.randrange(2)})
        write(f"icl/safety/winogender_mc_{'female' if pronoun == 'she' else 'male'}.jsonl", rows)
    gsm = []
    for _ in range(n):
        x, y = rng.randrange(2, 20), rng.randrange(2, 20)
        gsm.append({"context": f"Ann has {x} apples and buys {y} more. How many apples has she?",
                    "chain_of_thought": f"She has {x} + {y} = <<{x}+{y}={x + y}>>{x + y} apples.",
                    "answer": str(x + y)})
    write("icl/symbolic_problem_solving/gsm8k.jsonl", gsm)
    write("icl/programming/human_eval.jsonl", [
        {"task_id": f"HumanEval/{i}", "prompt": prompt, "entry_point": name,
         "canonical_solution": body, "test": test}
        for i, (name, prompt, body, test) in enumerate(HUMAN_EVAL_PROBLEMS)
    ])
    hs = []
    for _ in range(n):
        noun = rng.choice(_NOUNS)
        hs.append({"activity_label": "Painting", "ctx_a": f"A man paints the {noun}.",
                   "ctx_b": "then he", "label": rng.randrange(4),
                   "endings": [f"paints it {c}." for c in rng.sample(_COLORS, 4)]})
    write("hellaswag/hellaswag_val.jsonl", hs)
    return root


def icl_fixture_texts(root: Path) -> list[str]:
    """Every string of the fixture files, for training a tokenizer on them."""
    texts = []
    for path in sorted(root.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            texts += [v for v in _strings(json.loads(line))]
    return texts


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
