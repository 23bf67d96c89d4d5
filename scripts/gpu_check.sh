#!/usr/bin/env bash
# One GPU lease, one command (bench/gpu_check.py): check and measure everything GPU-only in at
# most 8 minutes, with the device image's own python3 (no venv there) from the repository root,
# log and tables under $OUT. Arguments pass through, e.g. `--parts attention loss` for a rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-/tmp/gpu-check}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec python3 -m bench.gpu_check --out-dir "$OUT" "$@"
