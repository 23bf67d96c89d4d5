"""Hugging Face export / import, checked by transformers itself (issue 8, items 1 and 3-5).

Each model is a tiny random Transformer; transformers loads the exported directory with
AutoModelForCausalLM (no custom code) and must report no missing / unexpected weights and log no
warnings, and its fp32 logits must equal ours on fresh random token ids.

Tolerance 1e-4 (absolute, fp32): both sides run the same fp32 math in a different operation order
(SDPA vs eager, fused vs separate expert GEMMs); with logits of order 1 this leaves differences of
order 1e-6, while any wrong mapping (RoPE convention, a swapped projection, a missed norm) moves
logits by more than 1e-2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from model.config import model_config
from model.generate import generate
from model.hf import export_model, import_hf
from model.hf_config import ExportError, hf_architecture, model_config_from_hf
from model.transformer import build_model

TOL = 1e-4
VOCAB = 320
STDLIB = Path(sysconfig.get_paths()["stdlib"])

DENSE = {
    "dense": (dict(), "LlamaForCausalLM"),
    "gqa_tied": (dict(n_kv_heads=2, tie_embeddings=True), "LlamaForCausalLM"),
    "wide_heads": (dict(n_kv_heads=2, head_dim=32, rope_theta=1234.5), "LlamaForCausalLM"),
    "qk_norm": (dict(qk_norm=True, n_kv_heads=1, rope_theta=500000.0), "Qwen3ForCausalLM"),
    "qkv_bias": (dict(qkv_bias=True, n_kv_heads=2, tie_embeddings=True), "Qwen2ForCausalLM"),
    "llama3_rope": (dict(rope_scaling=dict(type="llama3", factor=32.0, original_max_seq_len=16),
                         n_kv_heads=2), "LlamaForCausalLM"),
}
MOE = {
    "mixtral": (dict(n_experts=4, moe_top_k=2, expert_hidden=32), "MixtralForCausalLM"),
    "qwen3_moe": (
        dict(n_experts=4, moe_top_k=2, expert_hidden=32, qk_norm=True, moe_every=2,
             tie_embeddings=True),
        "Qwen3MoeForCausalLM",
    ),
    "qwen2_moe_shared": (
        dict(n_experts=4, moe_top_k=2, expert_hidden=32, n_shared_experts=2, n_kv_heads=2),
        "Qwen2MoeForCausalLM",
    ),
    "qwen2_moe_qkv_bias": (
        dict(n_experts=4, moe_top_k=2, expert_hidden=32, n_shared_experts=1, qkv_bias=True),
        "Qwen2MoeForCausalLM",
    ),
    # aux-loss-free balancing: the learned selection bias is exported (random here, see below)
    "ernie_bias": (
        dict(n_experts=4, moe_top_k=2, expert_hidden=32, n_shared_experts=1, n_kv_heads=2,
             moe_balance="bias", moe_every=2, n_layers=3),
        "Ernie4_5_MoeForCausalLM",
    ),
}


def tiny(**overrides):
    # norm_eps and init_std differ from every library default, so a dropped field shows.
    base = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, max_seq_len=64, norm_eps=1e-6,
                init_std=0.1)
    base.update(overrides)
    return model_config(**base)


def random_model(cfg, seed: int = 0):
    model = build_model(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms are 1 after init: make them random so a missed norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=gen)
            if name.endswith(".bias"):  # q/k/v biases start at zero: make them matter
                p.normal_(0.0, 0.5, generator=gen)
        if cfg.is_moe and cfg.moe_balance == "bias":  # a trained selection bias is not zero
            for name, b in model.named_buffers():
                if name.endswith("expert_bias"):
                    b.uniform_(-0.2, 0.2, generator=gen)
    return model


class LogCapture(logging.Handler):
    """transformers' logger does not propagate to the root logger, so caplog never sees it."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)


def load_hf(path: Path):
    with LogCapture() as logs:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, output_loading_info=True, dtype=torch.float32
        )
    return model.eval(), info, [r.getMessage() for r in logs.records]


def check_export(tmp_path: Path, overrides: dict, expected_arch: str, seed: int) -> None:
    cfg = tiny(**overrides)
    ours = random_model(cfg, seed)
    out = tmp_path / "hf"
    assert export_model(ours.state_dict(), cfg, out) == expected_arch
    hf, info, warnings = load_hf(out)
    assert type(hf).__name__ == expected_arch
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, errors
    assert warnings == []
    config = json.loads((out / "config.json").read_text())
    assert config["rms_norm_eps"] == cfg.norm_eps and config["rope_theta"] == cfg.rope_theta
    assert config["tie_word_embeddings"] == cfg.tie_embeddings

    gen = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(0, VOCAB, (2, 37), generator=gen)
    with torch.no_grad():
        want = ours(ids)
        got = hf(ids).logits
    assert want.abs().max() > 0.5  # logits large enough for TOL to be meaningful
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(DENSE))
def test_dense_export_logits(tmp_path, name):
    overrides, arch = DENSE[name]
    check_export(tmp_path, overrides, arch, seed=len(name))


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_export_logits(tmp_path, name):
    overrides, arch = MOE[name]
    check_export(tmp_path, overrides, arch, seed=len(name))


