"""Nothing silent on the run side (issue 12): resuming with a changed config, damaged checkpoint
files, a tokenizer that is not the model's, and attention backends. Runs are train.py's own
command line in forked processes (tests/helpers.py run_forked: a run takes about a second).
Each test's docstring names the case of the issue's list it covers."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import train  # noqa: F401  (imported once here, so forked runs start warm)
from common.errors import FileFormatError, PretrainError, run_cli
from data.tokenizer import TokenizerError, train_bpe
from model.checkpoint import (
    TOKENIZER_FILE,
    CheckpointError,
    find_checkpoint,
    load_model_state,
    load_train_state,
)
from model.config import ModelConfig, ModelConfigError
from model.load import load_job_config, load_model
from model.transformer import build_model, resolve_attention_backend
from tests.helpers import run_forked, step_losses, tiny_overrides, train_main


@pytest.fixture(scope="module")
def base_run(tiny_data, tmp_path_factory) -> Path:
    """A 4-step run with a checkpoint at step 4 (copy it before changing it)."""
    build_model(ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=64), "cpu")  # warm up
    run = tmp_path_factory.mktemp("base") / "run"
    result = run_forked(train_main, tiny_overrides(tiny_data, run, **{"train.steps": 4}))
    assert result.returncode == 0, result.stderr
    return run


def copy_run(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    return run


def resume(tiny_data: Path, run: Path, **overrides):
    args = tiny_overrides(tiny_data, run, **{"train.steps": 4, "checkpoint.resume": "latest",
                                             **overrides})
    return run_forked(train_main, args)


def refused(result, *phrases: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)


def test_resume_refuses_model_data_and_tokenizer_changes(tiny_data, base_run, tmp_path):
    """Case: `--checkpoint.resume` with a changed config: a changed model.dim died in a raw
    PyTorch size-mismatch traceback. Now model, data and tokenizer changes stop before any
    setup with the list of differing keys."""
    run = copy_run(base_run, tmp_path)
    refused(resume(tiny_data, run, **{"model.dim": 128}),
            "model.dim: 64 -> 128", "model.head_dim: 16 -> 32", "checkpoint.init_from")
    other = tmp_path / "other-data"
    shutil.copytree(tiny_data, other)
    refused(resume(tiny_data, run, **{"data.path": str(other), "model.n_layers": 3}),
            f"data.path: '{tiny_data}' -> '{other}'", "model.n_layers: 2 -> 3")
    # the data dir prepared again in place: no config key differs, the tokenizer does
    identity_file = find_checkpoint(run) / TOKENIZER_FILE
    identity = json.loads(identity_file.read_text())
    identity_file.write_text(json.dumps({**identity, "sha256": "0" * 64, "name": "older"}))
    refused(resume(tiny_data, run), "tokenizer: 'older' (sha256 000000000000) ->")


def test_resume_lists_allowed_changes_and_guards_the_rest(tiny_data, base_run, tmp_path):
    """Case: `--checkpoint.resume` accepted seq_len and lr changes silently. Now a schedule
    change (lr, steps) is allowed and printed; a change of what a step computes (seq_len) is
    refused unless named in checkpoint.allow_changes."""
    run = copy_run(base_run, tmp_path)
    refused(resume(tiny_data, run, **{"train.seq_len": 16}),
            "train.seq_len: 32 -> 16", "checkpoint.allow_changes", '["train.seq_len"]')
    result = resume(tiny_data, run, **{"optim.lr": 5e-3, "train.steps": 6})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume: optim.lr: 0.01 -> 0.005" in result.stdout
    assert "resume: train.steps: 4 -> 6" in result.stdout
    assert sorted(step_losses(run)) == list(range(1, 7))
    result = resume(tiny_data, run, **{"train.steps": 8, "train.seq_len": 16,
                                       "checkpoint.allow_changes": ["train.seq_len"]})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume: train.seq_len: 32 -> 16" in result.stdout


def test_damaged_checkpoint_files_are_named(tiny_data, base_run, tmp_path, seed):
    """Case: a corrupt model.safetensors gave a raw SafetensorError naming no file; a corrupt
    train_state.pt raw torch errors. Now each damaged file of a checkpoint raises a
    PretrainError naming it, and a resume prints it without a traceback."""
    rng = random.Random(seed)
    run = copy_run(base_run, tmp_path)
    ckpt = find_checkpoint(run)
    originals = {name: (ckpt / name).read_bytes()
                 for name in ("model.safetensors", "train_state.pt", "config.json")}

    def damage(name: str, how: str) -> None:
        data = originals[name]
        cut = rng.randrange(1, len(data) - 1)
        (ckpt / name).write_bytes(data[:cut] if how == "truncate" else rng.randbytes(len(data)))

    for how in ("truncate", "random"):
        damage("model.safetensors", how)
        with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
            load_model_state(ckpt)
        with pytest.raises(CheckpointError, match="model.safetensors"):
            load_model(run)
        (ckpt / "model.safetensors").write_bytes(originals["model.safetensors"])
        damage("train_state.pt", how)
        with pytest.raises(CheckpointError, match="train_state.pt: not a readable train state"):
            load_train_state(ckpt)
        refused(resume(tiny_data, run), "train_state.pt: not a readable train state")
        (ckpt / "train_state.pt").write_bytes(originals["train_state.pt"])
        damage("config.json", how)
        with pytest.raises(FileFormatError, match="config.json: expected the job config"):
            load_job_config(ckpt)
        (ckpt / "config.json").write_bytes(originals["config.json"])
    (run / "checkpoints" / "latest").write_bytes(b"../../elsewhere\n")
    with pytest.raises(CheckpointError, match="latest: expected the name of a step_NNNNNN"):
        find_checkpoint(run)


def test_generate_refuses_a_tokenizer_of_another_identity(tiny_data, base_run, tmp_path, seed):
    """Case: `python -m model.generate --run` on a model imported without its own tokenizer
    silently used the default data directory's tokenizer and printed garbage. Now a checkpoint
    records its tokenizer's identity: generate refuses one with another identity (naming
    both), and a model imported without a tokenizer needs --tokenizer."""
    from model import generate
    from model.hf import export_run, import_hf

    def sample(run: Path, *extra: str):
        return run_forked(lambda: run_cli(lambda: generate.main(
            ["--run", str(run), "--prompt", "def ", "--max-new-tokens", "5", "--device", "cpu",
             *extra])))

    result = sample(base_run)
    assert result.returncode == 0, result.stderr[-2000:]
    other = train_bpe([" ".join(random.Random(seed).choices("ab cd ef gh", k=3000))], 270,
                      tmp_path / "other.tiktoken")
    result = sample(base_run, "--tokenizer", str(tmp_path / "other.tiktoken"))
    refused(result, "was trained with tokenizer", f"sha256 {other.identity()['sha256'][:12]}",
            "use the run's tokenizer")

    export_run(base_run, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").unlink()  # a model published without a tokenizer
    import_hf(tmp_path / "hf", tmp_path / "imported")
    refused(sample(tmp_path / "imported"), "came without a tokenizer", "--tokenizer SPEC")
    result = sample(tmp_path / "imported", "--tokenizer", str(tiny_data / "tokenizer.tiktoken"))
    assert result.returncode == 0 and "--- sample 1" in result.stdout, result.stderr[-2000:]


def test_auto_attention_falls_back_to_sdpa_where_the_kernel_refuses(seed):
    """Case: model.attention = "auto" on CUDA picked the Triton kernel even for head dims it
    rejects at the first forward. Now auto picks Triton exactly for the head dims the kernel's
    own launcher accepts (checked here by calling it, in the interpreter), SDPA otherwise, and
    an explicit "triton" with such a head dim stops when the model is built."""
    from kernels.attention import attention

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for head_dim in range(8, 264, 8):
        q = torch.randn(1, 2, 16, head_dim)
        try:
            attention(q, q, q, causal=True)
            accepted = True
        except ValueError as e:
            assert "head dim" in str(e)
            accepted = False
        want = "triton" if accepted else "sdpa"
        assert resolve_attention_backend("auto", cuda, head_dim) == want, head_dim
        assert resolve_attention_backend("auto", cpu, head_dim) == "sdpa"
        if not accepted:
            cfg = ModelConfig(dim=2 * head_dim, n_heads=2, attention="triton", vocab_size=64)
            with pytest.raises(ModelConfigError, match=f"not model.head_dim = {head_dim}"):
                build_model(cfg, "meta")
    assert resolve_attention_backend("sdpa", cuda, 64) == "sdpa"


def test_the_errors_of_users_are_one_type():
    """Every specific error of the project is a PretrainError (the CLIs print those without a
    traceback) and keeps the built-in class callers caught before."""
    from data.decontaminate import BenchmarkError
    from data.prepare import PrepareError
    from data.shards import ShardError
    from eval.tasks import TaskDataError
    from job_config import ConfigError
    from model.hf_config import ExportError
    from parallel.mesh import ParallelConfigError
    from training.resume import ResumeError

    for cls, builtin in [(ShardError, ValueError), (TaskDataError, RuntimeError),
                         (PrepareError, RuntimeError), (ParallelConfigError, ValueError),
                         (ExportError, ValueError), (ConfigError, ValueError),
                         (BenchmarkError, ValueError), (TokenizerError, ValueError),
                         (CheckpointError, ValueError), (ResumeError, ValueError)]:
        assert issubclass(cls, PretrainError) and issubclass(cls, builtin), cls


def test_damaged_hf_directory_files_are_named(base_run, tmp_path, seed):
    """Case: a corrupt model.safetensors gave a raw SafetensorError naming no file (here in a
    Hugging Face directory being imported): now each damaged file (weights, index, config.json,
    tokenizer.json) raises a PretrainError naming it."""
    from data.hf_tokenizer import HFTokenizer
    from model.hf import export_run, import_hf

    rng = random.Random(seed)
    hf = tmp_path / "hf"
    export_run(base_run, hf, max_shard_size="100KB")  # sharded, with an index
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    originals = {p.name: p.read_bytes() for p in hf.iterdir()}

    def damaged(name: str) -> None:
        data = originals[name]
        (hf / name).write_bytes(data[: rng.randrange(1, len(data) - 1)])

    for name, match in [(shard.name, f"{shard.name}: not a readable safetensors file"),
                        ("model.safetensors.index.json", "index.json: expected a safetensors"),
                        ("config.json", "config.json: expected a Hugging Face model config")]:
        damaged(name)
        with pytest.raises(PretrainError, match=match):
            import_hf(hf, tmp_path / f"imported-{name}")
        (hf / name).write_bytes(originals[name])
    damaged("tokenizer.json")
    with pytest.raises(PretrainError, match="tokenizer.json: expected a tokenizer.json"):
        HFTokenizer(hf)
    import_hf(hf, tmp_path / "imported")  # the model imports; the tokenizer is not trusted
    identity = json.loads(next((tmp_path / "imported").rglob(TOKENIZER_FILE)).read_text())
    assert identity["sha256"] is None and "tokenizer.json: expected" in identity["reason"]
