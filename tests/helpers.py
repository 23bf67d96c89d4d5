"""The suite's one helper module: tiny training runs through train.py, tiny models, a small
tokenizer, and the bridge to transformers used as the reference.

The prepared corpus every run trains on is the `tiny_data` fixture (tests/conftest.py). The
data tests' planted-case corpus and streaming reference are in tests/data_helpers.py.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import run_cli
from data.tokenizer import Tokenizer, train_bpe
from model.config import model_config
from model.transformer import build_model

REPO = Path(__file__).resolve().parent.parent


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
    first = None  # the rank that failed on its own (the others are stopped after it)
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        first = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        if first is not None:
            break
        time.sleep(0.2)
    stopped = [r for r, p in enumerate(procs) if p.poll() is None]
    for r in stopped:
        procs[r].kill()
        procs[r].wait()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        r = first if first is not None else failed[0]
        why = "timed out" if first is None and stopped else f"failed (exit {procs[r].returncode})"
        raise AssertionError(f"rank {r} of {nproc} {why} running {logs / 'jobs.json'} (stopped "
                             f"after it: ranks {stopped}):\n{(logs / f'{r}.log').read_text()[-8000:]}")


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


@dataclass
class Forked:
    returncode: int  # fn's exit status; 1 after an exception; -N when killed by signal N
    stdout: str
    stderr: str


def run_forked(fn, *args, env: dict[str, str] | None = None, timeout: float = 300) -> Forked:
    """fn(*args) in a forked child process: this process's imports, so no interpreter or torch
    start-up (a train.py run takes ~1 s instead of ~10), its own stdout / stderr and extra
    environment, one torch thread. A real process: a SIGKILL inside fn (tests/test_faults.py) ends only the child
    and whatever it started (its own process group, killed afterwards)."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.setpgid(0, 0)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            os.environ.update(env or {})
            # One thread: an OpenMP pool the parent started does not survive fork (libgomp
            # hangs in the child's first parallel region).
            torch.set_num_threads(1)
            fn(*args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.time() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            done = os.waitpid(pid, 0)
            break
        time.sleep(0.02)
    try:
        os.killpg(pid, signal.SIGKILL)  # leftovers: worker processes of a killed child
    except (ProcessLookupError, PermissionError):
        pass
    status = done[1]
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    out.seek(0)
    err.seek(0)
    return Forked(code, out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def train_main(args: list[str], config: str = "configs/tiny.toml") -> None:
    """train.py's command line in this process (for run_forked), errors printed as the CLI does."""
    import train

    run_cli(lambda: train.main(["--config", str(REPO / config), *args]))


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


# --- English-like text and benchmark files (the tests never read ../shared) ------------------

STOP_WORDS = "the of and to a in is that it for as with was on be by this are from at or".split()


@functools.lru_cache(maxsize=1)
def english_words() -> list[str]:
    """The words of the Python documentation's help topics (pydoc_data, in every CPython)."""
    from pydoc_data.topics import topics

    words = {w.lower() for text in topics.values() for w in text.split() if w.isalpha()}
    return sorted(w for w in words if 2 <= len(w) <= 12)


def prose(rng: random.Random, n_words: int) -> str:
    """n_words of English-like sentences: stop words between documentation words."""
    vocab, out = english_words(), []
    for i in range(n_words):
        word = rng.choice(STOP_WORDS) if rng.random() < 0.35 else rng.choice(vocab)
        if i == 0 or out[-1].endswith("."):
            word = word.capitalize()
        out.append(word + ("." if rng.random() < 0.08 or i == n_words - 1 else ""))
    return " ".join(out)


def write_benchmarks(root: Path, n_items: int = 600, seed: int = 0) -> Path:
    """HellaSwag and LAMBADA files in their release formats (tasks read from <root>/<task>/),
    made of English-like text: `hellaswag_val_full.txt` (six lines per item: activity label +
    context, gold label, four endings) and `lambada_test.jsonl` (one passage per line, the last
    word the target). Deterministic for a seed; the items are distinct passages."""
    rng = random.Random(seed)
    (root / "hellaswag").mkdir(parents=True, exist_ok=True)
    (root / "lambada").mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(n_items):
        label = rng.randrange(4)
        activity = rng.choice(english_words()).capitalize()
        lines += [f"{activity}: {prose(rng, rng.randint(14, 30))} {rng.choice(STOP_WORDS)}",
                  str(label), *(prose(rng, rng.randint(5, 14)) for _ in range(4))]
    (root / "hellaswag" / "hellaswag_val_full.txt").write_text("\n".join(lines) + "\n")
    passages = [json.dumps({"text": prose(rng, rng.randint(40, 90)).rstrip(".")})
                for _ in range(n_items)]
    (root / "lambada" / "lambada_test.jsonl").write_text("\n".join(passages) + "\n")
    return root


@functools.lru_cache(maxsize=1)
def small_tokenizer() -> Tokenizer:
    """A 384-id byte-level BPE (data/tokenizer.py) trained on English-like passages: merges like
    ' the' exist, so tokenizing context and continuation together differs from apart."""
    rng = random.Random(1234)
    return train_bpe([prose(rng, 200) for _ in range(150)], vocab_size=384)


def tiny_model(vocab_size: int, seed: int = 0, max_seq_len: int = 512, **overrides):
    shape = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16)
    cfg = model_config(vocab_size=vocab_size, max_seq_len=max_seq_len, **{**shape, **overrides})
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


# --- tiny Hugging Face directories written by transformers (issue 13 fixtures) --------------

LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
# Llama 3's chat template, without the tool and date parts.
LLAMA3_CHAT = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2's ChatML template.
QWEN2_CHAT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def stdlib_sample(n_bytes: int, skip: int = 0) -> list[str]:
    """Whole .py files of the standard library, in a fixed order, about `n_bytes` of UTF-8."""
    from data.sources import stdlib_files

    texts, size = [], 0
    for path in stdlib_files()[skip:]:
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text.encode())
        if size >= n_bytes:
            break
    return texts


