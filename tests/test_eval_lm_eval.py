"""Few-shot scores equal lm-evaluation-harness's, item by item: lm-eval builds the prompts itself
(its few-shot context, target and few-shot delimiters) from task folders written from the same
files with the same drawn examples (bench/lm_eval_parity.py), and scores the exported Hugging
Face copy of our model with its own HFLM; we score the native model. One task of each type, with
and without examples and with the delimiters CORE uses; the window is short enough that the
longer prompts are truncated on both sides."""

import pytest

from bench.lm_eval_parity import check_tasks
from data.tokenizer import train_bpe
from eval.core import CORE_TASKS
from eval.icl import IclTask, load_icl_docs
from eval.models import TransformerLogLikelihood
from model.hf import export_model
from tests.helpers import tiny_model, train_briefly
from tests.icl_fixtures import icl_fixture_texts, write_icl_fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


def test_few_shot_scores_equal_lm_evaluation_harness(tmp_path, seed):
    bench = write_icl_fixtures(tmp_path / "bench", n=16, seed=seed)
    texts = icl_fixture_texts(bench)
    tok = train_bpe(texts, 320)
    model = tiny_model(tok.n_vocab, seed=seed, max_seq_len=160)
    train_briefly(model, tok, texts, steps=30)  # predictions that are not flat
    export_model(model.state_dict(), model.cfg, tmp_path / "hf", tok)

    def docs(task: IclTask) -> tuple[IclTask, list[dict]]:
        return task, load_icl_docs(task, bench)

    tasks = {
        "arc_easy 10-shot": docs(CORE_TASKS["core:arc_easy"].task),
        "winogrande": docs(CORE_TASKS["core:winogrande"].task),
        "winogrande 3-shot": docs(IclTask("w3", "language_understanding/winogrande.jsonl",
                                          "schema", 3)),
        "lambada": docs(CORE_TASKS["core:lambada_openai"].task),
        "lambada 4-shot": docs(IclTask("l4", "language_understanding/lambada_openai.jsonl",
                                       "language_modeling", 4, "\nAnswer: ")),
    }
    lm = TransformerLogLikelihood(model, batch_size=8)
    report = check_tasks(lm, tok, tmp_path / "hf", tasks, 12, 8, "cpu")
    for name, r in report.items():
        assert r["n"] == 12, name
        assert all(v == 0 for v in r["items_differing"].values()), (name, r)
        assert r["ours"] == r["lm_eval"] == {k: r["ours_reported"][k] for k in r["ours"]}, name
        # native fp32 (shared-context forward) vs transformers fp32 (one forward per request)
        assert r["max_abs_dloglik"] < 1e-4, (name, r["max_abs_dloglik"])
