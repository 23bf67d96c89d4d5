"""End to end on a tiny prepared corpus: training scores benchmarks every N steps, a checkpoint
is loaded back for evaluation, and a tokenizer that is not the run's stops with a message."""

import json
import math

import pytest

from eval.models import TokenizerMismatchError, load_native
from eval.scoring import evaluate_task
from eval.tasks import load_task
from tests.helpers import to_hf_llama

pytestmark = pytest.mark.usefixtures("one_thread")



DATA = ["--data.max_bytes=600000", "--data.vocab_size=400", "--data.workers=1",
        "--data.tokenizer_train_bytes=200000", "--data.val_fraction=0.2"]


@pytest.fixture(scope="module", autouse=True)
def default_benchmarks(benchmark_dir):
    """Benchmarks read from the generated files wherever no --benchmark-dir is given (training's
    eval_tasks, the CLI): eval.tasks.default_data_dir pointed at them for this module."""
    import eval.tasks

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval.tasks, "default_data_dir", lambda: benchmark_dir)
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, default_benchmarks):
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
    train(cfg)
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


def _cli(argv, tmp_path):
    """python -m eval, in process (fast), returning the JSON it wrote."""
    from eval.__main__ import main

    out = tmp_path / f"results_{len(list(tmp_path.glob('results_*')))}.json"
    main([*argv, "--device", "cpu", "--out", str(out)])
    return json.loads(out.read_text())


def test_cli_perplexity_benchmarks_json_table_and_contamination(run, tmp_path, capsys):
    report = _cli(["--run", str(run / "run"), "--tasks", "hellaswag,lambada", "--limit", "12",
                   "--max-batches", "2"], tmp_path)
    assert report["perplexity"] == pytest.approx(math.exp(report["val_loss"]))  # lead's part
    assert report["checkpoint"].endswith("step_000004")
    # Contamination "auto": the run's data dir, whose n-gram indexes were built on demand.
    assert report["contamination"] == {"data_dir": str(run / "data"), "threshold": "any"}
    assert (run / "data" / "ngrams_13.npy").is_file()
    for task in ("hellaswag", "lambada"):
        r = report["tasks"][task]
        assert set(r["metrics"]) == {"all", "clean", "dirty"} and r["metrics"]["all"]["n"] == 12
        # stdlib text shares no 13-word run with these items; the empty subset is null
        assert r["dirty_fraction"] == 0.0 and r["metrics"]["clean"]["n"] == 12
        assert r["too_short_to_check"] == 0  # every item here has at least 13 words
        assert r["metrics"]["dirty"]["acc"] is None
    table = capsys.readouterr().out
    assert "hellaswag" in table and "clean" in table and "dirty%" in table


def test_cli_hf_export_scores_as_native(run, tmp_path):
    lm, tok, _ = load_native(run / "run")
    hf_dir = tmp_path / "hf"
    to_hf_llama(lm.model).save_pretrained(hf_dir)
    args = ["--tasks", "hellaswag,lambada", "--limit", "12", "--contamination", "off",
            "--log-samples"]
    native = _cli(["--run", str(run / "run"), "--no-perplexity", *args], tmp_path)
    exported = _cli(["--hf", str(hf_dir), "--tokenizer", tok.source, *args], tmp_path)
    for task in ("hellaswag", "lambada"):
        a, b = native["tasks"][task]["metrics"]["all"], exported["tasks"][task]["metrics"]["all"]
        assert a.keys() == b.keys()
        for key in a:  # fp32 on CPU, different op order: same accuracies, ppl to 1e-5
            assert a[key] == pytest.approx(b[key], rel=1e-5), (task, key)
        sa, sb = native["tasks"][task]["samples"], exported["tasks"][task]["samples"]
        assert len(sa) == len(sb) == 12
        for x, y in zip(sa, sb):  # every choice's summed log-likelihood, to 1e-4 nats
            assert x["loglik"] == pytest.approx(y["loglik"], abs=1e-4)
            assert x["greedy"] == y["greedy"]


def test_cli_stops_with_clear_messages(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub fallback must fail, as offline here
    with pytest.raises(SystemExit, match="unknown task 'hellaswagg'"):
        _cli(["--run", str(run / "run"), "--tasks", "hellaswag,hellaswagg"], tmp_path)
    with pytest.raises(SystemExit, match=r"task 'piqa'.*valid.jsonl \+ valid-labels.lst"):
        _cli(["--run", str(run / "run"), "--tasks", "piqa", "--benchmark-dir", str(tmp_path),
              "--no-perplexity"], tmp_path)
    other = tmp_path / "other.tiktoken"
    from data.tokenizer import train_bpe

    train_bpe(["a completely different corpus, " * 50, "with other merges " * 40], 300, other)
    with pytest.raises(SystemExit, match="was trained with tokenizer"):
        _cli(["--run", str(run / "run"), "--tasks", "lambada", "--tokenizer", str(other),
              "--no-perplexity"], tmp_path)
