"""Scoring an item's choices from one forward of their shared context gives lm-eval's scores
(the request-by-request path) for our Transformer and for a Hugging Face Llama, real SmolLM2
included; batched greedy decoding equals one-prompt decoding (model.generate) and transformers'
generate; few-shot tasks score the same either way."""

import random

import pytest
import torch

from eval.generation import greedy_generate
from eval.icl import IclTask, load_icl_task
from eval.models import HFCachedLM, HFLogLikelihood, TransformerCachedLM, TransformerLogLikelihood
from eval.scoring import encode_pair, evaluate_task
from eval.suite import load_items
from model.generate import generate
from tests.helpers import tiny_model, to_hf_llama
from tests.icl_fixtures import icl_fixture_texts, write_icl_fixtures

pytestmark = pytest.mark.usefixtures("one_thread")
V = 97


def random_requests(rng: random.Random, max_seq_len: int):
    """Items of 1-5 choices sharing a context (multiple choice), items whose contexts share a
    prefix and whose continuation is shared (schema), and items too long for the window."""
    requests, groups = [], []
    for g in range(14):
        kind = rng.choice(["mc", "mc", "schema", "long"])
        base = [rng.randrange(V) for _ in range(rng.randint(1, 40))]
        for _ in range(rng.randint(1, 5)):
            if kind == "schema":
                ctx = base + [rng.randrange(V) for _ in range(rng.randint(1, 4))]
                cont = [7, 8, 9]
            else:
                ctx = base + [rng.randrange(V) for _ in range(max_seq_len)] if kind == "long" else base
                cont = [rng.randrange(V) for _ in range(rng.randint(1, 8))]
            requests.append((ctx, cont))
            groups.append(g)
    return requests, groups


@pytest.fixture(scope="module")
def model():
    m = tiny_model(V, seed=3, max_seq_len=64)
    with torch.no_grad():
        m.output_weight.mul_(8)  # peaked predictions: greedy flags and argmaxes mean something
    return m


@pytest.mark.parametrize("batch_size", [1, 5])
def test_shared_context_equals_request_by_request_native(model, seed, batch_size):
    requests, groups = random_requests(random.Random(seed), 64)
    lm = TransformerLogLikelihood(model, batch_size=batch_size)
    each = lm.each(requests)
    shared = lm.loglikelihood(requests, groups)
    # fp32, the same products summed in another order (two forwards instead of one)
    assert [s[0] for s in shared] == pytest.approx([e[0] for e in each], abs=2e-5)
    assert [s[1] for s in shared] == [e[1] for e in each]


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_packed_rows_score_as_the_cache_path_does(model, seed, kind, monkeypatch):
    """Short groups are packed whole into rows with a block mask (no cache), long ones take
    prefill + extend: both paths run here, and each gives the request-by-request scores."""
    import eval.shared_context as sc

    rng = random.Random(seed)
    toks = lambda n: [rng.randrange(V) for _ in range(n)]
    requests, groups = [], []
    for g in range(12):  # 3-20 token contexts, 2-4 choices of 1-6 tokens: 5-44 tokens a group
        ctx = toks(rng.randint(3, 20))
        for _ in range(rng.randint(2, 4)):
            requests.append((ctx, toks(rng.randint(1, 6))))
            groups.append(g)
    for g in range(12, 15):  # 40-token contexts, 4 choices of 6-8 tokens: more than 64 a group
        ctx = toks(40)
        for _ in range(4):
            requests.append((ctx, toks(rng.randint(6, 8))))
            groups.append(g)
    lm = (TransformerLogLikelihood(model, batch_size=3) if kind == "native"
          else HFLogLikelihood(to_hf_llama(model), batch_size=3))
    calls = {"packed": 0, "extend": 0}
    for name in calls:
        method = getattr(lm.cached, name)
        def counted(*a, _m=method, _n=name, **k):
            calls[_n] += 1
            return _m(*a, **k)
        monkeypatch.setattr(lm.cached, name, counted)
    each, shared = lm.each(requests), lm.loglikelihood(requests, groups)
    assert calls["packed"] > 0 and calls["extend"] > 0, calls
    assert [s[0] for s in shared] == pytest.approx([e[0] for e in each], abs=2e-5)
    assert [s[1] for s in shared] == [e[1] for e in each]
    monkeypatch.setattr(sc, "PACK_WIDTH", 0)  # everything through the cache path
    cached = lm.loglikelihood(requests, groups)
    assert [s[0] for s in shared] == pytest.approx([c[0] for c in cached], abs=2e-5)


def test_models_whose_attention_takes_no_custom_mask_are_not_packed(model, seed, monkeypatch):
    """flash-attention and flex take no 4D mask: such a model scores through the cache path."""
    hf = to_hf_llama(model)
    monkeypatch.setattr(hf.config, "_attn_implementation", "flash_attention_2")
    assert not HFCachedLM(hf).packs
    lm = HFLogLikelihood(to_hf_llama(model), batch_size=4)
    monkeypatch.setattr(lm.cached, "packs", False)
    monkeypatch.setattr(lm.cached, "packed", lambda *a: pytest.fail("packed a row"))
    requests, groups = random_requests(random.Random(seed), 64)
    shared, each = lm.loglikelihood(requests, groups), lm.each(requests)
    assert [s[0] for s in shared] == pytest.approx([e[0] for e in each], abs=2e-5)


