"""The generation engine (inference/engine.py) on tiny models: batched, ragged, static-cache and
speculative greedy decoding give the ids of plain decoding; speculative sampling draws from the
target's distribution (chi-square); stops and streaming."""

import math

import pytest
import torch

from data.tokenizer import train_bpe
from inference.eagle import EagleDraft
from inference.engine import Engine, TextStream
from inference.ngram import NgramDraft
from inference.sampling import SamplingParams
from model.generate import generate
from tests.helpers import tiny_model

# Large init std: peaked next-token distributions, so greedy ids are not decided by rounding.
PEAKED = dict(init_std=0.3)


def greedy_without_cache(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_batched_ragged_and_speculative_greedy_equal_plain(seed, one_thread):
    target = tiny_model(97, seed=seed, max_seq_len=64, **PEAKED)
    draft = tiny_model(97, seed=seed + 1, max_seq_len=64, n_layers=1, **PEAKED)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 1, 12, 3, 8)]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    with torch.no_grad():
        plain = [generate(target, p, 16, temperature=0) for p in prompts]
        assert plain[2] == greedy_without_cache(target, prompts[2], 16)
        # 5 prompts through 3 slots: sequences queue and take slots others free
        batched = Engine(target, max_batch=3, max_len=40).generate(prompts, params)
        assert [s.generated for s in batched] == plain
        assert all(s.finish_reason == "length" for s in batched)
        eagle = EagleDraft.for_target(target, torch.arange(0, 97, 2), seed)  # untrained, half the ids
        for draft_model, k in ((draft, 3), (NgramDraft(), 4), (eagle, 3), (target, 4)):
            engine = Engine(target, max_batch=2, max_len=40, draft=draft_model, speculate_k=k)
            spec = engine.generate(prompts, params)
            assert [s.generated for s in spec] == plain
            assert engine.stats["proposed"] > 0
        assert engine.acceptance_rate() == 1.0  # the target as its own draft: every draft kept


def test_compiled_engine_gives_the_eager_ids(seed, one_thread):
    """torch.compile'd draft and verification steps (every slot, every cache entry) on an int8
    target (fbgemm's op inside the graph) give the eager engine's greedy ids."""
    from model.quant import quantize_model

    target = quantize_model(tiny_model(97, seed=seed, max_seq_len=64, **PEAKED), "int8")
    draft = tiny_model(97, seed=seed + 1, max_seq_len=64, n_layers=1, **PEAKED)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (5, 1, 9)]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    with torch.no_grad():
        want = [s.generated for s in Engine(target, max_batch=2, max_len=32).generate(prompts, params)]
        # every compiled length runs: draft steps of 1 and 2 tokens, the target's verification
        # of 1 + 3, and a one-token step (the prefill of the one-token prompt)
        for draft_model in (draft, NgramDraft(), EagleDraft.for_target(target, torch.arange(97), seed)):
            engine = Engine(target, max_batch=2, max_len=32, draft=draft_model, speculate_k=3,
                            compile=True)  # fmt: skip
            assert [s.generated for s in engine.generate(prompts, params)] == want
            assert engine.stats["proposed"] > 0


def test_context_limit_and_bad_prompts(one_thread):
    model = tiny_model(50, max_seq_len=32)
    engine = Engine(model, max_batch=2, max_len=16)
    (s,) = engine.generate([[1] * 10], SamplingParams(max_new_tokens=100, temperature=0))
    assert s.finish_reason == "length" and len(s.tokens) == 16
    with pytest.raises(ValueError, match="no room"):
        engine.submit([1] * 16, SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        engine.submit([3, 50], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def chi_square_p_value(counts: dict, probs: dict, n: int) -> float:
    """Pearson's test, cells of expected count < 5 pooled; p from the Wilson-Hilferty
    normal approximation of the chi-square tail (accurate to ~1e-3 at these dof)."""
    stat, pooled_obs, pooled_exp, dof = 0.0, 0, 0.0, -1
    for cell, p in probs.items():
        e = n * p
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + counts.get(cell, 0), pooled_exp + e
            continue
        stat += (counts.get(cell, 0) - e) ** 2 / e
        dof += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-12)
        dof += 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def two_token_samples(target, draft, prompt: list[int], V: int, N: int, seed: int):
    """N sequences of 2 tokens sampled (t1 from the prefill, t2 from a speculative round,
    k = 2) -> the target's joint distribution of (t1, t2), the counts drawn, and the engine."""
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        seqs = torch.tensor([prompt + [a] for a in range(V)])
        p2 = target(seqs)[:, -1].softmax(-1)  # (V, V): t2 given t1
    joint = {(a, b): float(p1[a] * p2[a, b]) for a in range(V) for b in range(V)}
    engine = Engine(target, max_batch=2000, max_len=len(prompt) + 6, draft=draft, speculate_k=2)
    params = [SamplingParams(max_new_tokens=2, temperature=1.0, seed=seed + i) for i in range(N)]
    with torch.no_grad():
        out = engine.generate([prompt] * N, params)
    counts: dict = {}
    for s in out:
        counts[tuple(s.generated)] = counts.get(tuple(s.generated), 0) + 1
    return joint, counts, engine


def test_speculative_sampling_draws_from_the_target(seed, one_thread):
    """12,000 sequences of 2 tokens (t1 from the prefill, t2 from a speculative round, k = 2):
    the joint distribution of (t1, t2) is the target's, with a draft that disagrees with it."""
    V, N = 12, 12_000
    target = tiny_model(V, seed=seed, max_seq_len=16, init_std=0.15)
    draft = tiny_model(V, seed=seed + 1, max_seq_len=16, n_layers=1, init_std=0.15)
    prompt = [3, 7]
    joint, counts, engine = two_token_samples(target, draft, prompt, V, N, seed)
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        q1 = draft(torch.tensor([prompt]))[0, -1].softmax(-1)
    assert 0.05 < engine.acceptance_rate() < 0.95  # both branches of the rule ran often
    assert chi_square_p_value(counts, joint, N) > 1e-4
    # the test has power: the draft's own first-token distribution is rejected
    first = {}
    for (a, _), c in counts.items():
        first[a] = first.get(a, 0) + c
    assert (p1 - q1).abs().sum() > 0.2
    assert chi_square_p_value(first, {a: float(q1[a]) for a in range(V)}, N) < 1e-6


def test_eagle_speculative_sampling_draws_from_the_target(seed, one_thread):
    """As above with an (untrained) EAGLE head over 8 of the 12 ids: its q is zero where the
    target's p is not, which the rule covers by redrawing from the residual."""
    V, N = 12, 12_000
    target = tiny_model(V, seed=seed, max_seq_len=16, init_std=0.15)
    draft = EagleDraft.for_target(target, torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:8], seed)
    joint, counts, engine = two_token_samples(target, draft, [3, 7], V, N, seed)
    assert 0.05 < engine.acceptance_rate() < 0.95
    assert chi_square_p_value(counts, joint, N) > 1e-4


