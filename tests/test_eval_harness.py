"""Benchmark scoring: the harness's log-likelihoods and metrics equal ones computed by hand
(one sequence at a time, log_softmax summed over the continuation tokens), for every task type;
batching does not change them; a random model is at chance on HellaSwag; a Hugging Face Llama
holding the same weights scores the same."""

import json
import math

import numpy as np
import pytest
import torch

from eval.models import HFLogLikelihood, LogLikelihoodModel, TransformerLogLikelihood
from eval.scoring import encode_pair, evaluate_task, flat_metrics, format_table, item_requests
from eval.tasks import load_task
from tests.helpers import small_tokenizer, tiny_model, to_hf_llama, train_briefly

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.fixture(scope="module")
def trained(tok, benchmark_dir):
    """A tiny model with max_seq_len 64 (so long HellaSwag / LAMBADA contexts get truncated),
    trained a few steps on LAMBADA passages that are not among the scored items."""
    model = tiny_model(tok.n_vocab, seed=1, max_seq_len=64)
    texts = [json.loads(line)["text"] for line in
             (benchmark_dir / "lambada" / "lambada_test.jsonl").read_text().splitlines()[200:400]]
    train_briefly(model, tok, texts, steps=40)
    return model


def _other_task_files(root):
    """ARC / PIQA / Winogrande items in their original formats (written here)."""
    arc = [
        {"id": "a", "answerKey": "B", "question": {"stem": "What do plants need to make food?",
         "choices": [{"text": "soil only", "label": "A"}, {"text": "sunlight", "label": "B"},
                     {"text": "darkness", "label": "C"}, {"text": "sand", "label": "D"}]}},
        {"id": "b", "answerKey": "2", "question": {"stem": "Which is a gas at room temperature?",
         "choices": [{"text": "iron", "label": "1"}, {"text": "oxygen", "label": "2"},
                     {"text": "salt", "label": "3"}]}},
    ]
    for name in ("ARC-Easy", "ARC-Challenge"):
        folder = root / name.lower().replace("-", "_")
        folder.mkdir(parents=True)
        (folder / f"{name}-Test.jsonl").write_text("\n".join(json.dumps(d) for d in arc))
    piqa = [{"goal": "To dry wet shoes,", "sol1": "stuff them with newspaper.",
             "sol2": "put them in the freezer overnight."},
            {"goal": "How to cool soup quickly", "sol1": "Put the pot in a bath of ice water.",
             "sol2": "Cover the pot with a blanket."}]
    (root / "piqa").mkdir()
    (root / "piqa" / "valid.jsonl").write_text("\n".join(json.dumps(d) for d in piqa))
    (root / "piqa" / "valid-labels.lst").write_text("0\n0\n")
    wino = [{"sentence": "The trophy does not fit into the suitcase because the _ is too small.",
             "option1": "trophy", "option2": "suitcase", "answer": "2"},
            {"sentence": "Ian asked Dennis for help because _ knew the answer.",
             "option1": "Ian", "option2": "Dennis", "answer": "2"}]
    (root / "winogrande").mkdir()
    (root / "winogrande" / "dev.jsonl").write_text("\n".join(json.dumps(d) for d in wino))


