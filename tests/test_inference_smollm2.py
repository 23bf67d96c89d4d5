"""The engine on a real model, SmolLM2-135M-Instruct (the smollm2_dir fixture): greedy ids of
transformers' generate = plain decoding = batched ragged decoding = speculative decoding with
the int8 model as draft; int8 / int4 weight memory / 3.5 and / 6 or better."""

import torch

from inference.engine import Engine
from inference.sampling import SamplingParams
from model.generate import generate
from model.load import load_model
from model.quant import quantize_model, weight_bytes


def test_greedy_ids_agree_everywhere(smollm2_dir, smollm2_run):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number"]
    prompts = [tok(t).input_ids for t in texts]  # ragged: 5 and 14 tokens
    n = 8
    model, _, _ = load_model(smollm2_run)
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]  # fmt: skip
        plain = [generate(model, p, n, temperature=0) for p in prompts]
        params = SamplingParams(max_new_tokens=n, temperature=0)
        batched = Engine(model, max_batch=2, max_len=64).generate(prompts, params)
        # the int8 model as draft (bench.generate times the int4 draft)
        draft = quantize_model(load_model(smollm2_run)[0], "int8")
        spec_engine = Engine(model, max_batch=2, max_len=64, draft=draft, speculate_k=3)
        spec = spec_engine.generate(prompts, params)
    assert plain == want
    assert [s.generated for s in batched] == want
    assert [s.generated for s in spec] == want
    assert spec_engine.acceptance_rate() > 0.5  # the int8 draft mostly agrees with the target
    fp = weight_bytes(model)
    assert fp / weight_bytes(draft) >= 3.5
    assert fp / weight_bytes(quantize_model(model, "int4", 64)) >= 6.0


def test_eagle_train_cli_writes_a_head_the_engine_decodes_with(smollm2_run, tmp_path):
    """`python -m inference.eagle train` end to end on SmolLM2 (a few hundred tokens: the run,
    not the head's quality, is under test; bench.generate measures a real one): the head it
    writes loads for the model, and greedy decoding with it gives plain greedy's ids."""
    import json

    from inference.eagle import load_eagle, main

    main(["train", "--run", str(smollm2_run), "--out", str(tmp_path / "head"), "--tokens", "768",
          "--seq-len", "128", "--batch", "2", "--epochs", "1", "--vocab", "512", "--device", "cpu"])  # fmt: skip
    info = json.loads((tmp_path / "head" / "eagle.json").read_text())
    assert info["vocab_size"] == 512 and len(info["held_out_agreement"]) == 3
    model, _, _ = load_model(smollm2_run)
    draft = load_eagle(tmp_path / "head", model)
    prompts = [[504, 3865, 1462, 314], list(range(200, 211))]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    with torch.no_grad():
        plain = [generate(model, p, 8, temperature=0) for p in prompts]
        engine = Engine(model, max_batch=2, max_len=32, draft=draft, speculate_k=3)
        assert [s.generated for s in engine.generate(prompts, params)] == plain
    assert engine.stats["proposed"] > 0
