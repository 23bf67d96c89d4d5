import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from model.checkpoint import find_checkpoint
from model.load import load_model
from tests.helpers import REPO, run_train, step_losses, tiny_overrides


def test_training_lowers_validation_loss_and_writes_the_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_train(tiny_overrides(tiny_data, run, **{"train.steps": 40, "train.val_every": 20,
                                                "logging.plot": True}))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[0] > math.log(512) - 0.3  # step 0 is near uniform over the vocabulary
    assert val[-1] < val[0] - 0.8, val  # measured: 6.25 -> 5.27
    assert (run / "loss.png").stat().st_size > 1000
    assert "[model]" in (run / "config.toml").read_text()
    info = json.loads((run / "run_info.json").read_text())
    assert info["env"]["torch"] == torch.__version__
    assert find_checkpoint(run).name == "step_000040"


def test_killed_run_resumes_with_identical_losses(tiny_data, tmp_path):
    steps = 24
    reference = tmp_path / "reference"
    run_train(tiny_overrides(tiny_data, reference, **{"train.steps": steps}))
    want = step_losses(reference)

    killed = tmp_path / "killed"
    args = tiny_overrides(tiny_data, killed, **{"train.steps": steps})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", "--config", "configs/tiny.toml", *args],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed_at = int(latest.read_text().strip().split("_")[1])
    assert resumed_at < steps

    run_train(tiny_overrides(tiny_data, killed, **{"train.steps": steps,
                                                   "checkpoint.resume": "latest"}))
    got = step_losses(killed)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(resumed_at + 1, steps + 1):
        assert got[step] == want[step], (step, got[step], want[step])


def test_sigterm_saves_a_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(tiny_data, run, **{"train.steps": 100000, "checkpoint.every": 0})
    proc = subprocess.Popen([sys.executable, "train.py", "--config", "configs/tiny.toml", *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step") and "/100000" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    step = int(find_checkpoint(run).name.split("_")[1])
    assert step >= 4 and step in step_losses(run)


def test_torchrun_two_ranks_match_one_process(tiny_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = {"train.steps": 6, "train.val_every": 0, "train.batch_size": 8,
              "train.micro_batch_size": 4}
    run_train(tiny_overrides(tiny_data, one, **common))  # 2 micro-batches on 1 rank
    run_train(tiny_overrides(tiny_data, two, **common), nproc=2)  # 1 micro-batch per rank
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])


def test_tokenizer_larger_than_model_vocab_is_refused(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_data, run, **{"model.vocab_size": 256}), check=False)
    assert proc.returncode != 0
    assert "512 ids" in proc.stderr and "model.vocab_size = 256" in proc.stderr
    assert not run.exists()


def test_missing_run_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
    proc = subprocess.run([sys.executable, "-m", "eval", "--run", str(tmp_path / "nope")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_eval_and_generate_cli_on_a_trained_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_train(tiny_overrides(tiny_data, run, **{"train.steps": 4, "train.val_every": 0}))
    out = tmp_path / "ppl.json"
    subprocess.run([sys.executable, "-m", "eval", "--run", str(run), "--max-batches", "2",
                    "--out", str(out)], cwd=REPO, check=True, capture_output=True)
    results = json.loads(out.read_text())
    assert results["tokens"] > 0 and results["bits_per_byte"] > 0
    assert math.isclose(results["perplexity"], math.exp(results["val_loss"]), rel_tol=1e-9)
    proc = subprocess.run([sys.executable, "-m", "model.generate", "--run", str(run), "--prompt",
                           "def ", "--max-new-tokens", "10"], cwd=REPO, check=True,
                          capture_output=True, text=True)
    assert "def " in proc.stdout

    # Without --out the results go into the run: <run>/eval/step_<N>.json, the same numbers.
    from eval.__main__ import main as evaluate
    from model.generate import main as sample

    evaluate(["--run", str(run), "--step", "4", "--max-batches", "2"])
    in_run = json.loads((run / "eval" / "step_000004.json").read_text())
    assert in_run["checkpoint"] == results["checkpoint"] and in_run["tokens"] == results["tokens"]
    assert in_run["val_loss"] == pytest.approx(results["val_loss"], rel=1e-6)
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step_000004.json"]  # no temp
    # model.generate --out: the samples it printed, as JSON.
    sample(["--run", str(run), "--step", "4", "--prompt", "def ", "--max-new-tokens", "10",
            "--temperature", "0", "--num-samples", "2", "--out", str(tmp_path / "s.json")])
    samples = json.loads((tmp_path / "s.json").read_text())
    assert samples["temperature"] == 0 and len(samples["samples"]) == 2
    assert samples["samples"][0] == samples["samples"][1] and samples["samples"][0].startswith("def ")


def test_init_from_starts_a_fresh_run_from_trained_weights(tiny_data, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_train(tiny_overrides(tiny_data, first, **{"train.steps": 6, "train.val_every": 6}))
    run_train(tiny_overrides(tiny_data, second, **{"train.steps": 2, "train.val_every": 2,
                                                   "checkpoint.init_from": str(first)}))
    val = lambda run: [json.loads(x)["val_loss"] for x in (run / "metrics.jsonl").read_text()
                       .splitlines() if "val_loss" in x]
    # the second run's step-0 validation is the first run's final model, exactly
    assert val(second)[0] == val(first)[-1]
    assert sorted(step_losses(second)) == [1, 2]  # a fresh schedule from step 0