def _by_hand(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """One request scored alone, following lm-eval's definition step by step."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation  # trailing spaces move over
    ctx_ids = tok.encode(stripped)
    cont_ids = tok.encode(stripped + continuation)[len(ctx_ids):]
    seq = (ctx_ids + cont_ids)[-(model.cfg.max_seq_len + 1):]  # keep the continuation whole
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0].double(), dim=-1)
    total, greedy = 0.0, True
    for t in range(len(seq) - len(cont_ids) - 1, len(seq) - 1):  # position t predicts t + 1
        total += float(logprobs[t, seq[t + 1]])
        greedy &= int(logprobs[t].argmax()) == seq[t + 1]
    return total, greedy


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_string(tok):
    ctx, cont = encode_pair(tok, "Question: why?\nAnswer: ", "because")
    assert ctx == tok.encode("Question: why?\nAnswer:")
    assert tok.decode(cont) == " because"
    # The continuation is the tail of the whole string's encoding (by the context's token
    # count), as in lm-eval: here " th" + "e" merge into " the" across the boundary, so the
    # continuation differs from encoding "e end" alone.
    ctx, cont = encode_pair(tok, "in th", "e end")
    assert ctx == tok.encode("in th") and len(ctx) == 2
    assert cont == tok.encode("in the end")[2:] and cont != tok.encode("e end")
    assert encode_pair(tok, "", " hello") == ([tok.eot_id], tok.encode(" hello"))


@pytest.mark.parametrize(
    "task", ["hellaswag", "lambada", "arc_easy", "arc_challenge", "piqa", "winogrande"]
)
def test_scores_equal_hand_computed(task, tok, trained, tmp_path, benchmark_dir):
    if task in ("hellaswag", "lambada"):
        items = load_task(task, benchmark_dir, limit=6)
    else:
        _other_task_files(tmp_path)
        items = load_task(task, tmp_path)
    lm = TransformerLogLikelihood(trained, batch_size=5)  # 5: batches mix lengths and items
    result = evaluate_task(lm, tok, task, items, progress=False)["metrics"]["all"]

    requests = [r for it in items for r in item_requests(tok, it)]
    harness = lm.loglikelihood(requests)
    hand = [_by_hand(trained, tok, c, x) for it in items for c, x in zip(it.contexts,
                                                                         it.continuations)]
    # fp32 batched/padded vs fp64-softmax single sequences: sums of ~100 log-probs agree to 1e-4
    np.testing.assert_allclose([h[0] for h in harness], [h[0] for h in hand], rtol=0, atol=1e-4)
    assert [h[1] for h in harness] == [h[1] for h in hand]

    acc, acc_norm, logliks, k = [], [], [], 0
    for it in items:
        lls = [hand[k + j][0] for j in range(len(it.contexts))]
        if task == "lambada":
            acc.append(hand[k][1])
            logliks.append(lls[0])
        else:
            acc.append(int(np.argmax(lls)) == it.gold)
            norm = [ll / n for ll, n in zip(lls, it.choice_lengths)]
            acc_norm.append(int(np.argmax(norm)) == it.gold)
        k += len(it.contexts)
    assert result["n"] == len(items)
    assert result["acc"] == pytest.approx(np.mean(acc), abs=1e-12)
    if task == "lambada":
        assert result["perplexity"] == pytest.approx(math.exp(-np.mean(logliks)), rel=1e-4)
        assert "acc_norm" not in result
    elif task == "winogrande":
        assert "acc_norm" not in result  # lm-eval reports acc only for Winogrande
    else:
        assert result["acc_norm"] == pytest.approx(np.mean(acc_norm), abs=1e-12)


def test_batch_size_and_truncation_do_not_change_scores(tok, trained, benchmark_dir):
    items = load_task("lambada", benchmark_dir, limit=12)
    requests = [r for it in items for r in item_requests(tok, it)]
    assert max(len(c) + len(x) for c, x in requests) > trained.cfg.max_seq_len + 1  # truncated
    one = TransformerLogLikelihood(trained, batch_size=1).loglikelihood(requests)
    many = TransformerLogLikelihood(trained, batch_size=7).loglikelihood(requests)
    np.testing.assert_allclose([r[0] for r in one], [r[0] for r in many], atol=1e-4)
    assert [r[1] for r in one] == [r[1] for r in many]


def test_continuation_longer_than_the_window_scores_its_last_tokens(tok, trained):
    L = trained.cfg.max_seq_len
    ctx, cont = [5, 6, 7], torch.randint(0, tok.n_vocab, (L + 10,)).tolist()
    with pytest.warns(UserWarning, match="longer than max_seq_len"):
        ((ll, _),) = TransformerLogLikelihood(trained).loglikelihood([(ctx, cont)])
    with torch.no_grad():
        logits = trained(torch.tensor([cont[-L - 1 : -1]]))[0].double()
    expected = logits.log_softmax(-1).gather(1, torch.tensor(cont[-L:])[:, None]).sum()
    assert ll == pytest.approx(float(expected), abs=1e-4)


def test_random_model_is_at_chance_on_hellaswag(tok, benchmark_dir):
    # A randomly initialized model predicts nearly uniformly, so every token costs about
    # log(V) nats. acc_norm (per character) then carries no information: it should be at
    # chance, 25%. With n = 600 items the binomial standard error is sqrt(.25 * .75 / 600) =
    # 0.018; we allow 4 of them (0.071), failing by chance about once in 15,000 runs.
    # acc (summed) instead picks the ending with the fewest tokens: it must sit near that
    # length-only baseline (a property of the data), within the same margin.
    items = load_task("hellaswag", benchmark_dir, limit=600)
    model = tiny_model(tok.n_vocab, seed=int(torch.randint(0, 10_000, ()).item()))
    lm = TransformerLogLikelihood(model, batch_size=32)
    assert isinstance(lm, LogLikelihoodModel)
    result = evaluate_task(lm, tok, "hellaswag", items, progress=False)
    m = result["metrics"]["all"]
    assert m["n"] == 600
    assert abs(m["acc_norm"] - 0.25) < 0.071
    fewest_tokens = np.mean([
        int(np.argmin([len(cont) for _, cont in item_requests(tok, it)])) == it.gold
        for it in items
    ])
    assert abs(m["acc"] - fewest_tokens) < 0.071
    table = format_table({"hellaswag": result})
    assert "hellaswag" in table and f"{m['acc']:.4f}" in table


def test_hf_model_with_the_same_weights_scores_the_same(tok, trained, benchmark_dir):
    hf = to_hf_llama(trained)
    items = load_task("hellaswag", benchmark_dir, limit=8)
    native = evaluate_task(TransformerLogLikelihood(trained, 4), tok, "hellaswag", items,
                           progress=False)
    exported = evaluate_task(HFLogLikelihood(hf, 4), tok, "hellaswag", items, progress=False)
    assert native["metrics"] == exported["metrics"]
    requests = [r for it in items for r in item_requests(tok, it)]
    a = TransformerLogLikelihood(trained, 4).loglikelihood(requests)
    b = HFLogLikelihood(hf, 4).loglikelihood(requests)
    # Same fp32 math in a different op order: summed log-likelihoods agree to 1e-4.
    np.testing.assert_allclose([r[0] for r in a], [r[0] for r in b], atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*longer than max_seq_len")
def test_clean_dirty_split_and_training_mode_restored(tok, trained, benchmark_dir):
    items = load_task("hellaswag", benchmark_dir, limit=30)
    dirty = [bool(b) for b in torch.randint(0, 2, (30,)).tolist()]
    dirty[0], dirty[1] = True, False  # both subsets non-empty
    trained.train()
    lm = TransformerLogLikelihood(trained, batch_size=8)
    r = evaluate_task(lm, tok, "hellaswag", items, dirty=dirty, progress=False)
    assert trained.training  # eval inside a training loop leaves the model as it found it
    clean_only = evaluate_task(lm, tok, "hellaswag", [it for it, d in zip(items, dirty) if not d],
                               progress=False)["metrics"]["all"]
    dirty_only = evaluate_task(lm, tok, "hellaswag", [it for it, d in zip(items, dirty) if d],
                               progress=False)["metrics"]["all"]
    assert r["metrics"]["clean"] == clean_only and r["metrics"]["dirty"] == dirty_only
    assert r["dirty_fraction"] == pytest.approx(sum(dirty) / 30) and r["ngram_n"] == 13
    n_clean = r["metrics"]["clean"]["n"]
    assert r["metrics"]["all"]["acc"] == pytest.approx(
        (n_clean * clean_only["acc"] + (30 - n_clean) * dirty_only["acc"]) / 30
    )
    flat = flat_metrics({"hellaswag": r})
    assert flat["eval/hellaswag/acc_norm"] == r["metrics"]["all"]["acc_norm"]
    assert flat["eval/hellaswag/dirty/n"] == 30 - n_clean
    assert "dirty" in format_table({"hellaswag": r})


def test_hf_tokenizer_json_behind_our_interface(tmp_path, benchmark_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data.hf_tokenizer import HFTokenizer

    texts = [json.loads(line)["text"] for line in
             (benchmark_dir / "lambada" / "lambada_test.jsonl").read_text().splitlines()[:100]]
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path)
    assert tok.eot_id == hf.token_to_id("<|endoftext|>") and tok.n_vocab == 320
    for text in texts[:20]:
        assert tok.decode(tok.encode(text)) == text
    ctx, cont = encode_pair(tok, "Question: why?\nAnswer: ", "because")
    assert tok.decode(ctx) == "Question: why?\nAnswer:" and tok.decode(cont) == " because"
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer(tmp_path / "missing")
