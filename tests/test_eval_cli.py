"""End to end on a tiny prepared corpus: training scores benchmarks every N steps, a checkpoint
is loaded back for evaluation, and a tokenizer that is not the run's stops with a message."""

import json

import pytest
import torch
from eval_testing import BENCHMARKS

from eval.harness import TokenizerMismatchError, evaluate_task, load_native
from eval.tasks import load_task

pytestmark = pytest.mark.skipif(
    not (BENCHMARKS / "lambada").is_dir(), reason=f"benchmark files not found in {BENCHMARKS}"
)

DATA = ["--data.max_bytes=600000", "--data.vocab_size=400", "--data.workers=1",
        "--data.tokenizer_train_bytes=200000", "--data.val_fraction=0.2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step training run of a 2-layer model on 600 KB of the standard library, scoring
    HellaSwag and LAMBADA (10 items each) every 2 steps."""
    from data.prepare import prepare
    from job_config import load_config
    from train import train

    root = tmp_path_factory.mktemp("evalrun")
    data = [f"--data.path={root / 'data'}", *DATA]
    prepare(load_config("configs/tiny.toml", data).data)
    cfg = load_config("configs/tiny.toml", data + [
        "--model.vocab_size=400", "--model.dim=32", "--model.n_layers=2",
        "--train.steps=4", "--train.batch_size=4", "--train.micro_batch_size=4",
        "--train.seq_len=64", "--train.val_every=2", "--train.val_batches=1",
        "--train.eval_tasks=['hellaswag', 'lambada']", "--train.eval_every=2",
        "--train.eval_limit=10", f"--train.run_dir={root / 'run'}", "--logging.plot=false",
        "--checkpoint.every=0", "--train.threads=1",
    ])
    threads = torch.get_num_threads()
    train(cfg)
    torch.set_num_threads(threads)
    return root


def test_training_logs_benchmark_scores(run):
    records = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/hellaswag/acc_norm" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert r["eval/hellaswag/n"] == 10 and r["eval/lambada/n"] == 10
        assert 0 <= r["eval/hellaswag/acc_norm"] <= 1 and r["eval/lambada/perplexity"] > 1


def test_checkpoint_scores_as_the_last_training_eval(run):
    lm, tok, ckpt = load_native(run / "run")
    assert ckpt.name == "step_000004"
    last = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    for task in ("hellaswag", "lambada"):
        m = evaluate_task(lm, tok, task, load_task(task, limit=10), progress=False)["metrics"]
        for key, value in m["all"].items():
            if key.endswith("_stderr"):
                continue  # not logged
            # same weights, same items; fp32 on CPU both times
            assert value == pytest.approx(last[f"eval/{task}/{key}"], rel=1e-6), (task, key)


def test_tokenizer_other_than_the_runs_stops_with_a_message(run, tmp_path):
    from data.tokenizer import train_bpe

    other = tmp_path / "other.tiktoken"
    train_bpe(["a completely different corpus, " * 50, "with other merges " * 40], 300, other)
    with pytest.raises(TokenizerMismatchError, match=r"was trained with tokenizer .* but the"):
        load_native(run / "run", tokenizer_spec=str(other))