def test_sharded_export_loads(tmp_path):
    cfg = tiny(n_kv_heads=2)
    ours = random_model(cfg, seed=3)
    out = tmp_path / "hf"
    export_model(ours.state_dict(), cfg, out, max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    for f in files:  # every shard within the limit unless it holds a single larger tensor
        with safe_open(str(out / f), framework="pt") as st:
            assert st.metadata() == {"format": "pt"}
            sizes = [st.get_tensor(k).nbytes for k in st.keys()]
        assert sum(sizes) <= 60_000 or len(sizes) == 1
    hf, info, warnings = load_hf(out)
    assert not any(info.values()) and warnings == []
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=TOL, rtol=0)


def test_log_capture_sees_missing_weights(tmp_path):
    """The no-warnings checks above can fail: a file with a dropped tensor is reported."""
    cfg = tiny()
    out = tmp_path / "hf"
    state = random_model(cfg).state_dict()
    export_model(state, cfg, out)
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    tensors.pop("model.norm.weight")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    _, info, warnings = load_hf(out)
    assert info["missing_keys"] == {"model.norm.weight"}
    assert any("model.norm.weight" in w for w in warnings)


# Seeds whose random model does not fall into a short repetition loop within 40 tokens.
@pytest.mark.parametrize("name,seed", [("dense", 7), ("qk_norm", 7), ("mixtral", 9),
                                       ("ernie_bias", 9)])
def test_greedy_generation_matches(tmp_path, name, seed):
    overrides, _ = {**DENSE, **MOE}[name]
    cfg = tiny(**overrides)
    ours = random_model(cfg, seed=seed)
    out = tmp_path / "hf"
    export_model(ours.state_dict(), cfg, out)
    hf, _, _ = load_hf(out)
    eos = VOCAB - 1
    prompt = torch.randint(0, VOCAB - 1, (1, 5), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = generate(ours, prompt[0].tolist(), 40, temperature=0, stop_token=eos)
        got = hf.generate(
            prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=eos,
            attention_mask=torch.ones_like(prompt),
        )[0, prompt.shape[1]:].tolist()
    assert len(set(want)) > 10  # not a degenerate repetition: every step is a real comparison
    assert got == want


@pytest.mark.parametrize("name", sorted(DENSE) + sorted(MOE))
def test_export_import_export_is_byte_identical(tmp_path, name):
    from safetensors.torch import load_file

    overrides, _ = {**DENSE, **MOE}[name]
    cfg = tiny(**overrides)
    first, run, second = tmp_path / "first", tmp_path / "run", tmp_path / "second"
    export_model(random_model(cfg, seed=5).state_dict(), cfg, first, max_shard_size="100KB")
    imported = import_hf(first, run)
    if cfg.is_moe and cfg.moe_every == 1:  # no dense layer: ffn_hidden is unused, not saved
        assert dataclasses.replace(imported, ffn_hidden=cfg.ffn_hidden) == cfg
    else:
        assert imported == cfg
    step = run / "checkpoints" / "step_000000"
    export_model(load_file(step / "model.safetensors"), imported, second, max_shard_size="100KB")
    files = sorted(p.name for p in first.iterdir())
    assert len(files) > 3  # sharded: index + several files, plus config files
    assert files == sorted(p.name for p in second.iterdir())
    for f in files:
        assert (first / f).read_bytes() == (second / f).read_bytes(), f


def test_imported_model_computes_the_same(tmp_path):
    """Import gives our model back: its logits equal the original's exactly."""
    cfg = tiny(n_kv_heads=2, qk_norm=True)
    ours = random_model(cfg, seed=9)
    export_model(ours.state_dict(), cfg, tmp_path / "hf")
    imported_cfg = import_hf(tmp_path / "hf", tmp_path / "run")
    from safetensors.torch import load_file

    model = build_model(imported_cfg).eval()
    model.load_state_dict(load_file(tmp_path / "run/checkpoints/step_000000/model.safetensors"))
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), ours(ids))


# --- configs transformers cannot express ---------------------------------------------------


def test_inexpressible_qk_norm_with_shared_experts():
    cfg = tiny(n_experts=4, moe_top_k=2, n_shared_experts=1, qk_norm=True)
    with pytest.raises(ExportError, match="qk_norm with shared experts"):
        hf_architecture(cfg)


