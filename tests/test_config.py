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
