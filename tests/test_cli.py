"""One command-line convention across every entry point (common/cli.py): kebab-case flags; every
tool that reads a run takes --run DIR [--step N] --device auto --out FILE; --out always names a
file (a tool that writes a directory says --out-dir); --section.key=value config overrides only
for train.py, data.prepare and bench.throughput. Read from each tool's `build_parser()`."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

ENTRY_POINTS = [
    "train", "data.prepare", "bench.throughput", "bench.throughput_gpu", "bench.kernels",
    "bench.gpu_check", "bench.hf_continue", "bench.faults", "bench.posttrain_export",
    "bench.lm_eval_parity", "bench.eval_speed",
    "bench.data", "bench.data_scale", "eval.__main__", "eval.moe_load", "eval.contamination",
    "model.generate",
    "model.hf", "model.hf_gguf", "model.hf_peft", "parallel.checkpoint_dcp",
    "data.tokenizer_report", "eval.glitch_tokens", "bench.tokenizers",
    "inference.serve", "inference.quantize", "inference.watermark",
    "bench.generate", "bench.watermark", "bench.quant",
]
OVERRIDES = {"train", "data.prepare", "bench.throughput"}  # --section.key=value
RUN_READERS = {"eval.__main__", "eval.moe_load", "model.generate", "eval.glitch_tokens",
               "inference.serve", "bench.posttrain_export", "bench.lm_eval_parity"}  # run the model on --device
# The least each tool needs to get past argparse (paths need not exist: parsing comes first).
MINIMAL_ARGS = {
    "train": ["--config", "configs/tiny.toml"],
    "eval.moe_load": ["--run", "nope"],
    "eval.contamination": ["--data", "nope"],
    "model.generate": ["--run", "nope"],
    "model.hf": ["export", "--run", "nope", "--out-dir", "nope"],
    "model.hf_gguf": ["--gguf", "nope", "--out-dir", "nope"],
    "model.hf_peft": ["--run", "nope", "--out-dir", "nope"],
    "bench.posttrain_export": ["--run", "nope"],
    "parallel.checkpoint_dcp": ["--run", "nope"],
    "bench.eval_speed": ["--hf", "nope"],
    "data.tokenizer_report": ["--tokenizer", "nope", "--languages", "nope", "--out", "nope"],
    "eval.glitch_tokens": ["--run", "nope"],
    "inference.serve": ["--run", "nope"],
    "inference.quantize": ["--run", "nope", "--mode", "int8", "--out-dir", "nope"],
    "inference.watermark": ["detect", "--run", "nope", "--text", "x"],
    "bench.generate": ["--run", "nope"],
    "bench.watermark": ["--run", "nope"],
    "bench.quant": ["--run", "nope"],
}
KEBAB = re.compile(r"--[a-z0-9]+(-[a-z0-9]+)*")


def parsers(parser: argparse.ArgumentParser, name: str) -> dict[str, argparse.ArgumentParser]:
    """{"model.hf export": its parser, ...}: a parser and those of its subcommands."""
    out = {name: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                out.update(parsers(sub, f"{name} {command}"))
    return out


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings if opt.startswith("--")}


def convention_problems(name: str, parser: argparse.ArgumentParser) -> list[str]:
    problems = []
    for where, p in parsers(parser, name).items():
        opts = options(p)
        problems += [f"{where}: {o} is not kebab-case" for o in opts if not KEBAB.fullmatch(o)]
        if "--device" in opts and opts["--device"].default != "auto":
            problems.append(f"{where}: --device defaults to {opts['--device'].default!r}, not auto")
        if "--out" in opts and opts["--out"].metavar != "FILE":
            problems.append(f"{where}: --out must name a file (metavar FILE; a dir is --out-dir)")
        if "--run" in opts:
            step = opts.get("--step")
            if opts["--run"].metavar != "DIR" or step is None or step.type is not int:
                problems.append(f"{where}: reads a run: --run DIR [--step N]")
    return problems


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_follows_the_convention(name):
    parser = importlib.import_module(name).build_parser()
    assert not convention_problems(name, parser), convention_problems(name, parser)
    if name in RUN_READERS:
        opts = options(parser)
        assert {"--run", "--step", "--device", "--out"} <= set(opts), sorted(opts)


def test_the_checker_sees_each_break():
    bad = argparse.ArgumentParser()
    bad.add_argument("--max_new_tokens")
    bad.add_argument("--device", default="cpu")
    bad.add_argument("--out", help="output folder")
    bad.add_argument("--run")
    found = "\n".join(convention_problems("bad", bad))
    for message in ("--max_new_tokens is not kebab-case", "not auto", "--out must name a file",
                    "--run DIR [--step N]"):
        assert message in found, found


@pytest.mark.parametrize("name", sorted(set(ENTRY_POINTS) - OVERRIDES))
def test_config_overrides_only_where_a_config_is_read(name, capsys):
    """A tool without a job config refuses --section.key=value before doing anything."""
    main = importlib.import_module(name).main
    with pytest.raises(SystemExit) as stop:
        main([*MINIMAL_ARGS.get(name, []), "--model.dim=8"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --model.dim=8" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_config_overrides_reach_the_config(name, monkeypatch):
    """train.py, data.prepare and bench.throughput hand --section.key=value to load_config."""
    module = importlib.import_module(name)
    seen = []

    def fake_load_config(path, overrides):
        seen.append((path, list(overrides)))
        raise SystemExit(0)  # stop before any work

    monkeypatch.setattr(module, "load_config", fake_load_config)
    if name == "bench.throughput":
        monkeypatch.setattr(module, "matmul_peak", lambda device: 1.0)  # not timed here
    with pytest.raises(SystemExit):
        module.main(["--config" if name != "bench.throughput" else "--configs",
                     "configs/tiny.toml", "--model.dim=8", "--optim.lr=1e-3"])
    assert seen == [("configs/tiny.toml", ["--model.dim=8", "--optim.lr=1e-3"])]


def test_a_bad_device_is_a_usage_error_naming_the_flag(capsys):
    from eval.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(["--run", "nope", "--device", "tpu"])
    assert stop.value.code == 2 and "--device 'tpu'" in capsys.readouterr().err
