import re
import shlex
from pathlib import Path

import pytest

from job_config import ConfigError, load_config, parse_overrides, to_toml
from model.config import ModelConfig, model_config


def test_tiny_config_loads_and_overrides_apply():
    cfg = load_config("configs/tiny.toml", ["--optim.lr=0.5", "--train.steps=7", "--model.qk_norm=true"])
    assert cfg.optim.lr == 0.5 and cfg.train.steps == 7 and cfg.model.qk_norm is True
    assert cfg.model.dim == 256 and cfg.model.n_kv_heads == 2  # from size = "tiny"
    assert cfg.model.head_dim == 64 and cfg.model.ffn_hidden % cfg.model.multiple_of == 0


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config("configs/tiny.toml", ["--data.sources=['a', 'b']", "--optim.eps=1e-7"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    again = load_config(path)
    assert again == cfg


def test_inf_nan_and_odd_strings_round_trip_through_config_toml(tmp_path):
    """Issue 12 case: an override of inf / nan was saved into config.toml in a form that could
    not be loaded back (JSON's Infinity / NaN). So could strings with control characters or
    characters outside the BMP (JSON's \\u surrogate pairs are not TOML)."""
    overrides = ["--optim.grad_clip=inf", "--train.z_loss=nan", "--optim.eps=-inf",
                 '--train.run_dir="runs/\\u00e9t\\u00e9 \\U0001F600 \\"q\\" \\u007f\\t"']
    cfg = load_config("configs/tiny.toml", overrides)
    assert cfg.optim.grad_clip == float("inf") and cfg.train.z_loss != cfg.train.z_loss
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    again = load_config(path)
    assert again.optim.grad_clip == float("inf") and again.optim.eps == float("-inf")
    assert again.train.z_loss != again.train.z_loss  # nan
    assert again.train.run_dir == cfg.train.run_dir == 'runs/\u00e9t\u00e9 \U0001F600 "q" \x7f\t'
    again.train.z_loss = cfg.train.z_loss = 0.0
    assert again == cfg


def test_config_comments_suggest_only_meshes_the_code_accepts():
    """Issue 12 case: configs/moe-1b.toml told the user to run with ep=8, which
    parallel/mesh.py refuses. Every torchrun command in a config's comments, with every
    parallel setting the comments suggest (`ep = N`, `--parallel.key=N`), passes check_parallel
    for that command's world size."""
    from parallel.mesh import check_parallel

    commands = 0
    for path in sorted(Path("configs").glob("*.toml")):
        comments = [line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line]
        text = "\n".join(comments)
        suggested = [f"--parallel.{k}={v}" for k, v in re.findall(r"\b(ep|tp)\s*=\s*(\d+)", text)]
        for line in comments:
            if "torchrun" not in line:
                continue
            args = shlex.split(line.split("torchrun", 1)[1])
            world = int(args[args.index("--nproc_per_node") + 1])
            config = args[args.index("--config") + 1]
            overrides = [a for a in args if a.startswith("--") and "." in a.split("=")[0]]
            cfg = load_config(config, overrides + suggested)
            nnodes = int(args[args.index("--nnodes") + 1]) if "--nnodes" in args else 1
            check_parallel(cfg, world * nnodes)  # raises ParallelConfigError naming the field
            commands += 1
    assert commands >= 3


@pytest.mark.parametrize(
    "override, words",
    [
        ("--optim.lrr=1", ["optim.lrr", "unknown"]),
        ("--trian.steps=3", ["trian", "unknown section"]),
        ("--train.steps=abc", ["train.steps", "int"]),
        ("--train.steps=2.5", ["train.steps", "int"]),
        ("--model.qk_norm=1", ["model.qk_norm", "bool"]),
        ("--data.sources=stdlib", ["data.sources", "list"]),
        ("--model.n_kv_heads=3", ["model.n_kv_heads", "divisor"]),
        ("--model.size=huge", ["model.size", "tiny"]),
        ("--train.seq_len=4096", ["train.seq_len", "max_seq_len"]),
    ],
)
def test_bad_keys_and_types_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.toml", [override])
    for word in words:
        assert word in str(err.value)


def test_bad_toml_file_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_override_syntax():
    assert parse_overrides(["--a.b=3", "--a.c=x y", "--d.e=[1, 2]"]) == {
        "a": {"b": 3, "c": "x y"}, "d": {"e": [1, 2]},
    }
    with pytest.raises(ConfigError, match="section.key"):
        parse_overrides(["--steps=3"])


@pytest.mark.parametrize("size", ["tiny", "gpt2-124m", "llama-1b", "moe-tiny", "moe-1b"])
def test_parameter_count_formula_matches_model(size):
    import torch

    from model.transformer import Transformer

    cfg = model_config(size)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_model_config_rejects_nonsense():
    with pytest.raises(ValueError, match="moe_top_k"):
        ModelConfig(n_experts=4, moe_top_k=5)
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="fast")