def test_inexpressible_dense_layers_in_mixtral(tmp_path):
    """Through the CLI: the run is refused with the feature named, and nothing is written."""
    from job_config import JobConfig
    from model import hf
    from model.checkpoint import save_checkpoint

    cfg = tiny(n_experts=4, moe_top_k=2, expert_hidden=32, moe_every=2)
    save_checkpoint(tmp_path / "run", 1, random_model(cfg).state_dict(), {},
                    JobConfig(model=cfg).to_dict())
    with pytest.raises(SystemExit, match="moe_every = 2 .dense MLP layers between MoE layers"):
        hf.main(["export", "--run", str(tmp_path / "run"), "--out-dir", str(tmp_path / "hf"),
                 "--no-tokenizer"])
    assert not (tmp_path / "hf").exists()


def test_selection_bias_changes_the_computation():
    """The Ernie export test above is meaningful: the random bias changes which experts run."""
    cfg = tiny(**MOE["ernie_bias"][0])
    model = random_model(cfg, seed=3)
    ids = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        biased = model(ids)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.zero_()
        assert (model(ids) - biased).abs().max() > 100 * TOL


def test_inexpressible_selection_bias_with_qk_norm():
    cfg = tiny(n_experts=4, moe_top_k=2, moe_balance="bias", qk_norm=True)
    with pytest.raises(ExportError, match="qk_norm with model.moe_balance = 'bias'"):
        hf_architecture(cfg)


def test_inexpressible_head_dim_not_dividing_dim():
    cfg = tiny(dim=64, n_heads=6, head_dim=16)
    with pytest.raises(ExportError, match="not a multiple of model.n_heads"):
        hf_architecture(cfg)


def test_tokenizer_larger_than_embedding(tmp_path):
    import tiktoken

    ranks = {bytes([b]): b for b in range(256)}
    enc = tiktoken.Encoding("t", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 400})
    cfg = tiny()
    with pytest.raises(ExportError, match="vocab_size = 320"):
        export_model(random_model(cfg).state_dict(), cfg, tmp_path / "x", tokenizer=enc)


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "longrope", "factor": 8.0}, "rope_type = 'longrope'"),
    ({"rope_type": "llama3", "factor": 8.0}, "rope_scaling.low_freq_factor is missing"),
])
def test_import_refuses_rope_it_cannot_compute(tmp_path, rope, message):
    cfg = tiny()
    export_model(random_model(cfg).state_dict(), cfg, tmp_path / "hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    config["rope_scaling"] = rope
    (tmp_path / "hf/config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=message):
        import_hf(tmp_path / "hf", tmp_path / "run")


def test_cli_export_generates_like_model_generate(tmp_path, capsys, tiny_data):
    """End to end: a run directory (checkpoint + prepared data's tokenizer) exported with
    `python -m model.hf export`; transformers' tokenizer + greedy generate give the same text
    as `python -m model.generate --temperature 0`."""
    from data.manifest import manifest_tokenizer
    from job_config import JobConfig
    from model import generate, hf
    from model.checkpoint import save_checkpoint

    data_dir = tiny_data
    tok = manifest_tokenizer(data_dir)
    cfg = tiny(vocab_size=tok.n_vocab, n_kv_heads=2, max_seq_len=96)
    job = JobConfig(model=cfg)
    job.data.path = str(data_dir)
    run = tmp_path / "run"
    save_checkpoint(run, 10, random_model(cfg, seed=15).state_dict(), {}, job.to_dict())

    prompt = "def split(s, comments=False"
    capsys.readouterr()
    generate.main(["--run", str(run), "--prompt", prompt, "--temperature", "0",
                   "--max-new-tokens", "40"])
    want = capsys.readouterr().out.split("---\n", 1)[1].removesuffix("\n")

    hf.main(["export", "--run", str(run), "--out-dir", str(tmp_path / "hf"), "--step", "10"])
    model, info, warnings = load_hf(tmp_path / "hf")
    assert not any(info.values()) and warnings == []
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    inputs = hf_tok(prompt, return_tensors="pt")
    assert inputs["input_ids"][0, 0] == tok.eot_id  # generate.py also starts with end-of-text
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    got = prompt + hf_tok.decode(new, skip_special_tokens=True)
    # (seed 15 is one whose random model does not emit end-of-text early: 40 compared steps)
    assert len(new) == 40 and len(set(new)) > 10
    assert got == want


@pytest.mark.parametrize("name", ["gqa_tied", "qk_norm", "qkv_bias", "mixtral", "qwen3_moe",
                                  "ernie_bias"])
def test_import_of_transformers_saved_model(tmp_path, name):
    """Import files written by transformers' own save_pretrained (random weights from
    transformers' init): our model then computes transformers' logits."""
    overrides, _ = {**DENSE, **MOE}[name]
    cfg = tiny(**overrides)
    export_model(random_model(cfg).state_dict(), cfg, tmp_path / "ours")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "ours")
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers initializes norms to 1: randomize them as well
        for n, p in theirs.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if n.endswith("e_score_correction_bias"):  # Ernie's selection bias
                p.uniform_(-0.2, 0.2)
            elif n.endswith("_proj.bias"):  # Qwen2's q/k/v biases
                p.normal_(0.0, 0.5)
    theirs.save_pretrained(tmp_path / "theirs")
    from model import hf
    from model.load import load_model

    hf.main(["import", "--hf", str(tmp_path / "theirs"), "--out-dir", str(tmp_path / "run")])
    model, job, _ = load_model(tmp_path / "run")
    assert job.model == model_config_from_hf(config.to_dict())[0]
    ids = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), theirs(ids).logits, atol=TOL, rtol=0)


