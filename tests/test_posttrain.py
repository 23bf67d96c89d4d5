"""Fine-tuning through train.py (objectives/): SFT with all parameters or LoRA, DPO against the
base (adapters off) or a frozen copy; checkpoints, exact resume, DDP / FSDP, eval and export
of the result. A tiny pretrained model is the base; the data is made here: "repeat: <words>"
and the words back (SFT); for DPO, answers of polite words preferred to answers of rude ones."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import hf_peft
from model.hf import export_run
from tests.helpers import REPO, records, run_train, step_losses, tiny_overrides

WORDS = "the cat sat on a mat while seven quick foxes jumped over lazy dogs near gold".split()
POLITE, RUDE = "please thank you kindly gladly".split(), "no never stupid go away".split()


@pytest.fixture(scope="module")
def base(tiny_data, tmp_path_factory):
    """A tiny model pretrained for a few steps (the model every test fine-tunes)."""
    run = tmp_path_factory.mktemp("base") / "run"
    run_train(tiny_overrides(tiny_data, run, **{"train.steps": 20, "checkpoint.every": 0}))
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = random.Random(0)
    out = tmp_path_factory.mktemp("posttrain")
    with open(out / "echo.jsonl", "w") as sft, open(out / "pairs.jsonl", "w") as dpo:
        for _ in range(240):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            sft.write(json.dumps({"messages": [{"role": "user", "content": f"repeat: {words}"},
                                               {"role": "assistant", "content": words}]}) + "\n")
            polite = " ".join(rng.choice(POLITE) for _ in range(rng.randint(2, 4)))
            rude = " ".join(rng.choice(RUDE) for _ in range(rng.randint(2, 4)))
            dpo.write(json.dumps({"prompt": words, "chosen": polite, "rejected": rude}) + "\n")
    # A second SFT task in another shape, for the mixture and the per-task validation.
    with open(out / "upper.jsonl", "w") as f:
        for _ in range(120):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
            f.write(json.dumps({"prompt": f"shout: {words}", "completion": words.upper()}) + "\n")
    return out


def finetune(base: Path, run: Path, objective: str, sources: list[Path], **extra) -> list[str]:
    values = {
        "train.objective": objective, "checkpoint.init_from": str(base),
        "posttrain.data": [str(s) for s in sources], "posttrain.holdout": 40,
        "train.run_dir": str(run), "train.steps": 16, "train.seq_len": 48,
        "train.batch_size": 8, "train.micro_batch_size": 4, "train.val_every": 8,
        "train.log_every": 4, "train.threads": 1, "optim.warmup_steps": 2, "optim.lr": 1e-2,
        "optim.weight_decay": 0.0, "checkpoint.every": 8, "checkpoint.keep": 0,
        "logging.plot": False,
    }
    values.update(extra)
    return [f"--{k}={json.dumps(v)}" for k, v in values.items()]


def vals(run: Path, key: str = "val_loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run) if key in r}


LORA = {"lora.rank": 8, "lora.alpha": 16.0, "lora.targets": ["all-linear"], "optim.lr": 3e-2}


def test_full_sft_learns_each_task_and_eval_runs_on_the_result(base, data, tmp_path):
    run = tmp_path / "sft"
    run_train(finetune(base, run, "sft", [data / "echo.jsonl", f"{data / 'upper.jsonl'}=1"]))
    for key in ("val_loss", "val/echo/loss", "val/upper/loss"):
        v = vals(run, key)
        assert v[16] < v[0] - 0.5, (key, v)
    seen = [r["mixture/echo"] for r in records(run) if "mixture/echo" in r]
    assert 0.3 < seen[-1] < 0.7  # weights 1 : 1 by conversations
    info = json.loads((run / "run_info.json").read_text())
    assert info["tasks"]["echo"]["train"] == 200 and info["tasks"]["upper"]["val"] == 40
    # The run keeps its base's architecture and tokenizer: the usual eval reads it.
    out = subprocess.run([sys.executable, "-m", "eval", "--run", str(run), "--max-batches", "2"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "perplexity" in out.stdout, out.stderr[-2000:]


def test_lora_sft_checkpoints_adapters_resumes_exactly_and_exports(base, data, tmp_path):
    import transformers

    run = tmp_path / "lora"
    run_train(finetune(base, run, "sft", [data / "echo.jsonl"], **LORA))
    v = vals(run)  # slower than full fine-tuning: the embeddings are frozen
    assert v[16] < v[8] < v[0] - 0.1, v
    state = load_file(run / "checkpoints" / "step_000016" / "model.safetensors")
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    # Killed at step 8 and resumed: the same losses as the run that went straight through.
    resumed = tmp_path / "resumed"
    run_train(finetune(base, resumed, "sft", [data / "echo.jsonl"], **LORA,
                       **{"train.steps": 16, "checkpoint.every": 8}))
    import shutil

    shutil.rmtree(resumed / "checkpoints" / "step_000016")
    (resumed / "checkpoints" / "latest").write_text("step_000008\n")
    run_train(finetune(base, resumed, "sft", [data / "echo.jsonl"], **LORA,
                       **{"checkpoint.resume": "latest"}))
    want, got = step_losses(run), step_losses(resumed)
    assert all(got[s] == want[s] for s in range(9, 17)), (got, want)
    # Merged export: transformers loads it without a warning and computes our merged model.
    from model.load import load_model

    hf_dir = tmp_path / "hf"
    export_run(run, hf_dir)
    ours, _, _ = load_model(run)
    with _no_warnings():
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
    # The adapter in PEFT's format onto the base's export: the same model.
    import peft

    base_hf, adapter = tmp_path / "base-hf", tmp_path / "adapter"
    export_run(base, base_hf)
    hf_peft.main(["--run", str(run), "--out-dir", str(adapter)])
    model = transformers.AutoModelForCausalLM.from_pretrained(base_hf)
    model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)


class _no_warnings:
    """No Python warning and no transformers logging warning inside."""

    def __enter__(self):
        import logging
        import warnings

        import transformers

        self.catch = warnings.catch_warnings(record=True)
        self.caught = self.catch.__enter__()
        warnings.simplefilter("always")
        self.records: list = []
        handler = logging.Handler()
        handler.emit = self.records.append
        self.handler, self.logger = handler, transformers.logging.get_logger("transformers")
        self.logger.addHandler(handler)

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.catch.__exit__(*exc)
        messages = [str(w.message) for w in self.caught]
        messages += [r.getMessage() for r in self.records if r.levelno >= 30]
        assert not messages, messages


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_dpo_raises_held_out_preference_accuracy(base, data, tmp_path, lora):
    """DPO on the pairs: held-out accuracy starts at exactly 0.5 (policy = reference: every
    margin is 0) and rises; the margin grows; the KL to the reference is logged."""
    run = tmp_path / "dpo"
    extra = {"posttrain.beta": 0.5, "train.steps": 24, "train.val_every": 12}
    extra.update(LORA if lora else {"optim.lr": 3e-3})
    run_train(finetune(base, run, "dpo", [data / "pairs.jsonl"], **extra))
    acc, margin = vals(run, "val/accuracy"), vals(run, "val/margin")
    assert acc[0] == 0.5 and margin[0] == 0.0
    assert acc[24] >= 0.7 and margin[24] > 0.1, (acc, margin)
    logged = [r for r in records(run) if "dpo/accuracy" in r]
    assert logged and all(0 <= r["dpo/accuracy"] <= 1 for r in logged)
    assert logged[0]["dpo/kl"] >= 0 and logged[-1]["dpo/kl"] > 1e-4  # it moved off the reference
    # python -m eval scores the same held-out pairs against the same reference afterwards.
    from eval.__main__ import main as eval_main

    eval_main(["--run", str(run), "--no-perplexity", "--preference", "--out",
               str(tmp_path / "pref.json")])
    got = json.loads((tmp_path / "pref.json").read_text())["preference"]["pairs"]
    assert got["pairs"] == 40 and got["accuracy"] == pytest.approx(acc[24], abs=1e-9)
    assert got["margin"] == pytest.approx(margin[24], rel=1e-4, abs=1e-6)


SHORT = {**LORA, "train.steps": 6, "train.val_every": 6, "checkpoint.every": 0}


@pytest.fixture(scope="module")
def one_process(base, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora-one") / "run"
    run_train(finetune(base, run, "sft", [data / "echo.jsonl"], **SHORT))
    return run


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_lora_sft_on_two_ranks_matches_one_process(base, data, one_process, tmp_path, parallel):
    one, two, extra = one_process, tmp_path / "two", SHORT
    run_train(finetune(base, two, "sft", [data / "echo.jsonl"], **extra,
                       **{"parallel.data_parallel": parallel}), nproc=2)
    want, got = step_losses(one), step_losses(two)
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got, want)
    v1, v2 = vals(one), vals(two)
    assert abs(v1[6] - v2[6]) <= 1e-5 * v1[6]
    state = load_file(two / "checkpoints" / "step_000006" / "model.safetensors")
    assert all(".lora_" in k for k in state)


def test_lora_dpo_on_two_fsdp_ranks_matches_one_process(base, data, tmp_path):
    """The reference forward (adapters off, no gradient) through the sharded model, then the
    policy's: the same losses and held-out accuracy as one process."""
    extra = {**SHORT, "train.steps": 4, "train.val_every": 4, "posttrain.beta": 0.5}
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(finetune(base, one, "dpo", [data / "pairs.jsonl"], **extra))
    run_train(finetune(base, two, "dpo", [data / "pairs.jsonl"], **extra), nproc=2)
    want, got = step_losses(one), step_losses(two)
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got, want)
    for key in ("val_loss", "val/margin"):
        a, b = vals(one, key)[4], vals(two, key)[4]
        assert abs(a - b) <= 1e-5 * max(abs(a), 1e-3), (key, a, b)
