"""`python -m eval --tasks core,probes,generation` end to end on an exported tiny model: every
group's tasks scored, CORE with its centered scores and the tasks it is missing, the Winogender
gap, human_eval through the sandbox, and each item's contamination flag against a prepared
corpus into which two benchmark items were copied (their tasks report them as dirty, and CORE
is given on clean items too)."""

import json

import pytest

from data.tokenizer import train_bpe
from eval.__main__ import main
from eval.contamination import normalize_words
from eval.suite import load_items
from model.hf import export_model
from tests.helpers import tiny_model
from tests.icl_fixtures import icl_fixture_texts, write_icl_fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data.prepare import prepare
    from job_config import DataConfig

    root = tmp_path_factory.mktemp("suite")
    bench = write_icl_fixtures(root / "bench", n=12)
    texts = icl_fixture_texts(bench)
    tok = train_bpe(texts, 320)
    model = tiny_model(tok.n_vocab, seed=0, max_seq_len=256)
    export_model(model.state_dict(), model.cfg, root / "hf", tok)
    # A training corpus holding two benchmark items (arc_easy's item 1, gsm8k's item 2)
    leaked = [load_items("core:arc_easy", bench)[1].text, load_items("gsm8k", bench)[2].text]
    # three copies each (documents are split by hash: some copy lands in train)
    leaked = [f"Copy {i}. {t}" for t in leaked for i in range(3)]
    filler = [f"Some unrelated document number {i} about gardens and engines." for i in range(40)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in filler + leaked))
    data = root / "data"
    prepare(DataConfig(path=str(data), sources=[str(corpus)], vocab_size=300, stages=[],
                       tokenizer_train_bytes=100_000, val_fraction=0.1, workers=1))
    return root, bench, data


def test_eval_cli_runs_every_group(setup, capsys):
    root, bench, data = setup
    out = root / "results.json"
    main(["--hf", str(root / "hf"), "--tasks", "core,probes,generation", "--limit", "6",
          "--benchmark-dir", str(bench), "--contamination", str(data), "--max-new-tokens", "8",
          "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    tasks = report["tasks"]
    assert set(tasks) == {"core:hellaswag_zeroshot", "core:hellaswag", "core:arc_easy",
                          "core:winogrande", "core:lambada_openai", "bigbench_misconceptions",
                          "winogender_female", "winogender_male", "gsm8k", "human_eval"}
    assert "core:squad" in report["skipped"]["core"]
    assert "--tasks core: no files for" in printed and "not the published CORE" in printed

    core = report["core"]
    assert set(core) == {"all", "clean", "dirty"}
    assert core["all"]["n_tasks"] == 5 and "core:coqa" in core["all"]["missing"]
    arc = core["all"]["tasks"]["core:arc_easy"]
    assert arc["centered_v1"] == pytest.approx((arc["acc"] - 0.25) / 0.75)
    # item 1 was copied, and the items that ask about the same noun share its first 10-gram
    arc_items = load_items("core:arc_easy", bench, limit=6)
    queries = [it.text.rsplit(" ", 1)[0] for it in arc_items]
    n_dirty = queries.count(queries[1])
    assert core["clean"]["tasks"]["core:arc_easy"]["n"] == 6 - n_dirty
    assert core["dirty"]["n_tasks"] == 1  # the only CORE task with a dirty item
    assert tasks["core:arc_easy"]["dirty_fraction"] == pytest.approx(n_dirty / 6)
    assert tasks["core:winogrande"]["dirty_fraction"] == 0

    gender = report["probes"]["winogender"]["all"]["acc_per_token"]
    assert gender["gap"] == pytest.approx(gender["female"] - gender["male"])
    assert "factuality" in report["probes"]

    he = tasks["human_eval"]
    assert he["metrics"]["all"]["n"] == 3 and sum(he["statuses"].values()) == 3
    assert "rlimits" in he["sandbox_layers"]
    prompts = [it.text for it in load_items("human_eval", bench)]
    assert he["too_short_to_check"] == sum(len(normalize_words(p)) < 13 for p in prompts) > 0
    gsm = [it.text for it in load_items("gsm8k", bench, limit=6)]
    assert tasks["gsm8k"]["metrics"]["dirty"]["n"] == gsm.count(gsm[2])
