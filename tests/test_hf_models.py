"""Real open models in and out (issue 13, items 2-4): RoPE scaling and q/k/v biases computed as
transformers computes them, Llama-3.2-style and Qwen2-style models written by transformers
imported, run and exported back, and an imported model trained further on data prepared with
its own tokenizer.

Tolerance 1e-4 on fp32 logits, as in test_hf.py: the same math in another operation order
leaves differences of order 1e-6; a wrong frequency or a dropped bias moves logits by more
than 1e-2 (the sensitivity checks below show it for these models).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers  # the hf extra: CI installs it, a missing one fails

from model import hf
from model.config import RopeScaling, model_config
from model.layers import rope_frequencies
from model.load import load_model
from model.transformer import build_model
from tests.helpers import run_train, stdlib_sample

TOL = 1e-4

ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32},
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                    "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.9, "mscale_all_dim": 0.5},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
}


def llama_config(rope: dict | None, **extra):
    params = {"rope_theta": 10000.0, "rope_type": "default", **(rope or {})}
    values = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128, rope_parameters=params, rms_norm_eps=1e-6,
                  architectures=["LlamaForCausalLM"], initializer_range=0.15)  # sharp attention
    values.update(extra)
    return transformers.LlamaConfig(**values)


def saved_random(config, path, seed: int):
    from tests.helpers import _randomize

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    return model


def load_hf_model(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, dtype=torch.float32)
    return model.eval(), info


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_frequencies_match_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = llama_config(ROPES[name])
    want, want_scale = ROPE_INIT_FUNCTIONS[ROPES[name]["rope_type"]](config, "cpu")
    cfg, _ = hf.model_config_from_hf(config.to_dict())
    got, scale = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=0)  # float32 vs our float64
    assert scale == pytest.approx(want_scale, rel=1e-12)
    unscaled, _ = rope_frequencies(cfg.head_dim, cfg.rope_theta)
    if name != "dynamic":  # dynamic rescales only past max_position_embeddings
        assert (got - unscaled).abs().max() > 1e-3 * unscaled.max()


@pytest.mark.parametrize("name", ["llama3", "yarn_mscale", "linear"])
def test_rope_scaled_checkpoint_logits(tmp_path, name, seed):
    """Scaled RoPE imported from a transformers checkpoint gives its logits at positions up to
    120 (past the 32-token "original" context); the same weights unscaled do not."""
    theirs = saved_random(llama_config(ROPES[name]), tmp_path / "hf", seed)
    hf.import_hf(tmp_path / "hf", tmp_path / "run")
    ours, job, _ = load_model(tmp_path / "run")
    assert job.model.rope_scaling.type == ROPES[name]["rope_type"]
    ids = torch.randint(0, 200, (2, 120))
    with torch.no_grad():
        want = theirs(ids).logits
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
        plain = build_model(dataclasses.replace(job.model, rope_scaling=RopeScaling())).eval()
        plain.load_state_dict(ours.state_dict())
        assert (plain(ids) - want).abs().max() > 100 * TOL


def test_rope_scaling_round_trip_and_refusals():
    for rope in ROPES.values():
        cfg, arch = hf.model_config_from_hf(llama_config(rope).to_dict())
        again, _ = hf.model_config_from_hf(hf.hf_config(cfg, arch, {}, torch.float32))
        assert again == cfg
    with pytest.raises(ValueError, match="max_seq_len"):  # dynamic past its own context
        model_config(rope_scaling=dict(type="dynamic", factor=2.0, original_max_seq_len=64),
                     max_seq_len=128)
    config = llama_config({"rope_type": "longrope", "short_factor": [1.0] * 8,
                           "long_factor": [1.0] * 8}).to_dict()
    with pytest.raises(hf.ExportError, match="rope_type = 'longrope'"):
        hf.model_config_from_hf(config)


def check_round_trip(hf_dir, tmp_path, texts: list[str]):
    """Import (CLI) -> our logits = transformers' -> export (CLI) -> transformers loads it
    with nothing missing or unexpected, same logits, same tokenizer, chat template and
    generation defaults."""
    theirs, _ = load_hf_model(hf_dir)
    run = tmp_path / "run"
    hf.main(["import", "--hf", str(hf_dir), "--out-dir", str(run)])
    ours, job, _ = load_model(run)
    assert job.data.tokenizer == f"hf:{run.resolve()}/tokenizer"
    vocab = theirs.config.vocab_size
    ids = torch.randint(0, vocab, (3, 50))
    with torch.no_grad():
        want = theirs(ids).logits
        assert want.abs().max() > 0.5
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)

    hf.main(["export", "--run", str(run), "--out-dir", str(tmp_path / "out")])
    back, info = load_hf_model(tmp_path / "out")
    assert not any(info.values()), info
    assert type(back) is type(theirs)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, atol=TOL, rtol=0)
    original = transformers.AutoTokenizer.from_pretrained(hf_dir)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in texts:
        assert exported(text)["input_ids"] == original(text)["input_ids"]
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    assert exported.apply_chat_template(messages, tokenize=False) == \
        original.apply_chat_template(messages, tokenize=False)
    generation = json.loads((tmp_path / "out/generation_config.json").read_text())
    source = json.loads((hf_dir / "generation_config.json").read_text())
    for key in ("eos_token_id", "bos_token_id", "temperature", "top_p", "do_sample"):
        assert generation.get(key) == source.get(key), key
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["eos_token_id"] == source["eos_token_id"]
    return run, back


def test_llama32_style_import_export(llama32_dir, tmp_path, seed):
    run, _ = check_round_trip(llama32_dir, tmp_path, stdlib_sample(20_000, skip=300))
    cfg = load_model(run)[1].model
    assert cfg.rope_scaling.type == "llama3" and cfg.rope_scaling.factor == 32.0
    assert cfg.tie_embeddings and cfg.n_kv_heads == 2


def test_qwen2_style_import_export(qwen2_dir, tmp_path, seed):
    run, _ = check_round_trip(qwen2_dir, tmp_path, stdlib_sample(20_000, skip=300))
    model, job, _ = load_model(run)
    assert job.model.qkv_bias
    ids = torch.randint(0, job.model.vocab_size, (1, 30))
    with torch.no_grad():  # the biases matter: without them the logits move
        want = model(ids)
        for block in model.blocks:
            for proj in (block.attn.wq, block.attn.wk, block.attn.wv):
                proj.bias.zero_()
        assert (model(ids) - want).abs().max() > 100 * TOL


def test_generation_defaults_of_an_imported_model(qwen2_dir, tmp_path, capsys):
    from data.manifest import run_tokenizer
    from model.generate import generation_defaults

    hf.import_hf(qwen2_dir, tmp_path / "run")
    tok = run_tokenizer(load_model(tmp_path / "run")[1].data)
    defaults, stops = generation_defaults(tok)
    assert defaults == {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "max_new_tokens": 200}
    im_end, eot = tok.added_tokens["<|im_end|>"], tok.added_tokens["<|endoftext|>"]
    assert stops == [im_end, eot] and tok.eot_id == eot
    assert "repetition_penalty = 1.05 is not applied" in capsys.readouterr().err


def test_continued_pretraining_of_an_imported_model(llama32_dir, tmp_path):
    """The whole path on the tiny Llama-3.2-style model: import, prepare the standard library
    with the model's own tokenizer, train from the imported weights, validation loss falls,
    export, transformers loads it."""
    from data.manifest import load_manifest
    from tests.helpers import records

    run = tmp_path / "imported"
    hf.import_hf(llama32_dir, run)
    data = tmp_path / "data"
    common = [f"--data.path={data}", "--data.max_bytes=400000", "--data.val_fraction=0.2",
              "--data.shard_tokens=50000", "--data.workers=1"]
    from data.prepare import main as prepare

    prepare(["--config", str(run / "config.toml"), *common])
    manifest = load_manifest(data)
    assert manifest["tokenizer"]["kind"] == "hf"
    assert manifest["tokenizer"]["spec"] == f"hf:{run.resolve()}/tokenizer"
    out = tmp_path / "cpt"
    run_train([*common, f"--checkpoint.init_from={run}", f"--train.run_dir={out}",
               "--train.steps=30", "--train.seq_len=64", "--train.batch_size=8",
               "--train.micro_batch_size=8", "--train.val_every=30", "--train.val_batches=4",
               "--train.log_every=10", "--train.threads=1", "--optim.lr=3e-3",
               "--optim.warmup_steps=3", "--checkpoint.every=30", "--logging.plot=false"],
              config=str(run / "config.toml"))
    val = [r["val_loss"] for r in records(out) if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] - 0.3, val
    hf.main(["export", "--run", str(out), "--out-dir", str(tmp_path / "out")])
    back, info = load_hf_model(tmp_path / "out")
    assert not any(info.values()), info
    ours = load_model(out)[0]
    ids = torch.randint(0, back.config.vocab_size, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), atol=TOL, rtol=0)


# --- SmolLM2-135M-Instruct, the real model (built once per session, tests/conftest.py) -------


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_dir):
    return load_hf_model(smollm2_dir)[0]


def test_smollm2_logits_equal_transformers(smollm2_run, smollm2_hf, seed):
    """Five prompts (random spans of the standard library, random lengths) give transformers'
    fp32 logits to 1e-4."""
    from data.manifest import run_tokenizer

    ours, job, _ = load_model(smollm2_run)
    tok = run_tokenizer(job.data)
    text = "".join(stdlib_sample(200_000, skip=600))
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(5):
        start = int(torch.randint(0, len(text) - 2000, (1,), generator=gen))
        length = int(torch.randint(20, 200, (1,), generator=gen))  # characters
        ids = torch.tensor([tok.encode(text[start : start + length])])
        with torch.no_grad():
            want, got = smollm2_hf(ids).logits, ours(ids)
        worst = max(worst, (got - want).abs().max().item())
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    print(f"largest logit difference {worst:.2e}")


def test_smollm2_generate_cli_equals_transformers_greedy(smollm2_run, smollm2_hf, smollm2_dir,
                                                         capsys):
    """64 greedy tokens of `python -m model.generate --temperature 0` are transformers'
    generate(do_sample=False) tokens (SmolLM2's tokenizer: no BOS, <|im_end|> stops both)."""
    from model.generate import main as generate

    prompt = "def binary_search(items, target):\n    \"\"\"Return the index of target in"
    capsys.readouterr()
    generate(["--run", str(smollm2_run), "--prompt", prompt, "--temperature", "0",
              "--max-new-tokens", "64"])
    ours = capsys.readouterr().out.split("---\n", 1)[1].removesuffix("\n")
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    inputs = ref(prompt, return_tensors="pt")
    with torch.no_grad():
        out = smollm2_hf.generate(**inputs, max_new_tokens=64, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(new) == 64 and 2 not in new  # 64 compared steps, no early stop
    assert ours == prompt + ref.decode(new)


def test_imported_run_generates_and_evaluates_with_its_tokenizer(llama32_dir, tmp_path, capsys):
    """`python -m model.generate --run` on an imported Llama-3.2-style run: the prompt starts
    with <|begin_of_text|> as transformers' tokenizer starts it, and greedy tokens equal
    transformers' generate(do_sample=False); eval picks the same tokenizer."""
    from data.tokenizer import load_tokenizer
    from eval.models import native_tokenizer
    from model.generate import main as generate

    run = tmp_path / "run"
    hf.import_hf(llama32_dir, run)
    prompt = "import os\nfor name in os.listdir(path):\n"
    capsys.readouterr()
    generate(["--run", str(run), "--prompt", prompt, "--temperature", "0",
              "--max-new-tokens", "30"])
    ours = capsys.readouterr().out.split("---\n", 1)[1].removesuffix("\n")
    model, _ = load_hf_model(llama32_dir)
    ref = transformers.AutoTokenizer.from_pretrained(llama32_dir)
    inputs = ref(prompt, return_tensors="pt")
    assert inputs["input_ids"][0, 0] == ref.bos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    if new and new[-1] in model.generation_config.eos_token_id:  # a stop token ends both
        new = new[:-1]
    assert len(new) > 5
    assert ours == prompt + ref.decode(new, clean_up_tokenization_spaces=False)
    _, job, ckpt = load_model(run)
    tok = native_tokenizer(ckpt, job)
    assert tok.identity() == load_tokenizer(job.data.tokenizer).identity()