def test_pack_fills_rows_best_fit_longest_first(seed):
    from eval.shared_context import _pack

    rng = random.Random(seed)
    lengths = [rng.randint(1, 64) for _ in range(200)]
    rows = _pack(lengths, 64)
    assert sorted(g for r in rows for g in r) == list(range(200))  # each item once
    used = [sum(lengths[g] for g in r) for r in rows]
    assert max(used) <= 64
    # A row is opened only for an item that fits in no open row, whose room only shrinks after:
    # no two rows' contents would fit in one.
    assert all(a + b > 64 for i, a in enumerate(used) for b in used[i + 1 :])
    assert len(rows) <= 2 * sum(lengths) // 64 + 1


def test_shared_context_fills_the_window_when_prefix_and_remainder_are_long(model, seed):
    """One batch holding an item with a long shared context and an item whose choices diverge
    early and fill the whole 64-token window: the longest prefix plus the longest remainder
    (58 + 59 tokens) exceed the window, each request does not (CI found this at seed 525999496)."""
    rng = random.Random(seed)
    toks = lambda n: [rng.randrange(V) for _ in range(n)]
    long_ctx, short_base = toks(58), toks(5)
    requests = [(long_ctx, toks(1)), (long_ctx, toks(5)), (long_ctx, toks(7))]
    requests += [(short_base + toks(50), toks(10)), (short_base + toks(30), toks(3))]
    groups = [0, 0, 0, 1, 1]
    assert max(len(c) + len(t) - 1 for c, t in requests) == 64  # a row fills the cache
    lm = TransformerLogLikelihood(model, batch_size=8)
    each, shared = lm.each(requests), lm.loglikelihood(requests, groups)
    assert [s[0] for s in shared] == pytest.approx([e[0] for e in each], abs=2e-5)
    assert [s[1] for s in shared] == [e[1] for e in each]


def test_shared_context_equals_request_by_request_hf(model, seed):
    requests, groups = random_requests(random.Random(seed), 64)
    lm = HFLogLikelihood(to_hf_llama(model), batch_size=4)
    each, shared = lm.each(requests), lm.loglikelihood(requests, groups)
    assert [s[0] for s in shared] == pytest.approx([e[0] for e in each], abs=2e-5)
    assert [s[1] for s in shared] == [e[1] for e in each]
    native = TransformerLogLikelihood(model, batch_size=4).loglikelihood(requests, groups)
    assert [s[0] for s in shared] == pytest.approx([n[0] for n in native], abs=2e-5)


def test_few_shot_tasks_score_the_same_either_way(tmp_path):
    from data.tokenizer import train_bpe

    bench = write_icl_fixtures(tmp_path)
    tok = train_bpe(icl_fixture_texts(bench), 300)
    lm = TransformerLogLikelihood(tiny_model(300, seed=2, max_seq_len=64), batch_size=6)
    for name in ("core:arc_easy", "core:winogrande", "core:lambada_openai", "core:hellaswag"):
        items = load_items(name, bench, limit=8)  # 10-shot prompts overflow 64: some truncated
        a = evaluate_task(lm, tok, name, items, progress=False, log_samples=True)
        b = evaluate_task(lm, tok, name, items, progress=False, log_samples=True,
                          shared_context=False)
        assert a["metrics"] == b["metrics"], name
        for x, y in zip(a["samples"], b["samples"]):
            assert x["loglik"] == pytest.approx(y["loglik"], abs=2e-5)


def test_greedy_generate_equals_one_prompt_at_a_time(model, seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 30))] for _ in range(7)]
    got = greedy_generate(TransformerCachedLM(model), prompts, 12, 64, torch.device("cpu"), 3)
    assert got == [generate(model, p, 12, temperature=0) for p in prompts]
    stop = lambda ids: ids[-1] == got[0][3]  # noqa: E731 - stops row 0 after 4 tokens
    short = greedy_generate(TransformerCachedLM(model), prompts[:1], 12, 64, torch.device("cpu"), 3, stop)
    assert short[0] == got[0][: got[0].index(got[0][3]) + 1]


def test_greedy_generate_equals_transformers_generate(model, seed):
    rng = random.Random(seed)
    hf = to_hf_llama(model)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 30))] for _ in range(5)]
    got = greedy_generate(HFCachedLM(hf), prompts, 10, 64, torch.device("cpu"), 2)
    # An explicit attention mask: without one, generate masks every prompt token equal to
    # pad_token_id (a random prompt holds token 0 now and then).
    ref = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                       max_new_tokens=10, min_new_tokens=10, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert got == ref


def test_smollm2_few_shot_items_score_the_same_either_way(smollm2_dir, tmp_path):
    """A real model, its own tokenizer: three 3-shot multiple-choice items scored both ways."""
    from data.hf_tokenizer import HFTokenizer

    bench = write_icl_fixtures(tmp_path, n=8)
    lm = HFLogLikelihood.from_pretrained(smollm2_dir, batch_size=8)
    tok = HFTokenizer(smollm2_dir)
    task = IclTask("arc3", "world_knowledge/arc_easy.jsonl", "multiple_choice", 3, "\nAnswer: ")
    items = load_icl_task(task, bench, limit=3)
    requests = [encode_pair(tok, c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
    groups = [i for i, it in enumerate(items) for _ in it.contexts]
    each, shared = lm.each(requests), lm.loglikelihood(requests, groups)
    assert [s[0] for s in shared] == pytest.approx([e[0] for e in each], abs=1e-3)
    assert [s[1] for s in shared] == [e[1] for e in each]
