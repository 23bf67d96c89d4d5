"""Write a weight-only quantized copy of a run's checkpoint (model/quant.py), which
`--quantize`-free loading (model.load.load_model) reads back as the quantized model.

    python -m inference.quantize --run runs/smollm2 --mode int8 --out-dir runs/smollm2-int8
    python -m inference.quantize --run runs/smollm2 --mode int4 --group-size 64 --out-dir runs/smollm2-int4
    python -m inference.quantize --run runs/smollm2 --mode int4 --gptq --clip --out-dir runs/smollm2-gptq

int4 rounds to nearest by default; --gptq chooses the codes by GPTQ (inference/gptq.py) on
--calibration windows of the run's train split (or --data DIR's), --clip also searches each
group's range: on SmolLM2 that is the difference between +27% and +3% perplexity at group 64
(bench/results/quant-*.md). The output is a run directory with one checkpoint (same step, same
config) holding the packed weights and quantization.json; generate / eval / serve take it with
--run like any other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.atomic import write_json
from common.cli import add_run_arguments, parse_device
from common.errors import run_cli
from inference.gptq import calibration_batches, gptq_quantize_model
from model.checkpoint import load_config_dict, load_tokenizer_identity, save_checkpoint
from model.load import load_model
from model.quant import GROUP_SIZES, MODES, QUANT_FILE, quantize_model, weight_bytes


def quantize_run(run: str | Path, out: str | Path, mode: str, group_size: int = 64,
                 step: int | None = None, device="cpu", gptq: dict | None = None) -> Path:  # fmt: skip
    """Quantize checkpoint `step` (default: newest) of `run` into run directory `out`. gptq:
    int4 by GPTQ, {"calibration": windows, "data": dir or None, "act_order": .., "clip": ..}."""
    model, cfg, ckpt = load_model(run, device, step=step)
    fp_bytes = weight_bytes(model)
    if gptq is not None:
        if mode != "int4":
            raise ValueError(f"--gptq chooses int4 codes: expected --mode int4, not {mode}")
        batches = calibration_batches(gptq["data"] or cfg.data.path, gptq["calibration"],
                                      cfg.train.seq_len, device)  # fmt: skip
        gptq_quantize_model(model, batches, group_size, act_order=gptq["act_order"], clip=gptq["clip"])
    else:
        quantize_model(model, mode, group_size)
    info = {"mode": mode, "group_size": group_size if mode == "int4" else None, "gptq": gptq,
            "source": str(ckpt), "weight_bytes": weight_bytes(model), "float_weight_bytes": fp_bytes}  # fmt: skip
    n = int(ckpt.name.removeprefix("step_")) if ckpt.name.startswith("step_") else 0
    path = save_checkpoint(
        out, n, model.state_dict(), {"step": n}, load_config_dict(ckpt),
        tokenizer=load_tokenizer_identity(ckpt), extra_files={QUANT_FILE: json.dumps(info, indent=1) + "\n"},
    )
    print(f"wrote {path}: {mode} weights {info['weight_bytes'] / 1e6:.1f} MB "
          f"(float {fp_bytes / 1e6:.1f} MB, / {fp_bytes / info['weight_bytes']:.2f})")  # fmt: skip
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference.quantize", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, out_help="also write the sizes as JSON to FILE")
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--group-size", type=int, default=64, choices=GROUP_SIZES, help="int4 only")
    parser.add_argument("--out-dir", metavar="DIR", required=True, help="the run directory to write")
    parser.add_argument("--gptq", action="store_true", help="int4 codes by GPTQ instead of rounding")
    parser.add_argument("--calibration", type=int, default=64, help="GPTQ: train windows (default: 64)")
    parser.add_argument("--data", metavar="DIR", default=None, help="GPTQ: prepared data (default: the run's)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal")
    parser.add_argument("--clip", action="store_true", help="GPTQ: search each group's range")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = parse_device(parser, args.device)
    try:
        gptq = ({"calibration": args.calibration, "data": args.data, "act_order": args.act_order,
                 "clip": args.clip} if args.gptq else None)  # fmt: skip
        path = quantize_run(args.run, args.out_dir, args.mode, args.group_size, args.step, device, gptq)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"python -m inference.quantize: {e}") from None
    if args.out:
        write_json(Path(args.out), json.loads((path / QUANT_FILE).read_text()))


if __name__ == "__main__":
    run_cli(main)