def test_import_rejects_a_gated_shared_expert(tmp_path):
    """Qwen2-MoE's shared expert gate must be the zero our export writes: a learned gate is a
    feature our model lacks."""
    from safetensors.torch import load_file, save_file

    overrides, _ = MOE["qwen2_moe_shared"]
    cfg = tiny(**overrides)
    export_model(random_model(cfg).state_dict(), cfg, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf/model.safetensors")
    gate = "model.layers.1.mlp.shared_expert_gate.weight"
    assert torch.count_nonzero(tensors[gate]) == 0
    tensors[gate] = torch.full_like(tensors[gate], 0.01)
    save_file(tensors, tmp_path / "hf/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="shared_expert_gate.weight is not zero"):
        import_hf(tmp_path / "hf", tmp_path / "run")


def test_bfloat16_export(tmp_path):
    cfg = tiny(n_kv_heads=2)
    ours = random_model(cfg, seed=4)
    export_model(ours.state_dict(), cfg, tmp_path / "hf", dtype="bf16")
    assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == "bfloat16"
    hf, info, warnings = load_hf(tmp_path / "hf")  # loaded as fp32: the bf16 values exactly
    assert not any(info.values()) and warnings == []
    with torch.no_grad():  # our model with the same rounded weights
        for p in ours.parameters():
            p.copy_(p.bfloat16().float())
    ids = torch.randint(0, VOCAB, (1, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=TOL, rtol=0)


def _save_sharded(rank: int, world: int, port: int, state: dict, folder: str) -> None:
    """One rank of a 2-process gloo group: shard every tensor on dim 0 as DTensors (the layout
    FSDP2 checkpoints have) and save them with DCP, next to decoy optimizer tensors."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        sharded = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in state.items()}
        optim = {n + ".exp_avg": torch.zeros_like(t) for n, t in sharded.items()}
        dcp.save({"model": sharded, "optim": optim}, checkpoint_id=folder)
    finally:
        dist.destroy_process_group()


def test_sharded_dcp_checkpoint_is_consolidated(tmp_path):
    """A run whose checkpoint was saved sharded by 2 ranks (torch.distributed.checkpoint, no
    model.safetensors): export stops naming the consolidation command; after
    `python -m parallel.checkpoint_dcp --run DIR` it exports to the same bytes as the same
    weights in model.safetensors."""
    import socket

    import torch.multiprocessing as mp

    from job_config import JobConfig
    from model.checkpoint import load_model_state, save_checkpoint
    from model.hf import export_run
    from parallel import checkpoint_dcp

    cfg = tiny(n_kv_heads=2)
    state = random_model(cfg, seed=8).state_dict()
    job = JobConfig(model=cfg).to_dict()
    save_checkpoint(tmp_path / "plain", 5, state, {}, job)
    ckpt = save_checkpoint(tmp_path / "sharded", 5, state, {}, job)
    (ckpt / "model.safetensors").unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers need no re-import of this module (and of transformers)
    mp.start_processes(_save_sharded, args=(2, port, state, str(ckpt / "model")), nprocs=2,
                       start_method="fork")
    assert len(list((ckpt / "model").glob("*.distcp"))) == 2
    with pytest.raises(ExportError, match=r"python -m parallel\.checkpoint_dcp --run"):
        export_run(tmp_path / "sharded", tmp_path / "early_hf", with_tokenizer=False)
    assert not (tmp_path / "early_hf").exists()
    checkpoint_dcp.main(["--run", str(ckpt)])  # a checkpoint directory, as the message says
    torch.testing.assert_close(load_model_state(ckpt), state, rtol=0, atol=0)
    with pytest.raises(SystemExit, match="exists already"):
        checkpoint_dcp.main(["--run", str(tmp_path / "sharded")])
    for name in ("plain", "sharded"):
        export_run(tmp_path / name, tmp_path / f"{name}_hf", with_tokenizer=False)
    a = (tmp_path / "plain_hf/model.safetensors").read_bytes()
    assert a == (tmp_path / "sharded_hf/model.safetensors").read_bytes()
