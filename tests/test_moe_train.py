"""An MoE run through train.py: it trains, logs the per-layer MoE metrics, and resumes exactly,
balancing bias state included."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.helpers import records, run_train, step_losses, tiny_overrides

STEPS = 8


def train(data: Path, run_dir: Path, **extra) -> None:
    """A ~150k-parameter MoE (2 layers, 4 experts of hidden 32, top-2, bias balancing with a
    large rate so the bias visibly matters within a few steps)."""
    moe = {
        "model.n_experts": 4, "model.moe_top_k": 2, "model.expert_hidden": 32,
        "model.moe_bias_rate": 0.01, "train.steps": STEPS, "train.val_every": 0,
    }
    run_train(tiny_overrides(data, run_dir, **{**moe, **extra}), config="configs/moe-tiny.toml")


losses = step_losses


def bias(ckpt: Path) -> torch.Tensor:
    state = load_file(ckpt / "model.safetensors")
    return torch.stack([state[f"blocks.{i}.mlp.expert_bias"] for i in range(2)])


def test_moe_run_resumes_exactly_with_its_bias(tiny_data, tmp_path, capsys):
    data_dir = tiny_data  # the suite's prepared corpus (tests/conftest.py)
    ref = tmp_path / "ref"
    train(data_dir, ref)
    want = losses(ref)
    assert sorted(want) == list(range(1, STEPS + 1))
    assert want[STEPS] < want[1]
    last = records(ref)[-1]
    assert {"moe/layer0/max_min_ratio", "moe/layer1/frac_e0", "moe/layer1/z_loss"} <= set(last)

    # The load report CLI reads the run and its validation data.
    from eval.moe_load import main as load_report

    load_report(["--run", str(ref), "--sequences", "8", "--seq-len", "32",
                 "--out", str(tmp_path / "load.json")])
    out = capsys.readouterr().out
    assert "256 validation tokens" in out and "layer1: max/min load" in out
    report = json.loads((tmp_path / "load.json").read_text())
    assert report["tokens"] == 256 and f"max/min load {report['moe/layer1/max_min_ratio']:.2f}" in out

    # Resume from the step-4 checkpoint into a fresh run directory.
    ckpt = ref / "checkpoints" / "step_000004"
    assert bias(ckpt).abs().sum() > 0  # 4 steps of +-0.01 updates: a state that matters
    resumed = tmp_path / "resumed"
    train(data_dir, resumed, **{"checkpoint.resume": str(ckpt)})
    got = losses(resumed)
    assert sorted(got) == list(range(5, STEPS + 1))
    for step in got:
        assert got[step] == want[step], (step, got[step], want[step])  # bit-exact on CPU
    final = f"checkpoints/step_{STEPS:06d}"
    assert torch.equal(bias(resumed / final), bias(ref / final))

    # Control: the same resume with the bias zeroed in the checkpoint goes elsewhere, so the
    # comparison above really depends on the bias being saved and restored.
    broken = tmp_path / "broken_ckpt"
    shutil.copytree(ckpt, broken)
    state = load_file(broken / "model.safetensors")
    for key in state:
        if key.endswith("expert_bias"):
            state[key] = torch.zeros_like(state[key])
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    zeroed = tmp_path / "zeroed"
    train(data_dir, zeroed, **{"checkpoint.resume": str(broken)})
    assert losses(zeroed)[STEPS] != want[STEPS]
