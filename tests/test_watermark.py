"""Watermarking (inference/watermark.py): the green lists and the detector agree with
transformers' WatermarkLogitsProcessor / WatermarkDetector configured alike, watermarked
generations are detected and plain ones are not, and the detect CLI reads a run."""

import json

import pytest
import torch

from data.tokenizer import train_bpe
from inference.engine import Engine
from inference.sampling import SamplingParams
from inference.watermark import GreenLists, WatermarkConfig, main, score
from model.checkpoint import save_checkpoint
from tests.helpers import tiny_model

CONFIGS = [
    WatermarkConfig(),  # lefthash, width 1 (transformers' default)
    WatermarkConfig(gamma=0.5, delta=1.5, seeding_scheme="selfhash", context_width=1, hash_key=7),
    WatermarkConfig(seeding_scheme="selfhash", context_width=4),  # the original repo's default
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["lefthash", "selfhash-1", "selfhash-4"])
def test_processor_matches_transformers(seed, cfg):
    from transformers.generation.logits_process import WatermarkLogitsProcessor

    V = 1000
    theirs = WatermarkLogitsProcessor(V, "cpu", **cfg.transformers_kwargs())
    ours = GreenLists(cfg, V)
    ids = torch.randint(0, V, (3, 9))
    scores = torch.randn(3, V)
    expected = theirs(ids, scores)
    got = torch.stack([ours.bias(s, row.tolist()) for s, row in zip(scores, ids)])
    assert torch.equal(got, expected)
    assert (expected != scores).any()  # some token got the bias


@pytest.mark.parametrize("cfg", CONFIGS, ids=["lefthash", "selfhash-1", "selfhash-4"])
@pytest.mark.parametrize("ignore_repeated", [False, True])
def test_z_scores_match_transformers_detector(seed, cfg, ignore_repeated, one_thread):
    from transformers import LlamaConfig, WatermarkDetector, WatermarkingConfig

    V, bos = 300, 1
    model = tiny_model(V, seed=seed, max_seq_len=128)
    engine = Engine(model, max_batch=4, max_len=128)
    params = SamplingParams(max_new_tokens=60, temperature=1.0, seed=seed, watermark=cfg)
    with torch.no_grad():
        marked = [s.generated for s in engine.generate([[bos, 5, 9]] * 2, params)]
    plain = torch.randint(0, V, (2, 60)).tolist()
    plain[0][0] = bos  # transformers drops a leading BOS: so must we
    detector = WatermarkDetector(
        LlamaConfig(vocab_size=V, bos_token_id=bos), "cpu",
        WatermarkingConfig(**cfg.transformers_kwargs()), ignore_repeated_ngrams=ignore_repeated,
    )
    for ids in marked + plain:
        theirs = detector(torch.tensor([ids]), return_dict=True)
        ours = score(ids, cfg, V, bos_id=bos, ignore_repeated_ngrams=ignore_repeated)
        assert abs(ours["z_score"] - float(theirs.z_score[0])) < 1e-6
        assert abs(ours["p_value"] - float(theirs.p_value[0])) < 1e-6
        assert ours["num_tokens_scored"] == theirs.num_tokens_scored[0]


def test_watermarked_generations_are_detected(seed, one_thread):
    V = 500
    model = tiny_model(V, seed=seed, max_seq_len=160)  # small init: high-entropy predictions
    engine = Engine(model, max_batch=8, max_len=160)
    cfg = WatermarkConfig()
    prompts = [[i, i + 1] for i in range(8)]
    with torch.no_grad():
        marked = engine.generate(prompts, SamplingParams(max_new_tokens=120, seed=seed, watermark=cfg))
        plain = engine.generate(prompts, SamplingParams(max_new_tokens=120, seed=seed))
    z_marked = [score(s.generated, cfg, V)["z_score"] for s in marked]
    z_plain = [score(s.generated, cfg, V)["z_score"] for s in plain]
    assert min(z_marked) > 4, z_marked
    assert max(abs(z) for z in z_plain) < 4, z_plain


def test_detect_cli_reads_a_run(tmp_path, seed, capsys, one_thread):
    tok = train_bpe(["the quick brown fox jumps over the lazy dog. " * 4] * 30, vocab_size=300)
    tok.save(tmp_path / "tok.tiktoken")
    model = tiny_model(tok.n_vocab, seed=seed, max_seq_len=200)
    from job_config import JobConfig

    job = JobConfig(model=model.cfg)
    job.data.tokenizer = str(tmp_path / "tok.tiktoken")
    save_checkpoint(tmp_path / "run", 0, model.state_dict(), {}, job.to_dict())
    cfg = WatermarkConfig(delta=4.0)
    engine = Engine(model, tok, max_batch=2, max_len=200)
    with torch.no_grad():
        marked, plain = engine.generate(
            [tok.encode("the fox")] * 2,
            [SamplingParams(max_new_tokens=150, seed=seed, watermark=cfg), SamplingParams(max_new_tokens=150, seed=seed)],
        )
    out = tmp_path / "scores.json"
    # Each distinct n-gram counted once: a tiny random model's unmarked text repeats itself, and
    # counting every occurrence flagged it at seed 1872900585 (z 4.19, CI).
    main(["detect", "--run", str(tmp_path / "run"), "--text", marked.text, "--text", plain.text,
          "--delta", "4", "--ignore-repeated-ngrams", "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert [t["watermarked"] for t in report["texts"]] == [True, False]
    assert "WATERMARKED" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="does not exist"):
        main(["detect", "--run", str(tmp_path / "nope"), "--text", "x"])