def _randomize(model, seed: int) -> None:
    """transformers initializes norms to 1 and biases to 0: random values show a missed one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=gen)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5, generator=gen)


def write_llama32_style(out: Path, vocab: int = 1024, seed: int = 0) -> Path:
    """A random Llama-3.2-style model and tokenizer written by transformers: a tiktoken BPE
    converted by transformers' TikTokenConverter (Split + ByteLevel, Llama 3's regex, every
    split a merge, ignore_merges), <|begin_of_text|> as BOS, Llama 3's special tokens and chat
    template, rope_scaling llama3 factor 32 (over a 32-token "original" context, so positions
    of a short test fall in all three frequency bands), tied embeddings, GQA, the instruct
    model's generation_config (sampling, three eos ids)."""
    import transformers
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from data.hf_bpe import LLAMA3_PATTERN

    bpe = train_bpe(stdlib_sample(300_000), vocab - len(LLAMA3_SPECIALS) + 1,
                    pattern=LLAMA3_PATTERN)
    bpe.save(out / "ranks.tiktoken")  # <|endoftext|> (the last id) is not passed on
    converter = TikTokenConverter(str(out / "ranks.tiktoken"), pattern=LLAMA3_PATTERN,
                                  extra_special_tokens=LLAMA3_SPECIALS)
    backend = converter.converted()
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        chat_template=LLAMA3_CHAT, clean_up_tokenization_spaces=True,
    )
    eos = [backend.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    config = transformers.LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
        bos_token_id=bos, eos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    _randomize(model, seed)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, do_sample=True, temperature=0.6, top_p=0.9)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "ranks.tiktoken").unlink()
    (out / "ranks.tiktoken.json").unlink()
    return out


def write_qwen2_style(out: Path, vocab: int = 1024, seed: int = 0) -> Path:
    """A random Qwen2-style model and tokenizer written by transformers: a BPE trained by
    `tokenizers` (merges in training order, NFC, Qwen2's regex with single digits), saved
    through transformers' Qwen2Tokenizer (which rebuilds that pipeline from vocab and merges),
    <|endoftext|> / <|im_start|> / <|im_end|>, ChatML template, q/k/v biases (random), tied
    embeddings, the instruct model's generation_config (repetition_penalty included)."""
    import transformers
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer

    from data.hf_bpe import QWEN2_PATTERN

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = RustTokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(stdlib_sample(300_000), trainers.BpeTrainer(
        vocab_size=vocab - len(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(backend.to_str())["model"]
    tok = transformers.Qwen2Tokenizer(
        vocab=state["vocab"], merges=[tuple(m) for m in state["merges"]], unk_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"], chat_template=QWEN2_CHAT,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    config = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        use_sliding_window=False, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    _randomize(model, seed)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=True,
        temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":  # the worker of run_jobs
    _jobs_worker(sys.argv[1])