def test_stop_tokens_stop_strings_and_streaming(seed, one_thread):
    texts = ["def add(a, b):\n    return a + b\n", "the cat sat on the mat. " * 3] * 20
    tok = train_bpe(texts, vocab_size=300)
    model = tiny_model(tok.n_vocab, seed=seed, max_seq_len=64)
    engine = Engine(model, tok, max_batch=4, max_len=64)
    prompt = tok.encode("the cat")
    with torch.no_grad():
        (free,) = engine.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0))
        ids = free.generated
        assert free.text == tok.decode(ids)
        # stop at the token that came 5th; at the text of the 7th and 8th tokens
        stop_id = ids[4]
        stop_text = tok.decode(ids[6:8])
        deltas: list[str] = []
        on_token = lambda s, t, d: deltas.append(d)
        a, b = engine.generate(
            [prompt, prompt],
            [SamplingParams(max_new_tokens=30, temperature=0, stop_tokens=(stop_id,)),
             SamplingParams(max_new_tokens=30, temperature=0, stop_strings=(stop_text,))],
        )
        (c,) = engine.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0,
                                                        stop_strings=(stop_text,)), on_token)
    first = ids.index(stop_id)
    assert a.finish_reason == "stop" and a.generated == ids[: first + 1]
    assert a.text == tok.decode(ids[:first])  # the stop token is not text
    full = tok.decode(ids)
    assert b.finish_reason == "stop" and b.text == full[: full.find(stop_text)]
    assert stop_text not in b.text and len(b.generated) <= 8
    assert "".join(deltas) == c.text == b.text and all(stop_text not in d for d in deltas)


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    class Bytes:  # a byte-level tokenizer: id = byte
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    s = TextStream(Bytes(), ("END",))
    out = [s.push(b) for b in "héE".encode()]
    assert [d for d, _ in out] == ["h", "", "é", ""]  # é is two bytes; "E" may start "END"
    assert s.push(ord("x")) == ("Ex", False)
    for b in b"EN":
        assert s.push(b) == ("", False)
    assert s.push(ord("D")) == ("", True) and s.text == "héEx"


def test_ngram_speculative_sampling_draws_from_the_target(seed, one_thread):
    """An n-gram draft's proposals are certain (q one-hot): each is kept with probability p and
    a rejection redraws from p without it. (t1, t2) of 12,000 sequences from one round follow
    the target's joint distribution, not the draft's."""
    V, N = 12, 12_000
    target = tiny_model(V, seed=seed, max_seq_len=16, init_std=0.15)
    prompt = [3, 7, 5, 3]  # t1 (the prefill's) then a round whose drafts copy from the prompt
    joint, counts, engine = two_token_samples(target, NgramDraft(), prompt, V, N, seed)
    accepted, proposed = engine.stats["accepted"], engine.stats["proposed"]
    assert proposed == 2 * N and 100 < accepted < proposed - 100  # both branches ran often
    assert chi_square_p_value(counts, joint, N) > 1e-4
    # the test has power: a rule that always kept the drafts would make t2 the draft of t1
    first_draft = {a: (NgramDraft().propose(prompt + [a], 2) or [a])[0] for a in range(V)}
    assert sum(c for (a, b), c in counts.items() if b == first_draft[a]) < N / 2


def test_ngram_draft_proposes_the_continuation_of_the_longest_repeated_suffix():
    draft = NgramDraft(max_n=3)
    assert draft.propose([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]
    # the longest suffix with an earlier match wins over a later match of a shorter one
    assert draft.propose([5, 1, 2, 7, 3, 2, 1, 2], 3) == [7, 3, 2]
    # past the end of the sequence the copy repeats its own proposals (a loop goes on)
    assert draft.propose([4, 5, 4], 4) == [5, 4, 5, 4]
    assert draft.propose([1, 2, 3], 2) == [] and draft.propose([6], 2) == []
    assert NgramDraft(max_n=3, min_n=2).propose([8, 1, 2, 8], 2) == []
    with pytest.raises(ValueError, match="min_n"):
        NgramDraft(max_n=1, min_n=2)
